"""The options ``cbd init`` and ``cbd fetch`` share, and the request they make."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cbd.core.request import InitRequest

Layers = Annotated[int | None, typer.Option("--layers", help="num_hidden_layers")]
Hidden = Annotated[int | None, typer.Option("--hidden", help="hidden_size")]
Heads = Annotated[int | None, typer.Option("--heads", help="num_attention_heads")]
KvHeads = Annotated[int | None, typer.Option("--kv-heads", help="num_key_value_heads")]
Ffn = Annotated[int | None, typer.Option("--ffn", help="intermediate_size")]
SpecFile = Annotated[Path | None, typer.Option("--spec", help="JSON file with a POST /initialize body")]


def request_from(spec: Path | None, layers, hidden, heads, kv_heads, ffn, **extra) -> InitRequest:
    """One InitRequest from a spec file and/or shape flags (flags win)."""
    body = json.loads(spec.read_text()) if spec else {}
    arch = dict(body.get("architecture", {}))
    for k, v in (("num_hidden_layers", layers), ("hidden_size", hidden), ("num_attention_heads", heads),
                 ("num_key_value_heads", kv_heads), ("intermediate_size", ffn)):
        if v is not None:
            arch[k] = v
    body["architecture"] = arch
    body.update({k: v for k, v in extra.items() if v is not None})
    return InitRequest.model_validate(body)
