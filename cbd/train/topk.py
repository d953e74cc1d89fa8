"""The teacher's top-k log-probabilities, cached on disk per step."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from cbd.core.files import publish_file
from cbd.errors import IntegrityError
from cbd.tensors.reader import LazyReader
from cbd.tensors.writer import write_safetensors
from cbd.train.losses import TopK

TOPK_DIR = "teacher_topk"


# ---- teacher top-k cache -----------------------------------------------------------------------
class TopKCache:
    """The teacher's top-k log-probabilities per (step, rows of the global batch), one
    safetensors file each, tagged with k, temperature and a digest of the input ids. Each rank
    writes its own rows, so a cache is found again by a run with the same world size."""

    def __init__(self, root: Path, k: int, temperature: float, rows: tuple[int, int]) -> None:
        self.root, self.k, self.rows = root, k, rows
        self.tag = {"k": str(k), "temperature": repr(float(temperature))}

    def _path(self, step: int) -> Path:
        return self.root / f"step_{step:08d}_rows_{self.rows[0]}-{self.rows[1]}.safetensors"

    def _meta(self, input_ids: Tensor) -> dict[str, str]:
        ids = input_ids.cpu().contiguous().numpy().tobytes()
        return self.tag | {"ids": hashlib.blake2b(ids, digest_size=16).hexdigest()}

    def get(self, step: int, input_ids: Tensor) -> TopK | None:
        """The cached entry, or None when absent, torn, or written for other ids, k or T."""
        path = self._path(step)
        try:
            reader = LazyReader(path, keep_dtype=True)
            if reader.metadata != self._meta(input_ids):
                return None
            return TopK(reader("values").to(input_ids.device), reader("indices").to(input_ids.device))
        except (OSError, IntegrityError):
            return None

    def put(self, step: int, input_ids: Tensor, topk: TopK) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(step)
        tmp = path.with_name(path.name + ".tmp")
        tensors = {"values": topk.values.float().cpu(), "indices": topk.indices.to(torch.int32).cpu()}
        write_safetensors(tmp, tensors, self._meta(input_ids))
        publish_file(tmp, path)
