"""Inits named as Hub repos: ``{chain}/L{layers}-d{hidden}-h{heads}-kv{kv_heads}-f{ffn}[-{dtype}][-{tokenizer}]``.

Torch-free (the web process parses these). A repo id is another spelling of a ``POST /initialize``
body with the defaults for everything the name does not say (calibrated alpha): ``to_request``
builds that body through ``InitRequest``, so a bad shape gets the same validation and messages
as the POST. ``dtype`` is ``fp32`` (the default, left out of canonical names), ``bf16`` or
``fp16``; the tokenizer is the chain's own when absent (or named: the same init). The dtype
suffix is read first, so ``-bf16-gpt2`` is bf16 with the GPT-2 tokenizer.

The repo's commit sha is the init's content id (the plan id, 32 hex) padded with eight zeros to
git's 40 hex digits, so clients treat it as an immutable commit; ``main`` resolves to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from cbd.core.request import Dtype, InitRequest
from cbd.errors import UnknownNameError

DTYPES: dict[str, Dtype] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SHORT = {v: k for k, v in DTYPES.items()}
FORMAT = "{chain}/L{layers}-d{hidden}-h{heads}-kv{kv_heads}-f{ffn}[-{dtype}][-{tokenizer}]"
EXAMPLE = "default/L12-d384-h6-kv2-f1024, tiny/L4-d256-h4-kv2-f512-bf16-gpt2"
NAME_RE = re.compile(r"^L(?P<layers>\d{1,6})-d(?P<hidden>\d{1,7})-h(?P<heads>\d{1,5})-kv(?P<kv>\d{1,5})"
                     r"-f(?P<ffn>\d{1,7})(?:-(?P<rest>.+))?$")
COMMIT_PAD = "0" * 8
COMMIT_RE = re.compile(r"^[0-9a-f]{32}(?:00000000)?$")


@dataclass(frozen=True)
class RepoName:
    chain: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    dtype: Dtype = "float32"
    tokenizer: str | None = None

    def to_request(self) -> InitRequest:
        """The ``POST /initialize`` body this name stands for, validated as the POST validates it."""
        body: dict[str, Any] = {"chain": self.chain, "dtype": self.dtype, "architecture": {
            "num_hidden_layers": self.layers, "hidden_size": self.hidden, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "intermediate_size": self.ffn}}
        if self.tokenizer is not None:
            body["tokenizer"] = self.tokenizer
        try:
            return InitRequest.model_validate(body)
        except ValidationError as e:
            raise invalid(f"{self.repo_id()}: " + "; ".join(_describe(err) for err in e.errors())) from None

    def repo_id(self) -> str:
        return repo_id(self.chain, self.layers, self.hidden, self.heads, self.kv_heads, self.ffn, self.dtype,
                       self.tokenizer)


def invalid(message: str) -> UnknownNameError:
    """A repo id that names no init (malformed, or a body ``POST /initialize`` refuses)."""
    return UnknownNameError(f"{message}. An init's repo id is {FORMAT} (e.g. {EXAMPLE}); dtype is one of "
                                f"{', '.join(DTYPES)}; the tokenizer is a registered tokenizer name (GET /chains "
                                "lists chains, shapes and tokenizers)",
                                allowed={"format": FORMAT, "dtypes": list(DTYPES), "examples": EXAMPLE.split(", ")})


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "architecture")
    return f"{loc}: {err.get('msg')}" if loc else str(err.get("msg"))


def parse(namespace: str, name: str) -> RepoName:
    """``namespace/name`` as a RepoName; UnknownNameError (what is wrong, what is allowed) otherwise."""
    m = NAME_RE.match(name)
    if not m:
        raise invalid(f"{namespace}/{name} is not an init's repo id")
    dtype: Dtype = "float32"
    tokenizer = m["rest"]
    if tokenizer is not None:
        head, _, tail = tokenizer.partition("-")
        if head in DTYPES:
            dtype, tokenizer = DTYPES[head], tail or None
    return RepoName(chain=namespace, layers=int(m["layers"]), hidden=int(m["hidden"]), heads=int(m["heads"]),
                    kv_heads=int(m["kv"]), ffn=int(m["ffn"]), dtype=dtype, tokenizer=tokenizer)


def repo_id(chain: str, layers: int, hidden: int, heads: int, kv_heads: int, ffn: int,
            dtype: str = "float32", tokenizer: str | None = None) -> str:
    """The canonical repo id (no ``-fp32``; no tokenizer part when it is the chain's)."""
    out = f"{chain}/L{layers}-d{hidden}-h{heads}-kv{kv_heads}-f{ffn}"
    if dtype != "float32":
        out += f"-{SHORT[dtype]}"
    return out + (f"-{tokenizer}" if tokenizer else "")


def repo_id_of_plan(plan: dict[str, Any]) -> str | None:
    """The repo id of a plan (as stored in ``artifact.json``); None when the plan lacks a field."""
    try:
        t = plan["target"]
        tokenizer = plan["tokenizer"] if plan.get("bridge_options") is not None else None
        return repo_id(plan["chain"], t["num_hidden_layers"], t["hidden_size"], t["num_attention_heads"],
                       t.get("num_key_value_heads") or t["num_attention_heads"], t["intermediate_size"],
                       plan.get("dtype", "float32"), tokenizer)
    except (KeyError, TypeError):
        return None


def commit_of(artifact_id: str) -> str:
    """The repo's commit sha for an init: its content id, zero-padded to 40 hex digits."""
    return artifact_id + COMMIT_PAD


def artifact_of_commit(revision: str) -> str | None:
    """The content id a commit-like revision names (the 40-hex commit or the 32-hex id), else None."""
    return revision[:32] if COMMIT_RE.match(revision) else None
