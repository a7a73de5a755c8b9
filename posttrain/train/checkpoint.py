"""Resumable checkpoints: `checkpoints/step-N/`, written atomically, safetensors only.

A checkpoint holds what is needed to continue bit-exactly: the trainable parameters, the
optimizer state (tensors in safetensors, hyper-parameters in JSON), the RNG states and the
loop position (step and micro-batch counter; the data order is a pure function of the seed
and epoch, and the learning rate a pure function of the step, so neither needs storing).
No pickle anywhere. Simplified on purpose: frozen weights are not saved (they come from
the base model), and every rank restores the same state (ranks stay identical).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from posttrain.io import atomic_dir

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp folders are ignored)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / "state.json").is_file()]


def latest(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def save(
    output_dir: str | Path,
    step: int,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    loop_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write `checkpoints/step-{step}` atomically and prune all but the newest `keep`."""
    path = Path(output_dir) / "checkpoints" / f"step-{step}"
    with atomic_dir(path) as tmp:
        save_file(_contiguous(params), tmp / "trainable.safetensors")
        opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file(rng_tensors(), tmp / "rng.safetensors")
        state = dict(loop_state, step=step, optimizer=opt_meta, python_rng=random.getstate())
        (tmp / "state.json").write_text(json.dumps(state))
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load(path: Path, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Restore optimizer and RNG from `path`; return (trainable params, loop state)."""
    state = json.loads((path / "state.json").read_text())
    opt_tensors = load_file(path / "optimizer.safetensors")
    optimizer.load_state_dict(unflatten_optimizer(opt_tensors, state.pop("optimizer")))
    restore_rng(load_file(path / "rng.safetensors"), state.pop("python_rng"))
    return load_file(path / "trainable.safetensors"), state


def flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors ("idx.key") and JSON metadata."""
    tensors, scalars = {}, {}
    for idx, slots in sd["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor], python_state: list) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = python_state
    random.setstate((version, tuple(internal), gauss))


def _contiguous(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in params.items()}
