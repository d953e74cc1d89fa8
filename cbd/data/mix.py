"""A weighted mix of corpora: token shares, training windows by share, batches with every domain.

The weighting rule (``DataRecipe`` states it for recipe authors):

- weights, normalised to sum 1, are the shares of *tokens* of the training stream;
- a corpus is repeated when its share of a run exceeds its size, at most ``max_epochs`` times over
  ``run_tokens`` (the longest anchor's run): a larger share is cut to ``max_epochs * size /
  run_tokens`` and what it loses goes to the uncapped corpora in proportion to their weights
  (water-filling); when every corpus is capped, the shares are the corpora's sizes;
- training batches are mixed *per row*: row ``g`` of the stream (``step * batch_size + r``) goes to
  the corpus whose cumulative-share interval holds ``frac(phase + g * 0.618...)`` (a golden-ratio
  Weyl sequence, phase from the seed). Over any ``n`` consecutive rows each corpus' share of rows
  is within ``O(log n / n)`` of its share, so even a 40-step run gets its weights, and every batch
  of a few rows holds several domains (a per-batch choice would make each gradient step one
  domain and a short run's shares a coin toss). The window position inside the corpus is random
  by ``(seed, step)``, so batch ``k`` depends only on ``(seed, k)`` and resuming stays exact;
- fixed batches (calibration, validation) give each corpus rows by share, at least one each.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from cbd.data.batches import _check, _windows, eval_batches

GOLDEN = (math.sqrt(5) - 1) / 2  # 0.618...: the most evenly spreading Weyl step


def effective_shares(weights: Mapping[str, float], sizes: Mapping[str, int], *, run_tokens: int,
                     max_epochs: float) -> dict[str, float]:
    """Token shares of the training stream: the weights, each cut to repeat its corpus at most
    ``max_epochs`` times in ``run_tokens`` (the freed share goes to the others by weight)."""
    total = sum(weights.values())
    shares = {n: w / total for n, w in weights.items()}
    if run_tokens <= 0:
        return shares
    cap = {n: max_epochs * sizes[n] / run_tokens for n in weights}
    fixed: dict[str, float] = {}
    while True:
        free = [n for n in weights if n not in fixed]
        if not free:  # the run outgrows every corpus: shares by size, each repeated past the cap
            size = sum(sizes[n] for n in weights)
            return {n: sizes[n] / size for n in weights}
        left, wsum = 1.0 - sum(fixed.values()), sum(weights[n] for n in free)
        over = {n: cap[n] for n in free if left * weights[n] / wsum > cap[n]}
        if not over:
            return {n: fixed.get(n, left * weights[n] / wsum) for n in weights}
        fixed |= over


def epochs(shares: Mapping[str, float], sizes: Mapping[str, int], run_tokens: int) -> dict[str, float]:
    """How many times a run of ``run_tokens`` goes through each corpus at these shares."""
    return {n: shares[n] * run_tokens / sizes[n] for n in shares}


def row_domains(shares: Sequence[float], *, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Index of the corpus of each row of batch ``step`` (golden-ratio sequence over the rows)."""
    cum = np.cumsum(np.asarray(shares, dtype=np.float64))
    cum /= cum[-1]
    phase = np.random.default_rng([seed, 0x5EED]).random()
    g = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.float64)
    u = np.mod(phase + g * GOLDEN, 1.0)
    return np.minimum(np.searchsorted(cum, u, side="right"), len(cum) - 1)


def mixed_train_batches(domains: Sequence[np.ndarray], shares: Sequence[float], *, batch_size: int,
                        seq_len: int, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
    """Endless ``(B, T+1)`` batches, each row a random window of the corpus ``row_domains`` picks."""
    if len(domains) != len(shares) or not domains:
        raise ValueError(f"{len(domains)} token streams for {len(shares)} shares")
    for tokens in domains:
        _check(tokens, batch_size=batch_size, seq_len=seq_len)
    for step in itertools.count(start_step):
        which = row_domains(shares, batch_size=batch_size, seed=seed, step=step)
        rng = np.random.default_rng([seed, step])
        rows = [_windows(domains[d], rng.integers(0, len(domains[d]) - seq_len, size=1), seq_len)
                for d in which]
        yield torch.cat(rows)


def allot_rows(n_rows: int, shares: Sequence[float]) -> list[int]:
    """Rows per corpus for a fixed batch of ``n_rows``: by share (largest remainder), one at least."""
    k = len(shares)
    if n_rows < k:
        raise ValueError(f"{n_rows} rows cannot hold one row of each of {k} corpora")
    total = sum(shares)
    target = [n_rows * s / total for s in shares]
    rows = [max(1, math.floor(t)) for t in target]
    while sum(rows) > n_rows:  # the one-row floors overshot: take from the most over-served
        i = max((i for i in range(k) if rows[i] > 1), key=lambda i: (rows[i] - target[i], -i))
        rows[i] -= 1
    while sum(rows) < n_rows:
        i = max(range(k), key=lambda i: (target[i] - rows[i], -i))
        rows[i] += 1
    return rows


def interleave(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rows of every part dealt in turn (a0 b0 c0 a1 b1 ...), so any run of rows mixes domains."""
    order = sorted(((j / len(p), i, j) for i, p in enumerate(parts) for j in range(len(p))))
    return torch.stack([parts[i][j] for _, i, j in order])


def mixed_fixed_batch(domains: Sequence[np.ndarray], shares: Sequence[float], *, n_rows: int, seq_len: int,
                      seed: int) -> torch.Tensor:
    """``(n_rows, T+1)`` fixed windows, rows by share, each corpus' rows spread over its split."""
    parts = [eval_batches(tokens, batch_size=r, seq_len=seq_len, num_batches=1, seed=seed)[0]
             for tokens, r in zip(domains, allot_rows(n_rows, shares), strict=True)]
    return interleave(parts)
