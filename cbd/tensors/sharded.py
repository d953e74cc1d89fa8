"""A Hugging Face checkpoint's weights, one file or sharded (``model.safetensors.index.json``), read
lazily one tensor at a time (each shard through a ``LazyReader``, opened on first need)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cbd.errors import IntegrityError
from cbd.tensors.reader import LazyReader

INDEX = "model.safetensors.index.json"


class CheckpointReader:
    """``reader(name)``: one float32 tensor; ``keys()``: every stored name. Shards open lazily."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise IntegrityError(f"{index}: not a safetensors index ({exc})") from None
            self._where = {str(k): str(v) for k, v in weight_map.items()}
            for shard in set(self._where.values()):
                if Path(shard).name != shard or not (self.folder / shard).is_file():
                    raise IntegrityError(f"{index} names shard {shard!r}, which is not a file of {self.folder}")
        else:
            single = LazyReader(self.folder / "model.safetensors")
            self._where = dict.fromkeys(single.keys(), "model.safetensors")
            self._open = {"model.safetensors": single}
            return
        self._open: dict[str, LazyReader] = {}

    def keys(self) -> list[str]:
        return list(self._where)

    def shards(self) -> list[str]:
        return sorted(set(self._where.values()))

    def __call__(self, name: str) -> torch.Tensor:
        shard = self._where.get(name)
        if shard is None:
            raise IntegrityError(f"{self.folder}: no tensor {name!r}")
        if shard not in self._open:
            self._open[shard] = LazyReader(self.folder / shard)
        return self._open[shard](name)
