"""Data-parallel plumbing for `torchrun`: process group, rank helpers, gradient reduction, FSDP2.

Under `torchrun --nproc_per_node N` (or `accelerate launch`, which sets the same variables)
every rank trains on its own share of the batches and gradients are summed over ranks.
gloo on CPU, NCCL on CUDA.

- Plain data parallel (default): every rank holds a full model and the gradients are summed
  with one bucketed all-reduce per optimizer step, which is what DistributedDataParallel
  does, done by hand: the same code path then serves every adapter type (prompt tuning,
  hooks, frozen layers) with no wrapper module in the way.
- `fsdp=true`: `shard_fsdp` shards the model in place with FSDP2 (`fully_shard`): each
  decoder block is one group and the root (embeddings, final norm, head, and whatever else
  sits outside the blocks) another. Parameters, gradients and optimizer state then live
  as dim-0 shards (DTensors); a block's weights are all-gathered just before it runs and
  freed after, and its gradients are reduce-scattered in backward (after every micro-batch).
  The gradients are *summed*, like the manual all-reduce (our loss is already normalised by
  the step's global unit count); FSDP2 would average them by default. The root keeps its
  full weights from forward until backward, so a loss that reads `lm_head.weight` outside
  the head's forward (the fused LM loss) sees a plain full tensor. `full_state` /
  `load_full_state` (and the optimizer pair) move between shards and full CPU tensors on
  rank 0, for checkpoints and `final/`.

Simplified on purpose: no gradient/compute overlap for plain data parallel; FSDP shards
over all ranks (no hybrid sharding), in the model's own dtype (no mixed-precision policy),
and every rank first loads the full model before it is sharded.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable, Iterator
from typing import Any

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


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """A detached tensor averaged over ranks (itself when not distributed)."""
    if not active():
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / world_size()


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
    """Shard each decoder block, then the rest as the root, with FSDP2 (in place).

    Gradients are reduced as a sum, so the step is the same as plain data parallel's: divide
    factor 1, and plain SUM collectives (a factor alone makes FSDP use PREMUL_SUM, which gloo
    rejects: "Cannot use ReduceOp.PREMUL_SUM with Gloo").
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for block in fsdp_blocks(model):
        fully_shard(block)
    fully_shard(model)  # root: reshard_after_forward defaults to False for it
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def fsdp_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules sharded one by one: the model's `_no_split_modules` classes (the decoder
    blocks, as accelerate reads them), else modules named like `*DecoderLayer` / `*Block`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        ends = ("DecoderLayer", "Block")
        blocks = [m for m in model.modules() if type(m).__name__.endswith(ends)]
    return blocks


def _full(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state(
    model: torch.nn.Module, names: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU tensors of a sharded model: every rank calls, rank 0 gets them.

    `names` picks parameters that require grad (frozen ones are then not gathered at all);
    None gives the whole state dict, with tied parameters sharing one tensor again.
    Other ranks get {}.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    frozen = names is not None
    state = get_model_state_dict(
        model, options=_full(cpu_offload=True, ignore_frozen_params=frozen)
    )
    if not is_main():
        return {}
    if frozen:
        wanted = set(names)
        missing = sorted(wanted - set(state))
        if missing:
            raise RuntimeError(f"fsdp: {missing[0]} is not a trainable parameter")
        return {k: v for k, v in state.items() if k in wanted}
    first: dict[int, str] = {}  # tied weights: one tensor, as in the unsharded model
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in state and id(param) in first:
            state[name] = state[first[id(param)]]
        first.setdefault(id(param), name)
    return state


def load_full_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors (the same on every rank) into a sharded model; keys not given stay."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_full(strict=False))


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict with full CPU tensors keyed by parameter name (FQN); rank 0
    gets it, other ranks {}."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_full(cpu_offload=True))
    return state if is_main() else {}


def load_full_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Load a `full_optimizer_state` (the same on every rank) into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_full())


@contextlib.contextmanager
def state_dict_override(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """While open, `model.state_dict()` returns `state`: save functions that read the state dict
    (transformers' and peft's `save_pretrained`) then write these full tensors, not shards."""
    model.state_dict = lambda *args, **kwargs: dict(state)
    try:
        yield
    finally:
        del model.state_dict


def gather_objects(obj: Any) -> list[Any]:
    """`obj` from every rank, in rank order (a small picklable value; [obj] without torchrun)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if active():
        dist.destroy_process_group()
