"""Importance scores on a small calibration batch (Minitron-style, METHOD.md section 2).

- residual channel: mean |x| of the residual stream, summed over every block input and the
  final norm input;
- block: ``1 - cos(x_in, x_out)`` averaged over tokens (a block that barely turns the residual
  stream matters least);
- query head: mean L2 norm of the head's contribution to the residual stream (its slice of
  the attention output times its ``o_proj`` columns); a kv group scores the sum of its heads;
- FFN neuron: mean |act(gate) * up| times the L2 norm of its ``down_proj`` column.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from cbd.spec import ModelSpec


@torch.no_grad()
def importance(model: PreTrainedModel, spec: ModelSpec, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    L, d, H, _, dh, f = spec.shape
    scores = {"resid": torch.zeros(d), "block": torch.zeros(L), "q": torch.zeros(L, H), "ffn": torch.zeros(L, f)}
    hooks = []
    layers = model.model.layers

    def block_hook(i):
        def fn(mod, args, kwargs, out):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = out[0] if isinstance(out, tuple) else out
            scores["resid"].add_(x_in.abs().float().mean((0, 1)))
            cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
            scores["block"][i] = float((1 - cos).mean())
        return fn

    def o_hook(i, w):
        def fn(mod, args):
            a = args[0].float().view(*args[0].shape[:-1], H, dh)  # (B, T, H, dh)
            contrib = torch.einsum("bthk,dhk->bthd", a, w.float().view(d, H, dh))
            scores["q"][i] = contrib.norm(dim=-1).mean((0, 1))
        return fn

    def down_hook(i, w):
        def fn(mod, args):
            scores["ffn"][i] = args[0].abs().float().mean((0, 1)) * w.float().norm(dim=0)
        return fn

    def final_hook(mod, args):
        scores["resid"].add_(args[0].abs().float().mean((0, 1)))

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(block_hook(i), with_kwargs=True))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(o_hook(i, layer.self_attn.o_proj.weight)))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(down_hook(i, layer.mlp.down_proj.weight)))
    hooks.append(model.model.norm.register_forward_pre_hook(final_hook))
    try:
        model(batch)
    finally:
        for h in hooks:
            h.remove()
    return scores
