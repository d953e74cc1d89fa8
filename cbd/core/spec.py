"""Model shapes: one validated, frozen description of a decoder-only LM.

Torch-free (the web process imports it). Field names follow transformers' config names so a
spec converts to and from ``config.json`` without a renaming table. Derived sizes (head dim,
parameter counts) are computed here and nowhere else (litgpt's ``Config.__post_init__``).

>>> s = ModelSpec(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
...               num_key_value_heads=2, intermediate_size=512, vocab_size=49152)
>>> s.head_dim, s.kv_group_size
(64, 2)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cbd.errors import ShapeError

ModelType = Literal["llama", "qwen2", "qwen3", "gpt2"]
MODEL_TYPES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "gpt2")

# Upper bounds: far above anything a CPU could build, low enough to refuse absurd requests
# (a 10^9-layer model would otherwise be planned before failing on memory).
MAX_LAYERS = 256
MAX_HIDDEN = 16384
MAX_HEADS = 256
MAX_HEAD_DIM = 512
MAX_FFN = 65536
MAX_VOCAB = 1 << 20
MAX_POSITIONS = 1 << 17

ARCHITECTURE_CLASS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


class ModelSpec(BaseModel):
    """Shape sigma = (L, d, H, G, d_h, f, V) plus the family's fixed choices."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_type: ModelType = "llama"
    num_hidden_layers: int = Field(ge=1, le=MAX_LAYERS)
    hidden_size: int = Field(ge=1, le=MAX_HIDDEN)
    num_attention_heads: int = Field(ge=1, le=MAX_HEADS)
    # Optional in the input, concrete after validation: filled from heads and hidden size.
    num_key_value_heads: int = Field(ge=1, le=MAX_HEADS)
    head_dim: int = Field(ge=2, le=MAX_HEAD_DIM)
    intermediate_size: int = Field(ge=1, le=MAX_FFN)
    vocab_size: int = Field(ge=2, le=MAX_VOCAB)
    max_position_embeddings: int = Field(default=2048, ge=1, le=MAX_POSITIONS)
    tie_word_embeddings: bool = True
    rope_theta: float = Field(default=10000.0, gt=0)
    norm_eps: float = Field(default=1e-5, gt=0, lt=1)
    bos_token_id: int | None = Field(default=None, ge=0)
    eos_token_id: int | None = Field(default=None, ge=0)
    pad_token_id: int | None = Field(default=None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        heads = data.get("num_attention_heads")
        hidden = data.get("hidden_size")
        gpt2 = data.get("model_type") == "gpt2"
        if data.get("num_key_value_heads") is None and isinstance(heads, int):
            data["num_key_value_heads"] = heads
        if data.get("head_dim") is None and isinstance(heads, int) and isinstance(hidden, int) and heads > 0:
            if hidden % heads:
                raise ShapeError(
                    f"hidden_size {hidden} is not divisible by num_attention_heads {heads}; "
                    f"pick heads from {_divisors(hidden)} or give head_dim explicitly",
                    allowed={"num_attention_heads": _divisors(hidden)},
                )
            data["head_dim"] = hidden // heads
        if data.get("intermediate_size") is None and isinstance(hidden, int):
            data["intermediate_size"] = 4 * hidden if gpt2 else _llama_ffn(hidden)
        return data

    @model_validator(mode="after")
    def _check_divisibility(self) -> ModelSpec:
        h, g = self.num_attention_heads, self.num_key_value_heads
        if h % g:
            raise ShapeError(
                f"num_attention_heads {h} is not divisible by num_key_value_heads {g}; "
                f"kv heads must be one of {_divisors(h)}",
                allowed={"num_key_value_heads": _divisors(h)},
            )
        if self.head_dim % 2 and self.model_type != "gpt2":
            raise ShapeError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.model_type == "gpt2":
            if g != h:
                raise ShapeError(f"gpt2 has no grouped-query attention: kv heads {g} != heads {h}")
            if self.head_dim * h != self.hidden_size:
                raise ShapeError(
                    f"gpt2 needs head_dim*heads == hidden_size, got {self.head_dim}*{h} != "
                    f"{self.hidden_size}"
                )
        for name, tid in (("bos", self.bos_token_id), ("eos", self.eos_token_id),
                          ("pad", self.pad_token_id)):
            if tid is not None and tid >= self.vocab_size:
                raise ShapeError(f"{name}_token_id {tid} is outside vocab_size {self.vocab_size}")
        return self

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def family(self) -> str:
        """'gpt2' or 'llama' (llama, qwen2 and qwen3 share one weight layout)."""
        return "gpt2" if self.model_type == "gpt2" else "llama"

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def kv_group_size(self) -> int:
        """Query heads per kv head."""
        return self.num_attention_heads // self.kv_heads

    @property
    def ffn(self) -> int:
        return self.intermediate_size

    @property
    def attention_bias(self) -> bool:
        return self.model_type in ("qwen2", "gpt2")

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        """(L, d, H, G, d_h, f): the axes Trans acts on."""
        return (self.num_hidden_layers, self.hidden_size, self.num_attention_heads,
                self.kv_heads, self.head_dim, self.ffn)

    def layer_params(self) -> int:
        d, h, g, dh, f = self.hidden_size, self.num_attention_heads, self.kv_heads, self.head_dim, self.ffn
        if self.family == "gpt2":
            return 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        n = d * h * dh + 2 * d * g * dh + h * dh * d + 3 * d * f + 2 * d
        if self.model_type == "qwen2":
            n += h * dh + 2 * g * dh
        if self.model_type == "qwen3":
            n += 2 * dh
        return n

    def non_embedding_params(self) -> int:
        """Parameters outside token/position embeddings and the LM head (the size CBD scales)."""
        final_norm = 2 * self.hidden_size if self.family == "gpt2" else self.hidden_size
        return self.num_hidden_layers * self.layer_params() + final_norm

    def num_params(self) -> int:
        """Exactly what ``sum(p.numel() for p in model.parameters())`` reports in transformers."""
        n = self.non_embedding_params() + self.vocab_size * self.hidden_size
        if self.family == "gpt2":
            n += self.max_position_embeddings * self.hidden_size
        if not self.tie_word_embeddings:
            n += self.vocab_size * self.hidden_size
        return n

    def with_shape(self, **shape: Any) -> ModelSpec:
        """A copy with some shape fields replaced, validated again (head_dim re-derived)."""
        data = self.model_dump()
        if "hidden_size" in shape or "num_attention_heads" in shape:
            data["head_dim"] = None
        if "num_attention_heads" in shape and "num_key_value_heads" not in shape:
            data["num_key_value_heads"] = None
        data.update(shape)
        return make_spec(data)

    # ---- transformers configs ---------------------------------------------------------------
    def to_hf_config(self, *, dtype: str = "float32") -> dict[str, Any]:
        """A ``config.json`` dict that transformers 5.x and 4.57 read identically.

        5.x keeps the RoPE base only in ``rope_parameters``; 4.57 would silently fall back to
        10000 without a top-level ``rope_theta`` (tests/test_compat_457.py loads both), so both are written.
        """
        common = {
            "architectures": [ARCHITECTURE_CLASS[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": dtype,
            "dtype": dtype,
            "use_cache": True,
        }
        if self.family == "gpt2":
            return common | {
                "n_layer": self.num_hidden_layers, "n_embd": self.hidden_size,
                "n_head": self.num_attention_heads, "n_inner": self.ffn,
                "n_positions": self.max_position_embeddings,
                "n_ctx": self.max_position_embeddings,
                "activation_function": "gelu_new", "layer_norm_epsilon": self.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            }
        cfg = common | {
            "num_hidden_layers": self.num_hidden_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.ffn,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
        }
        if self.model_type == "llama":
            cfg |= {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
        if self.model_type in ("qwen2", "qwen3"):
            cfg |= {"use_sliding_window": False, "sliding_window": None,
                    "max_window_layers": self.num_hidden_layers}
        if self.model_type == "qwen3":
            cfg |= {"attention_bias": False}
        return cfg

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelSpec:
        """Read a transformers ``config.json`` dict (either major version)."""
        mt = cfg.get("model_type", "llama")
        if mt not in MODEL_TYPES:
            raise ShapeError(f"model_type {mt!r} is not supported", allowed=list(MODEL_TYPES))
        ids = {k: _first_id(cfg.get(k)) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        if mt == "gpt2":
            return make_spec({
                "model_type": "gpt2", "num_hidden_layers": cfg["n_layer"],
                "hidden_size": cfg["n_embd"], "num_attention_heads": cfg["n_head"],
                "intermediate_size": cfg.get("n_inner") or 4 * cfg["n_embd"],
                "vocab_size": cfg["vocab_size"], "max_position_embeddings": cfg["n_positions"],
                "tie_word_embeddings": cfg.get("tie_word_embeddings", True),
                "norm_eps": cfg.get("layer_norm_epsilon", 1e-5), **ids,
            })
        rope = cfg.get("rope_parameters") or {}
        return make_spec({
            "model_type": mt,
            "num_hidden_layers": cfg["num_hidden_layers"],
            "hidden_size": cfg["hidden_size"],
            "num_attention_heads": cfg["num_attention_heads"],
            "num_key_value_heads": cfg.get("num_key_value_heads"),
            "head_dim": cfg.get("head_dim"),
            "intermediate_size": cfg["intermediate_size"],
            "vocab_size": cfg["vocab_size"],
            "max_position_embeddings": cfg.get("max_position_embeddings", 2048),
            "tie_word_embeddings": cfg.get("tie_word_embeddings", False),
            "rope_theta": rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
            "norm_eps": cfg.get("rms_norm_eps", 1e-6),
            **ids,
        })


def make_spec(data: dict[str, Any]) -> ModelSpec:
    """Validate ``data`` into a spec; pydantic's errors become one ``ShapeError`` with numbers."""
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as exc:
        shape_errors = [e for e in exc.errors() if isinstance(e.get("ctx", {}).get("error"), ShapeError)]
        if shape_errors:
            raise shape_errors[0]["ctx"]["error"] from None
        parts = [f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']} (got {e.get('input')!r})"
                 for e in exc.errors()]
        raise ShapeError("invalid model shape: " + "; ".join(parts)) from None


def _llama_ffn(hidden: int) -> int:
    """Llama's default SwiGLU width: 8/3 * d rounded up to a multiple of 64."""
    return max(64, -(-int(8 * hidden / 3) // 64) * 64)


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0][:32]


def _first_id(v: Any) -> int | None:
    if isinstance(v, list):
        return v[0] if v else None
    return v
