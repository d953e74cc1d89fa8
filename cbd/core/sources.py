"""What a recipe's ``source`` and corpus names may say, parsed and checked before any work. Torch-free.

Sources (``Recipe.source``):

- a packaged model by name (``cbd.core.catalog.TEACHERS``), e.g. ``smollm2-135m``;
- ``path:/models/my-llm``: a local Hugging Face folder (``config.json``, safetensors weights, one
  file or sharded with ``model.safetensors.index.json``, ``tokenizer.json``);
- ``hf:Org/Name@REV``: a Hub repo at a pinned revision (branch, tag or commit), fetched with
  ``huggingface_hub.snapshot_download`` (``HF_ENDPOINT`` and ``HF_TOKEN`` choose the hub).

Corpora (``[data] corpus`` or a name of ``[data] corpora``):

- a packaged corpus by name (``cbd.core.catalog.CORPORA``), e.g. ``austen``;
- ``files:GLOB``: local text files, one document per file;
- ``jsonl:GLOB:FIELD``: JSON Lines files, one document per line, its text in ``FIELD``;
- ``parquet:GLOB:COLUMN``: Parquet files, one document per row, its text in ``COLUMN``;
- ``hf-dataset:NAME:SPLIT:FIELD``: a Hugging Face ``datasets`` dataset (needs ``datasets`` installed
  and its hub reachable).

``check_source_config`` refuses what the weight-role tables (``cbd.shape.arch``) cannot read: a
``model_type`` they do not know, mixtures of experts, per-layer heterogeneous configs, RoPE scaling,
other activations or biases, before any weights are read or downloaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbd.core.catalog import CORPORA, TEACHERS
from cbd.core.spec import MODEL_TYPES

REPO_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9])?/[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9])?$")
REV_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")
SOURCE_FORMS = "a packaged model (" + ", ".join(sorted(TEACHERS)) + "), 'path:/a/hf/folder' or 'hf:Org/Name@REVISION'"
CORPUS_FORMS = ("a packaged corpus (" + ", ".join(sorted(CORPORA)) + "), 'files:GLOB', 'jsonl:GLOB:FIELD', "
                "'parquet:GLOB:COLUMN' or 'hf-dataset:NAME:SPLIT:FIELD'")
SUPPORTED = ("Llama (model_type llama), Qwen2 (qwen2), Qwen3 (qwen3, dense) and GPT-2 (gpt2): dense decoders with "
             "the same block in every layer, default RoPE, SiLU (GPT-2: gelu_new), safetensors weights")


@dataclass(frozen=True)
class SourceRef:
    kind: str  # packaged | path | hf
    name: str  # the teacher name, the folder, or the repo id
    revision: str | None = None

    def __str__(self) -> str:
        return {"packaged": self.name, "path": f"path:{self.name}", "hf": f"hf:{self.name}@{self.revision}"}[self.kind]


def parse_source(text: str) -> SourceRef:
    """``text`` as a source, or ValueError naming the forms allowed."""
    if text in TEACHERS:
        return SourceRef("packaged", text)
    if text.startswith("path:"):
        folder = text[len("path:"):]
        if not folder:
            raise ValueError(f"source {text!r} names no folder; use {SOURCE_FORMS}")
        return SourceRef("path", folder)
    if text.startswith("hf:"):
        repo, at, rev = text[len("hf:"):].partition("@")
        if not REPO_RE.match(repo):
            raise ValueError(f"source {text!r}: {repo!r} is not a Hub repo id (Org/Name); use {SOURCE_FORMS}")
        if not at or not REV_RE.match(rev):
            raise ValueError(f"source {text!r} must pin a revision: 'hf:{repo}@REVISION' (a branch, tag or "
                             "commit sha; the resolved commit is recorded in the chain's manifest)")
        return SourceRef("hf", repo, rev)
    raise ValueError(f"source {text!r} is not a known source; use {SOURCE_FORMS}")


def absolute_source(text: str, base: Path) -> str:
    """A relative ``path:`` source made absolute against ``base`` (a recipe file's folder)."""
    if text.startswith("path:") and text[5:] and not Path(text[5:]).expanduser().is_absolute():
        return "path:" + str((base / text[5:]).resolve())
    if text.startswith("path:"):
        return "path:" + str(Path(text[5:]).expanduser())
    return text


@dataclass(frozen=True)
class CorpusRef:
    kind: str  # packaged | files | jsonl | parquet | hf-dataset
    target: str  # the name, the glob, or the dataset
    field: str | None = None  # jsonl field, parquet column, dataset field
    split: str | None = None  # hf-dataset only


EXTERNAL_KINDS = ("files", "jsonl", "parquet", "hf-dataset")


def parse_corpus(text: str) -> CorpusRef:
    """``text`` as a corpus, or ValueError naming the forms allowed."""
    if text in CORPORA:
        return CorpusRef("packaged", text)
    kind, colon, rest = text.partition(":")
    if not colon or kind not in EXTERNAL_KINDS or not rest:
        raise ValueError(f"corpus {text!r} is not a known corpus; use {CORPUS_FORMS}")
    if kind == "files":
        return CorpusRef("files", rest)
    if kind in ("jsonl", "parquet"):
        glob, _, field = rest.rpartition(":")
        if not glob or not field:
            what = "FIELD" if kind == "jsonl" else "COLUMN"
            raise ValueError(f"corpus {text!r}: write '{kind}:GLOB:{what}' (the {what.lower()} holding the text)")
        return CorpusRef(kind, glob, field)
    parts = rest.rsplit(":", 2)
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"corpus {text!r}: write 'hf-dataset:NAME:SPLIT:FIELD' (e.g. hf-dataset:org/data:train:text)")
    return CorpusRef("hf-dataset", parts[0], parts[2], split=parts[1])


