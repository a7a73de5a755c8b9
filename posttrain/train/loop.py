"""The one training loop, shared by every method.

A method hands over a `Job`: the model, how to plan and collate its batches, and a loss
function "batch -> (summed loss, metrics)" with a count of the units the loss is summed over
(target tokens for SFT, pairs for DPO). The loop does the rest: AdamW (fused when
available), warm-up then cosine/linear/constant learning rate, gradient accumulation
normalised by the total units of the whole step (across micro-batches and ranks, not a mean
of means), clipping, bf16 autocast on CUDA, eval, atomic checkpoints, exact resume,
Ctrl-C, progress and metrics.

Under torchrun the gradients are summed over ranks by `dist.sum_gradients`, or, with
`fsdp=true`, the model is sharded with FSDP2 here, before the optimizer is built (so the
optimizer holds the shards), and FSDP reduce-scatters the gradients itself. Checkpoints and
`final/` are then written from full tensors gathered onto rank 0, and resuming scatters them
back, so checkpoints hold full tensors either way (under FSDP the optimizer state is keyed
by parameter name instead of index). Every FSDP rank must run the same forwards: evaluation
pads the shorter ranks with a spare batch, and Ctrl-C writes no checkpoint (the ranks may be
stopped in the middle of different collectives).

Simplified on purpose: one optimizer (AdamW), the schedule is a pure function of the step,
and the data order a pure function of (seed, epoch), so resuming needs only counters (plus
the tensors a method with state between steps hands over: `Job.state` / `Job.load_state`).
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.config import TrainConfig
from posttrain.errors import UserError
from posttrain.io import atomic_dir
from posttrain.train import checkpoint, dist
from posttrain.train.tracking import Tracker

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class Job:
    """What a method gives the loop."""

    model: torch.nn.Module
    plan: Callable[[int], list[Any]]  # epoch -> batch specs, deterministic in (seed, epoch)
    collate: Callable[[Any], Batch]  # batch spec -> tensors on CPU
    loss: LossFn  # (model, batch) -> (loss summed over units, metrics averaged per unit)
    units: Callable[[Batch], int]  # units the loss is summed over (target tokens, pairs)
    tokens: Callable[[Batch], int]  # real (non-padding) tokens, for throughput
    save_final: Callable[[torch.nn.Module, Path], None]
    eval_specs: list[Any] | None = None  # eval batch specs
    eval_collate: Callable[[Any], Batch] | None = None  # eval spec -> tensors
    trainable: Callable[[torch.nn.Module], dict[str, torch.Tensor]] | None = None
    load_trainable: Callable[[torch.nn.Module, dict[str, torch.Tensor]], None] | None = None
    # Methods with state between steps (GRPO's sampler and rollout): metrics the method adds at
    # the end of each step, and its tensors as of the last finished step, saved per rank in
    # checkpoints and handed back on resume.
    after_step: Callable[[], dict[str, float]] | None = None
    state: Callable[[], dict[str, torch.Tensor]] | None = None
    load_state: Callable[[dict[str, torch.Tensor]], None] | None = None


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then the schedule."""
    warmup = int(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.schedule == "linear":
        return cfg.lr * max(0.0, 1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def total_steps(cfg: TrainConfig, micro_per_epoch: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum))


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over all tensors: several times faster on CPU too) when every
    parameter is a plain floating tensor on one device type; sharded (DTensor) ones use foreach."""
    plain = all(type(p) is torch.nn.Parameter and p.is_floating_point() for p in params)
    fused = bool(params) and plain and len({p.device.type for p in params}) == 1
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


class Loop:
    """State of one run: model, optimizer, counters. `run()` trains to the end."""

    def __init__(self, job: Job, cfg: TrainConfig, device: torch.device):
        self.job, self.cfg, self.device = job, cfg, device
        self.model = job.model
        self.rank, self.world = dist.rank(), dist.world_size()
        self.fsdp = cfg.fsdp and self.world > 1
        if cfg.fsdp and self.world == 1 and dist.is_main():
            print("fsdp=true: one process, nothing to shard; training unsharded", file=sys.stderr)
        if self.fsdp:
            if cfg.adapter == "qlora":
                raise UserError("fsdp=true cannot shard a 4-bit (qlora) model; set fsdp=false")
            dist.shard_fsdp(self.model)  # before the optimizer: it must hold the shards
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg)
        self.out = Path(cfg.output_dir)
        self.micro_per_epoch = len(job.plan(0)) // self.world
        if self.micro_per_epoch == 0:
            raise ValueError("fewer batches than ranks")
        self.total = total_steps(cfg, self.micro_per_epoch)
        self.step = 0  # optimizer steps done
        self.micro = 0  # micro-batches consumed (global position in the data stream)
        self._plan_cache: tuple[int, list[Any]] | None = None
        self.tracker = Tracker(self.out, cfg, self.total) if dist.is_main() else None

    # --------------------------------------------------------------------------- data

    def spec(self, micro: int) -> Any:
        epoch, index = divmod(micro, self.micro_per_epoch)
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            self._plan_cache = (epoch, self.job.plan(epoch))
        return self._plan_cache[1][index * self.world + self.rank]

    def to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def autocast(self):
        if self.device.type == "cuda" and self.cfg.dtype in ("auto", "bfloat16"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --------------------------------------------------------------------------- steps

    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches; returns its metrics."""
        batches = [self.job.collate(self.spec(self.micro + i)) for i in range(self.cfg.grad_accum)]
        units = [self.job.units(b) for b in batches]
        total_units = dist.sum_scalar(sum(units), self.device)
        lr = lr_at(self.step, self.total, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss_sum, sums, tokens = 0.0, {}, 0
        for batch, n in zip(batches, units):
            batch = self.to_device(batch)
            with self.autocast():
                loss, metrics = self.job.loss(self.model, batch)
            (loss / max(total_units, 1.0)).backward()
            loss_sum += loss.item()
            tokens += self.job.tokens(batch)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * n
        if self.world > 1 and not self.fsdp:  # FSDP has reduce-scattered them in backward
            dist.sum_gradients(self.params)
        grad_norm = self.clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.micro += self.cfg.grad_accum
        self.step += 1
        total_loss = dist.sum_scalar(loss_sum, self.device)
        out = {"loss": total_loss / max(total_units, 1.0), "lr": lr, "grad_norm": grad_norm}
        out.update({k: v / max(sum(units), 1) for k, v in sums.items()})
        out["tokens"] = dist.sum_scalar(tokens, self.device)
        if self.job.after_step:
            out.update(self.job.after_step())
        return out

    def clip(self) -> float:
        if self.cfg.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.params if p.grad is not None]
            )
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor built from the shards' norms
            norm = norm.full_tensor()
        return float(norm)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss (and the method's metrics) over the eval set: sums over units, then divided."""
        specs = self.job.eval_specs or []
        self.model.eval()
        loss_sum, units, sums = 0.0, 0, {}
        mine = specs[self.rank :: self.world]
        # FSDP ranks all-gather weights together: every rank runs the same number of forwards
        rounds = -(-len(specs) // self.world) if self.fsdp else len(mine)
        for i in range(rounds):
            spare = i >= len(mine)
            batch = self.to_device(self.job.eval_collate(specs[0] if spare else mine[i]))
            with self.autocast():
                loss, metrics = self.job.loss(self.model, batch)
            if spare:
                continue
            n = self.job.units(batch)
            loss_sum, units = loss_sum + loss.item(), units + n
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * n
        total = max(dist.sum_scalar(units, self.device), 1.0)
        out = {"eval_loss": dist.sum_scalar(loss_sum, self.device) / total}
        for k, v in sorted(sums.items()):
            out[f"eval_{k}"] = dist.sum_scalar(v, self.device) / total
        return out

    # --------------------------------------------------------------------------- state

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Trainable parameters by name; under FSDP full tensors on rank 0 ({} elsewhere)."""
        if self.job.trainable:
            state = self.job.trainable(self.model)
        else:
            state = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        return dist.full_state(self.model, state.keys()) if self.fsdp else state

    def save_checkpoint(self) -> None:
        state = self.trainable_state()
        if self.fsdp:
            optimizer_state = dist.full_optimizer_state(self.model, self.optimizer)
        else:
            optimizer_state = self.optimizer.state_dict() if dist.is_main() else {}
        rngs = dist.gather_objects(checkpoint.rng_state())
        jobs = dist.gather_objects(self.job.state()) if self.job.state else None
        if dist.is_main():
            loop_state = {"micro": self.micro, "total": self.total}
            keep = self.cfg.keep_checkpoints
            checkpoint.save(
                self.out, self.step, state, optimizer_state, loop_state, keep, rngs, jobs
            )
        dist.barrier()

    def resume(self) -> bool:
        """Continue from the newest complete checkpoint, if any."""
        path = checkpoint.latest(self.out)
        if path is None:
            return False
        params, optimizer_state, state = checkpoint.load(path, self.rank)
        if self.fsdp:
            self.load_sharded(params, optimizer_state)
        else:
            self.optimizer.load_state_dict(optimizer_state)
            if self.job.load_trainable:
                self.job.load_trainable(self.model, params)
            else:
                named = dict(self.model.named_parameters())
                with torch.no_grad():
                    for name, value in params.items():
                        named[name].copy_(value)
        self.step, self.micro = state["step"], state["micro"]
        if self.job.load_state:
            self.job.load_state(checkpoint.load_job_state(path, self.rank))
        return True

    def load_sharded(self, params: dict[str, torch.Tensor], optimizer_state: dict) -> None:
        """FSDP resume: every rank read the same full tensors; each keeps its own shards."""
        if self.job.trainable:
            names = set(self.job.trainable(self.model))
        else:
            names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if set(params) != names:
            first = sorted(names ^ set(params))[0]
            raise UserError(f"checkpoint does not match the model at {first} (adapter changed?)")
        dist.load_full_state(self.model, params)
        dist.load_full_optimizer_state(self.model, self.optimizer, optimizer_state)

    # --------------------------------------------------------------------------- run

    def run(self) -> dict[str, float]:
        """Train to `total` steps; returns the last logged metrics (and eval)."""
        resumed = self.resume()
        if self.tracker:
            self.tracker.start(self.step, resumed)
        last: dict[str, float] = {}
        try:
            last = self._train()
        except KeyboardInterrupt:
            self.optimizer.zero_grad(set_to_none=True)
            if not self.fsdp:
                self.save_checkpoint()
            if self.tracker:
                self.tracker.close()
            if dist.is_main() and self.fsdp:
                print(
                    "stopped; fsdp writes no checkpoint on Ctrl-C: re-run to resume from the last one"
                )
            elif dist.is_main():
                print(f"checkpoint saved at step {self.step}; re-run the same command to resume")
            raise
        if self.tracker:
            self.tracker.close()
        return last

    def _train(self) -> dict[str, float]:
        cfg, last = self.cfg, {}
        window_tokens, window_start = 0.0, time.perf_counter()
        while self.step < self.total:
            metrics = self.train_step()
            window_tokens += metrics.pop("tokens")
            if self.tracker:
                self.tracker.progress(self.step, metrics)
            if self.step % cfg.log_every == 0 or self.step == self.total:
                elapsed = time.perf_counter() - window_start
                metrics["tokens_per_s"] = window_tokens / max(elapsed, 1e-9)
                metrics["epoch"] = self.micro / (self.micro_per_epoch * 1.0)
                last = self.log(metrics)
                window_tokens, window_start = 0.0, time.perf_counter()
            if self.should(cfg.eval_every) and self.job.eval_specs:
                last.update(self.log(self.evaluate()))
            if self.should(cfg.save_every):
                self.save_checkpoint()
        return last

    def should(self, every: int) -> bool:
        return self.step == self.total or (every > 0 and self.step % every == 0)

    def log(self, metrics: dict[str, float]) -> dict[str, float]:
        record = {"step": self.step, **{k: round(float(v), 6) for k, v in metrics.items()}}
        if self.tracker:
            self.tracker.log(record)
        return record

    def finish(self) -> None:
        """Write `final/` atomically (main rank) from the trained model.

        Under FSDP every rank first helps gather the full state dict onto rank 0, which then
        saves the model with `state_dict()` answering those full tensors instead of shards.
        """
        full = dist.full_state(self.model) if self.fsdp else None
        if dist.is_main():
            with contextlib.ExitStack() as stack:
                tmp = stack.enter_context(atomic_dir(self.out / "final"))
                if full is not None:
                    stack.enter_context(dist.state_dict_override(self.model, full))
                self.job.save_final(self.model, tmp)
        dist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
