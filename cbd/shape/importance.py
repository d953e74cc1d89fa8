"""Importance scores on a small calibration batch (Minitron-style, docs/method.md §3).

- residual channel: mean |x| of the residual stream, summed over every block input and the
  final norm input;
- block: ``1 - cos(x_in, x_out)`` averaged over tokens (a block that barely turns the residual
  stream matters least);
- query head: mean L2 norm of the head's contribution to the residual stream (its slice of
  the attention output times its output-projection columns); a kv group scores the sum of its
  heads (GPT-2: every head is its own group);
- FFN neuron: mean |act(gate) * up| (GPT-2: mean |gelu(c_fc x)|) times the L2 norm of its
  down-projection column (GPT-2: its ``c_proj`` row; Conv1D stores ``[in, out]``).

Both families are read through :func:`_modules`, the one place that knows their module names.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from cbd.core.spec import ModelSpec


def _modules(model: PreTrainedModel, spec: ModelSpec):
    """(blocks, [(attn out-proj, its weight as (d, H, dh))], [(FFN down-proj, neuron norms)], final norm)."""
    _, d, H, _, dh, _ = spec.shape
    if spec.family == "gpt2":
        blocks = model.transformer.h
        attn = [(b.attn.c_proj, b.attn.c_proj.weight.view(H, dh, d).permute(2, 0, 1)) for b in blocks]
        ffn = [(b.mlp.c_proj, b.mlp.c_proj.weight.float().norm(dim=1)) for b in blocks]
        return blocks, attn, ffn, model.transformer.ln_f
    blocks = model.model.layers
    attn = [(b.self_attn.o_proj, b.self_attn.o_proj.weight.view(d, H, dh)) for b in blocks]
    ffn = [(b.mlp.down_proj, b.mlp.down_proj.weight.float().norm(dim=0)) for b in blocks]
    return blocks, attn, ffn, model.model.norm


@torch.no_grad()
def importance(model: PreTrainedModel, spec: ModelSpec, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    L, d, H, _, dh, f = spec.shape
    scores = {"resid": torch.zeros(d), "block": torch.zeros(L), "q": torch.zeros(L, H), "ffn": torch.zeros(L, f)}
    hooks = []
    blocks, attn, ffn, final_norm = _modules(model, spec)

    def block_hook(i):
        def fn(mod, args, kwargs, out):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = out[0] if isinstance(out, tuple) else out
            scores["resid"].add_(x_in.abs().float().mean((0, 1)))
            cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
            scores["block"][i] = float((1 - cos).mean())
        return fn

    def o_hook(i, w):  # w: (d, H, dh)
        def fn(mod, args):
            a = args[0].float().view(*args[0].shape[:-1], H, dh)  # (B, T, H, dh)
            contrib = torch.einsum("bthk,dhk->bthd", a, w.float())
            scores["q"][i] = contrib.norm(dim=-1).mean((0, 1))
        return fn

    def down_hook(i, col_norm):
        def fn(mod, args):
            scores["ffn"][i] = args[0].abs().float().mean((0, 1)) * col_norm
        return fn

    def final_hook(mod, args):
        scores["resid"].add_(args[0].abs().float().mean((0, 1)))

    for i, block in enumerate(blocks):
        hooks.append(block.register_forward_hook(block_hook(i), with_kwargs=True))
        hooks.append(attn[i][0].register_forward_pre_hook(o_hook(i, attn[i][1])))
        hooks.append(ffn[i][0].register_forward_pre_hook(down_hook(i, ffn[i][1])))
    hooks.append(final_norm.register_forward_pre_hook(final_hook))
    try:
        model(batch)
    finally:
        for h in hooks:
            h.remove()
    return scores