def absolute_corpus(text: str, base: Path) -> str:
    """A local corpus glob made absolute against ``base`` (a recipe file's folder)."""
    kind, colon, rest = text.partition(":")
    if colon and kind in ("files", "jsonl", "parquet") and rest:
        glob = rest if kind == "files" else rest.rpartition(":")[0]
        if glob:
            p = Path(glob).expanduser()
            absolute = str(p if p.is_absolute() else base / p)
            return f"{kind}:{absolute}" + ("" if kind == "files" else ":" + rest.rpartition(":")[2])
    return text


# ---- what the weight-role tables can read ---------------------------------------------------------
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok",
            "decoder_sparse_step", "n_shared_experts")
PER_LAYER_KEYS = ("num_key_value_heads", "num_attention_heads", "intermediate_size", "head_dim", "hidden_size")


def check_source_config(cfg: dict[str, Any], where: str) -> None:
    """Refuse a ``config.json`` the weight-role tables cannot read, naming what is supported."""

    def refuse(why: str) -> None:
        raise ValueError(f"source {where}: {why}; supported: {SUPPORTED}")

    mt = cfg.get("model_type")
    if mt not in MODEL_TYPES:
        refuse(f"model_type {mt!r} is not supported")
    if any(cfg.get(k) for k in MOE_KEYS) or "moe" in str(mt):
        refuse("it is a mixture of experts (" + ", ".join(k for k in MOE_KEYS if cfg.get(k)) + ")")
    hetero = [k for k in PER_LAYER_KEYS if isinstance(cfg.get(k), list)]
    if cfg.get("block_configs") is not None:
        hetero.append("block_configs")
    if len(set(cfg.get("layer_types") or [])) > 1:
        hetero.append("layer_types " + "/".join(sorted(set(cfg["layer_types"]))))
    if cfg.get("use_sliding_window"):
        hetero.append("use_sliding_window")
    if hetero:
        refuse("its layers are not all alike (" + ", ".join(hetero) + ")")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default":
        refuse(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported (default RoPE only)")
    if mt == "gpt2":
        act = cfg.get("activation_function", "gelu_new")
        if act != "gelu_new":
            refuse(f"activation_function {act!r} (gelu_new only)")
        return
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        refuse(f"hidden_act {act!r} (silu only)")
    if cfg.get("mlp_bias"):
        refuse("mlp_bias is true")
    if mt in ("llama", "qwen3") and cfg.get("attention_bias"):
        refuse(f"attention_bias is true for {mt}")


def card_license(readme: str) -> str | None:
    """The ``license`` of a model card's YAML front matter (``license_name`` when it says ``other``)."""
    if not readme.startswith("---"):
        return None
    front = readme[3:].split("\n---", 1)[0]
    found = {}
    for line in front.splitlines():
        m = re.match(r"^(license|license_name):\s*(.+?)\s*$", line)
        if m:
            found[m.group(1)] = m.group(2).strip("'\"")
    lic = found.get("license")
    if lic == "other" and found.get("license_name"):
        return found["license_name"]
    return lic or None


def chain_license(manifest: Any) -> str:
    """The licence a chain's inits carry: its source's, as recorded at build (``a0``'s metrics), else the
    recipe's, else the packaged teacher's; chains built before licences were recorded: apache-2.0."""
    a0 = manifest.anchors[0].metrics if manifest.anchors else {}
    recipe = manifest.recipe or {}
    lic = a0.get("license") or (a0.get("source") or {}).get("license") or recipe.get("license")
    if lic:
        return str(lic)
    teacher = TEACHERS.get(recipe.get("source", ""))
    return teacher.license if teacher is not None and teacher.license else "apache-2.0"
