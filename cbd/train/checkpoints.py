"""Resumable training state: model and optimiser in safetensors, written atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cbd.core.files import fsync_path, publish_dir, write_json
from cbd.errors import IntegrityError
from cbd.tensors.reader import LazyReader
from cbd.tensors.writer import write_safetensors
from cbd.train.config import RESUME_FREE_FIELDS, DistillConfig
from cbd.train.models import aliases, unique_state

CONFIG_FILE = "distill_config.json"


CKPT_DIR = "checkpoints"


LATEST = "latest.json"


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """AdamW state as tensors named ``state.{param_index}.{name}`` plus a JSON dict of the param
    groups and scalars (AdamW's 0-dim ``step`` goes there, as a number with its dtype)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, Tensor) and value.dim():
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            elif isinstance(value, Tensor):
                scalars[f"{index}.{name}"] = {"value": value.item(), "dtype": str(value.dtype)[6:]}
            else:
                scalars[f"{index}.{name}"] = {"value": value}
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``optimizer_to_flat``: a dict for ``Optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, v in meta["scalars"].items():
        index, name = key.split(".", 1)
        value = torch.tensor(v["value"], dtype=getattr(torch, v["dtype"])) if "dtype" in v else v["value"]
        state.setdefault(int(index), {})[name] = value
    groups = [g | {"betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(work_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> Path:
    """Write ``checkpoints/step_N/`` in a temporary folder, rename it, then point latest.json at it."""
    root = work_dir / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{state['step']:08d}"
    tmp, final = root / f"{name}.tmp", root / name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_safetensors(tmp / "model.safetensors", unique_state(model))  # fsynced by cbd.tensors
    tensors, meta = optimizer_to_flat(opt)
    write_safetensors(tmp / "optimizer.safetensors", tensors)
    write_json(tmp / "state.json", state | {"optimizer": meta})
    publish_dir(tmp, final, replace=True)
    write_json(root / LATEST, {"dir": name, "step": state["step"]})
    fsync_path(root)
    for old in root.glob("step_*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(work_dir: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict | None:
    """Load the latest checkpoint into ``model`` and ``opt``; its state dict, or None if none."""
    latest = work_dir / CKPT_DIR / LATEST
    if not latest.exists():
        return None
    folder = latest.parent / json.loads(latest.read_text())["dir"]
    try:
        state = json.loads((folder / "state.json").read_text())
        weights = LazyReader(folder / "model.safetensors", keep_dtype=True).load_all()
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if set(missing) - aliases(model) or unexpected:
            raise KeyError(
                f"weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        tensors = LazyReader(folder / "optimizer.safetensors", keep_dtype=True).load_all()
        opt.load_state_dict(optimizer_from_flat(tensors, state.pop("optimizer")))
    except (OSError, ValueError, KeyError, RuntimeError, IntegrityError) as exc:
        raise IntegrityError(
            f"checkpoint {folder} is unreadable ({exc}); delete {latest.parent} to start the run over"
        ) from exc
    return state


def check_resumable(saved: dict, cfg: DistillConfig, work_dir: Path) -> None:
    now = cfg.model_dump(mode="json")
    diff = {k: (saved.get(k), v) for k, v in now.items() if k not in RESUME_FREE_FIELDS and saved.get(k) != v}
    if diff:
        raise IntegrityError(
            f"{work_dir} holds a checkpoint of another run (field: (saved, now)) "
            f"{diff}; use a fresh work_dir or the saved config",
            allowed=sorted(diff),
        )
