"""Safetensors checkpoints one tensor at a time: read from (sharded) folders, write in shards.

`TensorSource` maps tensor names to shard files and reads one tensor (or just its shape)
at a time through `safetensors.safe_open`, so a merge never holds a whole model.
`ShardWriter` collects output tensors until the next one would pass `max_shard_size`, then
writes that shard; `finish()` names the shards as transformers does
(`model-00001-of-00003.safetensors` + `model.safetensors.index.json`, or one
`model.safetensors`).

Simplified on purpose: safetensors only (no pickled `.bin` checkpoints).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from posttrain.errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20}
UNITS |= {"GIB": 2**30, "TB": 10**12}


def parse_size(size: str | int) -> int:
    """Bytes from 2000000, "500MB", "2GB" or "1GiB" (GB = 10^9 as in transformers)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", str(size))
    if not match or match.group(2).upper() not in UNITS:
        raise UserError(f"max_shard_size must look like 2GB or 500MB, got {size!r}")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


class TensorSource:
    """Tensor names, shapes and single-tensor reads of one model folder's safetensors."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.handles: dict[str, object] = {}
        if (self.folder / INDEX).is_file():
            self.files = json.loads((self.folder / INDEX).read_text())["weight_map"]
        elif (self.folder / SINGLE).is_file():
            self.files = dict.fromkeys(self.open(SINGLE).keys(), SINGLE)
        else:
            raise UserError(
                f"{folder}: no {SINGLE} or {INDEX}; only safetensors checkpoints can be merged"
            )

    def open(self, file: str):
        if file not in self.handles:
            self.handles[file] = safe_open(str(self.folder / file), framework="pt")
        return self.handles[file]

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> list[int]:
        return list(self.open(self.files[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self.open(self.files[name]).get_tensor(name)


class ShardWriter:
    """Write tensors into shards of at most `max_bytes` (a bigger single tensor gets its own)."""

    def __init__(self, folder: str | Path, max_bytes: int):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, str(self.temp_name(len(self.shards))), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def temp_name(self, index: int) -> Path:
        return self.folder / f".shard-{index}.safetensors"

    def finish(self) -> int:
        """Name the shards and write the index; returns the number of shards."""
        self.flush()
        if len(self.shards) == 1:
            self.temp_name(0).rename(self.folder / SINGLE)
            return 1
        weight_map = {}
        for i, names in enumerate(self.shards):
            file = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            self.temp_name(i).rename(self.folder / file)
            weight_map.update(dict.fromkeys(names, file))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return len(self.shards)
