"""A Hugging Face checkpoint folder: weights, config, generation config, tokenizer, model card.

Every artifact carries its recipe: ``recipe.json`` beside the weights and the same JSON in the
safetensors ``__metadata__``. Nothing time- or host-dependent is
written, so the same plan on the same chain gives byte-identical files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from cbd import __version__
from cbd.core.catalog import TOKENIZER_FILES
from cbd.core.files import canonical_json, write_json
from cbd.core.spec import ModelSpec
from cbd.shape import arch
from cbd.tensors.header import DTYPES
from cbd.tensors.pool import BufferPool, pooled
from cbd.tensors.writer import StreamingWriter


def write_weights(folder: Path, spec: ModelSpec, tensors: Iterable[tuple[str, torch.Tensor]], *,
                  dtype: str, recipe: dict, durable: bool = True) -> str:
    """Stream ``tensors`` (in ``arch.param_names`` order) into ``model.safetensors``.

    A tensor may come whole or as consecutive blocks of its rows (``LInit.chunks``).
    ``tensors`` is consumed with a :class:`~cbd.tensors.pool.BufferPool` active, so a lazy producer
    computes into recycled memory and each tensor's memory is reused once the writer has
    written it. The file is fsynced before this returns (``durable=False``: only for benchmarks
    that compare with writers that don't sync). Returns the file's sha256 (hex), computed from the
    bytes as they were written (the file is never read back to hash it).
    """
    tdtype = DTYPES[dtype]
    layout = [(n, tdtype, arch.tensor_shape(spec, n)) for n in arch.param_names(spec)]
    meta = {"format": "pt", "cbd_recipe": canonical_json(recipe), "cbd_version": __version__}
    pool = BufferPool()

    def cast(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == tdtype:
            return t
        out = pool.empty(t.shape, tdtype).copy_(t)
        pool.give(t)  # last use of the float32 tensor (ignored unless the pool lent it)
        return out

    with StreamingWriter(folder / "model.safetensors", layout, meta, durable=durable) as w, pooled(pool):
        w.write_all(((name, cast(t)) for name, t in tensors), written=pool.give)
    return w.sha256


def write_config_files(folder: Path, spec: ModelSpec, *, dtype: str, recipe: dict, tokenizer_src: Path | None,
                       card: str) -> None:
    write_json(folder / "config.json", spec.to_hf_config(dtype=dtype))
    gen = {"bos_token_id": spec.bos_token_id, "eos_token_id": spec.eos_token_id,
           "pad_token_id": spec.pad_token_id, "do_sample": False}
    write_json(folder / "generation_config.json", {k: v for k, v in gen.items() if v is not None} | {"_from_model_config": True})
    write_json(folder / "recipe.json", recipe)
    if tokenizer_src is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_src / name).is_file():
                shutil.copyfile(tokenizer_src / name, folder / name)
    (folder / "README.md").write_text(card)


def _per_block(recipe: dict) -> str:
    alphas = recipe.get("alphas")
    if not alphas:
        return ""
    return ", then per block of layers: " + ", ".join(f"{k} {v:g}" for k, v in alphas.items())


def _card_table(card: dict) -> str:
    """The init card as a table: step-0 loss beside each single anchor's and a random init's."""
    rows = [("**this init**", card["step0_loss"])]
    rows += [(f"`{x['anchor']}` alone (alpha {x['alpha']:g})", x["loss"]) for x in card["single_anchors"].values()]
    rows.append(("random init (transformers' own, seed 0)", card["random_init_loss"]))
    body = "\n".join(f"| {name} | {loss:.4f} |" for name, loss in rows)
    blend = f", blend `{card['blend']}`" if card.get("blend") else ""
    return f"""
## Loss at step 0

Mean next-token loss (nats/token) on the chain's validation batch ({card['validation']['tokens']:,}
tokens of its training text, every corpus of its recipe), before any training; alpha scheme
`{card['alpha_scheme']}`, repair `{card['repair']}`{blend}.

| start | loss |
|---|---|
{body}
"""


def model_card(*, repo_name: str, recipe: dict, base_model: str, license: str = "apache-2.0") -> str:
    """README.md with the YAML front matter the Hub reads and the recipe in the body."""
    t = recipe["target"]
    anchors = "\n".join(f"| `{a['name']}` | {a['shape']} | {a['non_embedding_params']:,} | `{a['sha256'][:16]}` |"
                        for a in recipe["anchors"])
    warnings = "".join(f"\n> **Note:** {w}\n" for w in recipe.get("warnings", []))
    card = _card_table(recipe["card"]) if recipe.get("card") else (
        "\n## Loss at step 0\n\nNot measured: the request said `\"card\": false`.\n"
        if recipe["request"].get("card") is False else "")
    return f"""---
library_name: transformers
license: {license}
base_model: {base_model}
pipeline_tag: text-generation
tags:
- cbd
- linit
- chain-based-distillation
- initialization
---

# {repo_name}

An **initialisation** (not a trained model) of a {t['model_type']} decoder with
{t['num_hidden_layers']} layers, hidden size {t['hidden_size']}, {t['num_attention_heads']} query heads /
{t['num_key_value_heads']} kv heads, FFN {t['intermediate_size']}, vocabulary {t['vocab_size']}
({recipe['num_params']:,} parameters), made by chain-based distillation (CBD, arXiv 2605.07783):
LInit interpolation of the two adjacent anchors of chain `{recipe['chain']}`,
`theta = alpha * Trans(S) + (1 - alpha) * Trans(B)` with **alpha = {recipe['alpha']:.4f}**
({recipe['alpha_source']}){_per_block(recipe)}. Train it further; its loss at step 0 is far below a random init's.
{warnings}
| anchor | shape (L, d, H, G, d_h, f) | non-embedding params | sha256 |
|---|---|---|---|
{anchors}
{card}
Chain source: `{base_model}` (weights de-quantised from its Q4_1 GGUF). Code: cbd {recipe['code_version']}.
The full recipe is in `recipe.json` and in the safetensors metadata (`cbd_recipe`).

```json
{json.dumps(recipe['request'], indent=2, sort_keys=True)}
```
"""

