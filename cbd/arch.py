"""Weight names are data: one table per architecture family.

Each parameter names, per dimension, the axis it lives on and how it touches that axis:

- ``out``  the tensor *writes* the axis (rows of a projection, a bias of its output);
- ``in``   the tensor *reads* the axis (columns of a projection);
- ``norm`` an elementwise norm weight over the axis;
- ``-``    an axis Trans never changes here (vocabulary, head dim, positions).

Axes: ``resid`` (residual width d), ``q`` (query heads, in units of heads), ``kv`` (kv heads),
``ffn`` (FFN neurons), ``vocab``, ``dh`` (head dim), ``pos``. Operators in ``cbd.trans`` look
roles up here; nothing else string-matches weight names (STYLE.md, guideline 6).
"""

from __future__ import annotations

from cbd.spec import ModelSpec

Role = tuple[str, str]  # (axis, io)

LLAMA_GLOBAL: dict[str, tuple[Role, ...]] = {
    "model.embed_tokens.weight": (("vocab", "-"), ("resid", "out")),
    "model.norm.weight": (("resid", "norm"),),
    "lm_head.weight": (("vocab", "-"), ("resid", "in")),
}

LLAMA_LAYER: dict[str, tuple[Role, ...]] = {
    "input_layernorm.weight": (("resid", "norm"),),
    "self_attn.q_proj.weight": (("q", "out"), ("resid", "in")),
    "self_attn.k_proj.weight": (("kv", "out"), ("resid", "in")),
    "self_attn.v_proj.weight": (("kv", "out"), ("resid", "in")),
    "self_attn.o_proj.weight": (("resid", "out"), ("q", "in")),
    "post_attention_layernorm.weight": (("resid", "norm"),),
    "mlp.gate_proj.weight": (("ffn", "out"), ("resid", "in")),
    "mlp.up_proj.weight": (("ffn", "out"), ("resid", "in")),
    "mlp.down_proj.weight": (("resid", "out"), ("ffn", "in")),
}

QWEN2_LAYER_EXTRA: dict[str, tuple[Role, ...]] = {
    "self_attn.q_proj.bias": (("q", "out"),),
    "self_attn.k_proj.bias": (("kv", "out"),),
    "self_attn.v_proj.bias": (("kv", "out"),),
}

QWEN3_LAYER_EXTRA: dict[str, tuple[Role, ...]] = {
    "self_attn.q_norm.weight": (("dh", "-"),),
    "self_attn.k_norm.weight": (("dh", "-"),),
}

# The projections whose output is added to the residual stream: zeroing them turns a block
# into the identity (exact depth expansion, METHOD.md section 2).
LLAMA_BLOCK_OUTPUTS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")

LAYER_PREFIX = "model.layers.{i}."


def layer_table(spec: ModelSpec) -> dict[str, tuple[Role, ...]]:
    if spec.family != "llama":
        raise NotImplementedError(f"Trans supports the llama family; got {spec.model_type!r}")
    table = dict(LLAMA_LAYER)
    if spec.model_type == "qwen2":
        table |= QWEN2_LAYER_EXTRA
    if spec.model_type == "qwen3":
        table |= QWEN3_LAYER_EXTRA
    return table


def global_table(spec: ModelSpec) -> dict[str, tuple[Role, ...]]:
    table = dict(LLAMA_GLOBAL)
    if spec.tie_word_embeddings:
        del table["lm_head.weight"]  # tied: transformed once as the embedding, re-tied on load
    return table


def param_names(spec: ModelSpec) -> list[str]:
    """Every stored tensor name of a checkpoint of this spec, in a fixed order."""
    names = list(global_table(spec))
    for i in range(spec.num_hidden_layers):
        names += [LAYER_PREFIX.format(i=i) + k for k in layer_table(spec)]
    return names


def split_name(name: str) -> tuple[int | None, str]:
    """``model.layers.3.mlp.up_proj.weight`` -> (3, ``mlp.up_proj.weight``)."""
    if name.startswith("model.layers."):
        rest = name[len("model.layers."):]
        i, _, key = rest.partition(".")
        return int(i), key
    return None, name


def axis_size(spec: ModelSpec, axis: str) -> int:
    return {
        "resid": spec.hidden_size, "q": spec.num_attention_heads, "kv": spec.kv_heads,
        "ffn": spec.ffn, "vocab": spec.vocab_size, "dh": spec.head_dim,
    }[axis]


def unit(spec: ModelSpec, axis: str) -> int:
    """Rows per map entry: head axes are mapped in whole heads of ``head_dim`` rows."""
    return spec.head_dim if axis in ("q", "kv") else 1


def tensor_shape(spec: ModelSpec, name: str) -> tuple[int, ...]:
    _, key = split_name(name)
    roles = (layer_table(spec) | global_table(spec) | {"lm_head.weight": LLAMA_GLOBAL["lm_head.weight"]})[key]
    return tuple(axis_size(spec, a) * unit(spec, a) for a, _ in roles)
