"""Data-parallel plumbing for `torchrun`: process group, rank helpers, gradient all-reduce.

Under `torchrun --nproc_per_node N` (or `accelerate launch`, which sets the same variables)
every rank holds a full model, trains on its own share of the batches, and gradients are
summed with one bucketed all-reduce per optimizer step, which is what DistributedDataParallel
does, done by hand: the same code path then serves every adapter type (prompt tuning,
hooks, frozen layers) with no wrapper module in the way. With `fsdp=true` the model is
sharded in place with FSDP2 (`fully_shard`), which reduces gradients itself.
gloo on CPU, NCCL on CUDA. Simplified on purpose: no gradient/compute overlap.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init() -> torch.device:
    """Start the process group when launched by torchrun; return this rank's device."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size() > 1 and not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return device


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def is_main() -> bool:
    return rank() == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if active():
        dist.barrier()


def sum_scalar(value: float, device: torch.device) -> float:
    """Sum a number over ranks."""
    if not active():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over ranks in one flat buffer per dtype."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        offset = 0
        for g in group:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def shard_fsdp(model: torch.nn.Module) -> None:
    """Shard each decoder block, then the whole model, with FSDP2 (in place)."""
    from torch.distributed.fsdp import fully_shard

    blocks = [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block"))]
    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def cleanup() -> None:
    if active():
        dist.destroy_process_group()
