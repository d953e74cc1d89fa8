"""bench/study.py on the tiny random chain: the evidence code measures what it claims to."""

from __future__ import annotations

import torch

from bench import study
from cbd.core.manifest import ChainManifest


class RandomTextContext(study.Context):
    """Held-out windows of random token ids inside the random chain's 128-entry vocabulary."""

    def heldout(self, seed: int, *, batches: int = 2, batch_size: int = 2, seq_len: int = 16) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(0, 128, (batch_size, seq_len), generator=g) for _ in range(batches)]


def test_operator_damage_expansions_keep_the_loss_and_removals_are_scored(random_chain: ChainManifest):
    ctx = RandomTextContext(random_chain, ["none"], "none")
    out = study.operator_damage(ctx, "a1", seeds=(0, 1), random_draws=2, log=lambda *_: None)
    rows = out["rows"]
    assert rows[0]["operator"].startswith("none") and rows[0]["delta"] == 0.0
    exact = [r for r in rows if r["selection"] in ("identity", "clone", "zero")]
    assert len(exact) == 6  # identity blocks, heads clone/zero, FFN clone/zero, residual zero+rescale
    for r in exact:
        assert abs(r["delta"]) < 1e-4, r
    copy = next(r for r in rows if r["selection"] == "copy")
    assert abs(copy["delta"]) > 1e-3  # copied blocks do change the function
    removals = [r for r in rows if r["selection"] in ("importance", "least important", "random")]
    assert {r["operator"] for r in removals} == {o for o, _, k in study._operators(ctx.anchor("a1").spec)
                                                 if k == "remove"}
    assert all(r["draws"] == 2 for r in removals if r["selection"] == "random")
    for r in removals:
        assert r["shape"] != out["shape"] and torch.isfinite(torch.tensor(r["mean"]))


def test_tokens_to_reach_interpolates_and_reports_not_reached():
    curve = [(0, 10.0), (100, 6.0), (200, 4.0)]
    assert study.tokens_to_reach(curve, 8.0) == 50.0
    assert study.tokens_to_reach(curve, 5.0) == 150.0
    assert study.tokens_to_reach(curve, 3.0) is None
    assert study.tokens_to_reach(curve, 11.0) == 0.0
