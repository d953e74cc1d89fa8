"""Alpha calibration: a grid around alpha0 scored by loss on the chain's validation batch."""

from __future__ import annotations

from pathlib import Path

import torch

from cbd.core.manifest import ChainManifest, chain_dir
from cbd.errors import IntegrityError
from cbd.shape.linit import LInit, alpha_grid
from cbd.tensors.reader import LazyReader
from cbd.train.models import state_loss


def validation_batches(manifest: ChainManifest, chains_root: Path | None = None) -> list[torch.Tensor]:
    """The chain's validation tokens (from its training split, never the held-out text)."""
    path = chain_dir(manifest.name, chains_root) / "validation.safetensors"
    if not path.is_file():
        raise IntegrityError(f"chain {manifest.name} has no validation.safetensors: rebuild it to calibrate")
    tokens = LazyReader(path, keep_dtype=True)("tokens").long()
    return list(tokens.split(4))


def calibrate(li: LInit, batches: list[torch.Tensor]) -> tuple[float, dict]:
    """Pick alpha from a grid around alpha0 by validation loss at step 0 (forward passes only)."""
    if li.small is None or li.big is None:
        return li.alpha, {}
    scores = {a: state_loss(li.target, li.state(a), batches) for a in alpha_grid(li.alpha)}
    best = min(scores, key=lambda a: (scores[a], abs(a - li.alpha)))
    return best, {"alpha0": li.alpha, "calibration_loss": {str(a): round(v, 5) for a, v in scores.items()}}
