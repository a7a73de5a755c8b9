"""Resumable checkpoints: `checkpoints/step-N/`, written atomically, safetensors only.

A checkpoint holds what is needed to continue bit-exactly: the trainable parameters, the
optimizer state (tensors in safetensors, hyper-parameters in JSON), the RNG states of every
rank (dropout draws differ between ranks) and the loop position (step and micro-batch
counter; the data order is a pure function of the seed and epoch, and the learning rate a
pure function of the step, so neither needs storing), plus any tensors a method keeps between
steps (`job.safetensors`, per rank: e.g. GRPO's sampler generator and its current rollout).
No pickle anywhere.

Tensors are always full (unsharded): under FSDP the loop gathers parameters and optimizer
state onto rank 0 first, and then the optimizer state is keyed by parameter name (FQN)
instead of by index; both layouts flatten to "key.slot" tensors and back.
Simplified on purpose: frozen weights are not saved (they come from the base model), and
every rank restores the same parameters and optimizer state.
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
    optimizer_state: dict,
    loop_state: dict[str, Any],
    keep: int,
    rngs: list[dict[str, Any]] | None = None,
    job_states: list[dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write `checkpoints/step-{step}` atomically and prune all but the newest `keep`.

    `optimizer_state` is an optimizer `state_dict()` (full tensors); `rngs` holds one
    `rng_state()` per rank, in rank order (default: this process's); `job_states` one dict of
    tensors per rank from the method (`Job.state`), or None when it keeps none.
    """
    path = Path(output_dir) / "checkpoints" / f"step-{step}"
    rngs = rngs or [rng_state()]
    with atomic_dir(path) as tmp:
        save_file(_contiguous(params), tmp / "trainable.safetensors")
        opt_tensors, opt_meta = flatten_optimizer(optimizer_state)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        rng = {}
        for rank, state in enumerate(rngs):
            prefix = f"rank{rank}." if rank else ""  # rank 0 keeps the single-process names
            rng.update({prefix + k: v for k, v in state.items() if k != "python"})
        save_file(rng, tmp / "rng.safetensors")
        if job_states is not None:
            save_file(_contiguous(by_rank(job_states)), tmp / "job.safetensors")
        python_rng = [state["python"] for state in rngs]
        state = dict(loop_state, step=step, optimizer=opt_meta, python_rng=python_rng[0])
        if len(rngs) > 1:
            state["python_rng_ranks"] = python_rng
        (tmp / "state.json").write_text(json.dumps(state))
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load(path: Path, rank: int = 0) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Restore this rank's RNG from `path`; return (trainable params, optimizer state_dict,
    loop state). A rank the checkpoint has no RNG for (more ranks now) takes rank 0's."""
    state = json.loads((path / "state.json").read_text())
    optimizer_state = unflatten_optimizer(
        load_file(path / "optimizer.safetensors"), state.pop("optimizer")
    )
    rng = load_file(path / "rng.safetensors")
    python_rng = state.pop("python_rng")
    ranks = state.pop("python_rng_ranks", [python_rng])
    prefix = f"rank{rank}."
    if rank and rank < len(ranks):
        rng = {k[len(prefix) :]: v for k, v in rng.items() if k.startswith(prefix)}
        python_rng = ranks[rank]
    restore_rng(rng, python_rng)
    return load_file(path / "trainable.safetensors"), optimizer_state, state


def by_rank(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One flat dict: rank 0's keys as they are, rank r's prefixed `rank{r}.`."""
    return {(f"rank{r}." if r else "") + k: v for r, s in enumerate(states) for k, v in s.items()}


def load_job_state(path: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    """This rank's `job.safetensors` tensors ({} when the checkpoint has none; a rank the
    checkpoint has nothing for takes rank 0's, as the RNG does)."""
    file = path / "job.safetensors"
    if not file.is_file():
        return {}
    flat = load_file(file)
    prefix = f"rank{rank}."
    mine = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
    if rank and mine:
        return mine
    return {k: v for k, v in flat.items() if not re.match(r"^rank\d+\.", k)}


def flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors ("key.slot") and JSON metadata.

    The state is keyed by parameter index (`optimizer.state_dict()`) or by parameter name
    (FSDP's full optimizer state dict); slot names ("exp_avg", "step") have no dots.
    """
    tensors, scalars = {}, {}
    for key, slots in sd["state"].items():
        for slot, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{key}.{slot}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{key}.{slot}"] = value
    by_name = any(isinstance(key, str) for key in sd["state"])
    meta = {"param_groups": sd["param_groups"], "scalars": scalars, "by_name": by_name}
    return tensors, meta


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int | str, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        key, slot = name.rsplit(".", 1)
        state.setdefault(key if meta.get("by_name") else int(key), {})[slot] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, Any]:
    """This process's RNG states: torch (and CUDA) tensors, plus "python" (JSON-able)."""
    return {**rng_tensors(), "python": random.getstate()}


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor], python_state: list) -> None:
    torch.set_rng_state(tensors["torch"])
    devices = sorted(int(k.split(".", 1)[1]) for k in tensors if k.startswith("cuda."))
    cuda = [tensors[f"cuda.{i}"] for i in devices]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = python_state
    random.setstate((version, tuple(internal), gauss))


def _contiguous(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in params.items()}
