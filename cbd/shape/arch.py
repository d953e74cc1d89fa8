"""Weight names are data: one table per architecture family.

Each parameter names, per dimension, the axis it lives on and how it touches that axis:

- ``out``  the tensor *writes* the axis (rows of a projection, a bias of its output);
- ``in``   the tensor *reads* the axis (columns of a projection);
- ``norm`` an elementwise norm weight over the axis;
- ``normbias`` a LayerNorm bias over the axis (part of the norm's output, not a writer);
- ``-``    an axis Trans never changes here (vocabulary, head dim, positions).

Axes: ``resid`` (residual width d), ``q`` (query heads, in units of heads), ``kv`` (kv heads),
``qkv`` (GPT-2's fused query, key and value outputs: three blocks of heads, each mapped by the
head map), ``ffn`` (FFN neurons), ``vocab``, ``dh`` (head dim), ``pos`` (learned positions).
Roles are listed in the tensor's own dimension order: ``nn.Linear`` stores ``[out, in]``,
GPT-2's ``Conv1D`` stores ``[in, out]``. Operators in ``cbd.shape.trans`` look roles up here; nothing
else string-matches weight names.
"""

from __future__ import annotations

from dataclasses import dataclass

from cbd.core.spec import ModelSpec

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
# into the identity (exact depth expansion, docs/method.md §3).
LLAMA_BLOCK_OUTPUTS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")

LAYER_PREFIX = "model.layers.{i}."

GPT2_GLOBAL: dict[str, tuple[Role, ...]] = {
    "transformer.wte.weight": (("vocab", "-"), ("resid", "out")),
    "transformer.wpe.weight": (("pos", "-"), ("resid", "out")),
    "transformer.ln_f.weight": (("resid", "norm"),),
    "transformer.ln_f.bias": (("resid", "normbias"),),
    "lm_head.weight": (("vocab", "-"), ("resid", "in")),  # nn.Linear: [vocab, d]
}

# Conv1D weights are [in, out]: the axis read comes first. c_attn fuses q, k, v: [d, 3 * H * dh].
GPT2_LAYER: dict[str, tuple[Role, ...]] = {
    "ln_1.weight": (("resid", "norm"),),
    "ln_1.bias": (("resid", "normbias"),),
    "attn.c_attn.weight": (("resid", "in"), ("qkv", "out")),
    "attn.c_attn.bias": (("qkv", "out"),),
    "attn.c_proj.weight": (("q", "in"), ("resid", "out")),
    "attn.c_proj.bias": (("resid", "out"),),
    "ln_2.weight": (("resid", "norm"),),
    "ln_2.bias": (("resid", "normbias"),),
    "mlp.c_fc.weight": (("resid", "in"), ("ffn", "out")),
    "mlp.c_fc.bias": (("ffn", "out"),),
    "mlp.c_proj.weight": (("ffn", "in"), ("resid", "out")),
    "mlp.c_proj.bias": (("resid", "out"),),
}

# Biases write the residual stream too: an identity block zeroes both.
GPT2_BLOCK_OUTPUTS = ("attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


@dataclass(frozen=True)
class Family:
    """What Trans needs to know about a family beyond its tables.

    ``norm``: ``rms`` (no mean subtracted: new residual channels are zero) or ``layer`` (new
    residual channels carry the mean of the real ones, see ``cbd.shape.trans``).
    """

    global_table: dict[str, tuple[Role, ...]]
    layer_table: dict[str, tuple[Role, ...]]
    block_outputs: tuple[str, ...]
    layer_prefix: str
    norm: str


FAMILIES: dict[str, Family] = {
    "llama": Family(LLAMA_GLOBAL, LLAMA_LAYER, LLAMA_BLOCK_OUTPUTS, LAYER_PREFIX, "rms"),
    "gpt2": Family(GPT2_GLOBAL, GPT2_LAYER, GPT2_BLOCK_OUTPUTS, "transformer.h.{i}.", "layer"),
}


# Parameters indexed by the vocabulary, in every family (what a bridge with train="embeddings" trains)
VOCAB_PARAMS = frozenset(n for f in FAMILIES.values() for n, roles in f.global_table.items() if roles[0][0] == "vocab")


def family(spec: ModelSpec) -> Family:
    return FAMILIES[spec.family]


def layer_table(spec: ModelSpec) -> dict[str, tuple[Role, ...]]:
    table = dict(family(spec).layer_table)
    if spec.model_type == "qwen2":
        table |= QWEN2_LAYER_EXTRA
    if spec.model_type == "qwen3":
        table |= QWEN3_LAYER_EXTRA
    return table


# The output head that ``tie_word_embeddings`` makes one tensor with the input embedding, in every family
TIED_HEAD = "lm_head.weight"


def tied_names(spec: ModelSpec) -> frozenset[str]:
    """Names a checkpoint of ``spec`` does not store: a tied head is the embedding (transformed
    once, as the embedding) and is re-tied on load (``cbd.train.models.load_state``)."""
    return frozenset({TIED_HEAD}) if spec.tie_word_embeddings else frozenset()


def global_table(spec: ModelSpec) -> dict[str, tuple[Role, ...]]:
    tied = tied_names(spec)
    return {n: roles for n, roles in family(spec).global_table.items() if n not in tied}


def block_outputs(spec: ModelSpec) -> tuple[str, ...]:
    """Layer keys whose output is added to the residual stream (zeroed in identity blocks)."""
    return family(spec).block_outputs


def layer_prefix(spec: ModelSpec) -> str:
    """``model.layers.{i}.`` (llama) or ``transformer.h.{i}.`` (gpt2)."""
    return family(spec).layer_prefix


def param_names(spec: ModelSpec) -> list[str]:
    """Every stored tensor name of a checkpoint of this spec, in a fixed order."""
    names = list(global_table(spec))
    prefix, keys = layer_prefix(spec), list(layer_table(spec))
    for i in range(spec.num_hidden_layers):
        names += [prefix.format(i=i) + k for k in keys]
    return names


def split_name(name: str) -> tuple[int | None, str]:
    """``model.layers.3.mlp.up_proj.weight`` -> (3, ``mlp.up_proj.weight``); gpt2's ``transformer.h.3.``."""
    for fam in FAMILIES.values():
        head = fam.layer_prefix.split("{", 1)[0]
        if name.startswith(head):
            i, _, key = name[len(head):].partition(".")
            return int(i), key
    return None, name


def axis_size(spec: ModelSpec, axis: str) -> int:
    return {
        "resid": spec.hidden_size, "q": spec.num_attention_heads, "kv": spec.kv_heads,
        "qkv": 3 * spec.num_attention_heads, "ffn": spec.ffn, "vocab": spec.vocab_size,
        "dh": spec.head_dim, "pos": spec.max_position_embeddings,
    }[axis]


def unit(spec: ModelSpec, axis: str) -> int:
    """Rows per map entry: head axes are mapped in whole heads of ``head_dim`` rows."""
    return spec.head_dim if axis in ("q", "kv", "qkv") else 1


def roles(spec: ModelSpec, name: str) -> tuple[Role, ...]:
    """The (axis, io) of each dimension of parameter ``name``."""
    _, key = split_name(name)
    return (layer_table(spec) | family(spec).global_table)[key]


def tensor_shape(spec: ModelSpec, name: str) -> tuple[int, ...]:
    return tuple(axis_size(spec, a) * unit(spec, a) for a, _ in roles(spec, name))
