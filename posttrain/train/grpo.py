"""Group-relative policy optimisation and its family: `posttrain grpo` (GRPO, RLOO, Dr. GRPO).

For each prompt of a micro-batch the policy samples G = `num_generations` completions with the
rollout sampler (`posttrain.rollout.sampler`: KV cache, temperature/top-p/top-k, stop at EOS or
stop strings, exact sampling log-probs); the reward sources (`reward.fn`, `reward.model`,
`reward.weights`; `posttrain.rollout.rewards`) score them; each completion's advantage comes
from its group (`advantage=grpo|rloo|dr_grpo`); and the loss is the clipped token-level
objective `losses.rl.grpo_loss`, reduced by `loss_aggregation` (sequence = GRPO, token =
DAPO / TRL's default, constant = Dr. GRPO), plus beta x the k3 KL to the reference in the loss
as GRPO defines it (`losses/rl.py` explains what that gradient estimates). The reference is the
policy with its adapter disabled, a frozen copy for full/top_layers/bitfit training, or none
when beta = 0.

How it sits in the one loop (loop.py is unchanged but for three optional Job hooks):
- **One optimizer step = one pass over one rollout batch.** A rollout batch is the prompts of
  one optimizer step (batch_size prompts x grad_accum micro-batches x ranks, G completions
  each). `num_iterations` (GRPO's mu, the PPO epochs) > 1 reuses it for that many consecutive
  optimizer steps; the old log-probs are the sampler's, so the first pass has ratio 1.
- The plan's micro-batch specs are (epoch, rollout, iteration, micro, prompt indices); `collate`
  samples, scores and computes reference log-probs on iteration 0 (all micro-batches of a step
  are collated before its first backward, so they see the same policy) and serves the cached
  rollout on later iterations. Rollout metrics are logged on the steps that sampled.
- Exact resume: the sampler's `torch.Generator` and the current rollout are the job's state as
  of the last finished step (`Job.state`, saved per rank in `checkpoints/step-N/job.safetensors`);
  the prompt order is a pure function of (seed, epoch), like every other method's data.

`batch_size` counts prompts (each brings G completions), `max_prompt_length` and
`max_new_tokens` bound the lengths (`max_length` is not used). Prompts longer than
`max_prompt_length` are counted and cut from the left (`long_prompts=truncate`, as TRL), dropped,
or refused. A reward source that raises, returns the wrong count or NaN stops the run (exit 2)
naming the step, the completion's index in the batch and its data row.

What GRPO shares with `posttrain ppo` (sampling/reward keys, prompt loading, log-probs, the
reference, reward errors, the sampler state) lives in `posttrain.train.online`.

Simplified on purpose: sampling runs on the training model through HF (no vLLM engine), one
sampler call per micro-batch; no minibatch shuffling inside a rollout batch; no masking of
truncated completions or entropy bonus; eval during training is not offered (run
`posttrain eval` on the run); FSDP and prompt/prefix tuning are not supported.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from time import perf_counter
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from posttrain.config import build_config, check, opt
from posttrain.evaluate.generate import device_of
from posttrain.losses.rl import (
    AGGREGATIONS,
    dr_grpo_advantages,
    grpo_advantages,
    grpo_loss,
    kl_k3,
    masked_mean,
    rloo_advantages,
)
from posttrain.modeling.adapters import load_trainable_state, save_model, trainable_state
from posttrain.rollout.sampler import eval_no_grad
from posttrain.train import dist
from posttrain.train.loop import Batch, Job
from posttrain.train.online import (
    OnlineConfig,
    OnlineState,
    StepStats,
    completion_logprobs,
    make_reference,
    make_sampler,
    mean_entropy,
    prompts_and_rewards,
    rollout_batch,
    score_completions,
    unflatten,
)
from posttrain.train.run import begin_run, load_trainable_model, run_job

ADVANTAGES = {"grpo": grpo_advantages, "rloo": rloo_advantages, "dr_grpo": dr_grpo_advantages}
PHASES = ("generate", "score", "reference")  # timed in collate; "train" after it


@dataclass
class GRPOConfig(OnlineConfig):
    """`posttrain grpo`: the shared training keys plus sampling, rewards and the objective."""

    command: ClassVar[str] = "grpo"

    batch_size: int = opt(4, "prompts per micro-batch per device (each with num_generations)")
    num_generations: int = opt(8, "G: completions sampled per prompt (a group)")
    advantage: str = opt("grpo", "group advantages: grpo (mean/std), rloo, dr_grpo (no std)")
    loss_aggregation: str = opt(
        "token", "sequence (GRPO), token (DAPO, TRL's default), constant (Dr. GRPO)"
    )
    beta: float = opt(0.0, "weight of the k3 KL to the reference in the loss; 0 = no reference")
    clip_eps: float = opt(0.2, "PPO clip range of the ratio (lower side)")
    clip_eps_high: float = opt(0.0, "upper clip range; 0 = clip_eps (DAPO uses 0.28)")
    num_iterations: int = opt(1, "optimizer steps on each rollout batch (GRPO's mu, PPO epochs)")

    def validate(self) -> None:
        super().validate()
        check(self.num_generations >= 2, "num_generations", "must be >= 2 (advantages are "
              "relative to the group)")  # fmt: skip
        check(self.num_iterations >= 1, "num_iterations",
              f"must be >= 1, got {self.num_iterations}")  # fmt: skip
        check(self.clip_eps > 0, "clip_eps", f"must be > 0, got {self.clip_eps}")
        for key in ("beta", "clip_eps_high"):
            check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        for key, choices in (("advantage", ADVANTAGES), ("loss_aggregation", AGGREGATIONS)):
            value = getattr(self, key)
            check(value in choices, key, f"must be one of {', '.join(choices)}, got {value!r}")


# ----------------------------------------------------------------------------- plan


class Spec(NamedTuple):
    """One micro-batch: which rollout batch, which pass over it, which of its micro-batches."""

    epoch: int
    rollout: int
    iteration: int
    micro: int
    indices: tuple[int, ...]


def rollout_size(cfg: GRPOConfig, world: int) -> int:
    """Prompts per rollout batch (= per optimizer step)."""
    return cfg.batch_size * cfg.grad_accum * world


def plan_rollouts(n_prompts: int, cfg: GRPOConfig, world: int, epoch: int) -> list[Spec]:
    """Every micro-batch spec of an epoch, ranks interleaved as the loop reads them: rollout r,
    iteration i, micro-batch j, rank k. The prompt order is a pure function of (seed, epoch);
    the last incomplete rollout batch is left out."""
    order = list(range(n_prompts))
    random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
    per_rollout, specs = rollout_size(cfg, world), []
    for r in range(n_prompts // per_rollout):
        for i in range(cfg.num_iterations):
            for j in range(cfg.grad_accum):
                for k in range(world):
                    start = r * per_rollout + (j * world + k) * cfg.batch_size
                    specs.append(Spec(epoch, r, i, j, tuple(order[start : start + cfg.batch_size])))
    return specs


# ----------------------------------------------------------------------------- loss


def count_units(batch: Batch, aggregation: str) -> int:
    """What the loss is summed over: completions, or completion tokens for "token"."""
    mask = batch["completion_mask"]
    return int(mask.sum()) if aggregation == "token" else int(mask.shape[0])


def grpo_step_loss(model: nn.Module, batch: Batch, cfg: GRPOConfig):
    """The micro-batch's objective summed over its units, and its per-unit metrics."""
    mask = batch["completion_mask"].float()  # (B, T)
    logp, rows, head = completion_logprobs(model, batch, cfg.temperature)
    old = batch["old_logp"]
    kl = kl_k3(logp, batch["ref_logp"]) * mask if "ref_logp" in batch else None
    loss, clip_fraction = grpo_loss(logp, old, batch["advantages"], mask, cfg.clip_eps,
                                    cfg.clip_eps_high or cfg.clip_eps, cfg.loss_aggregation,
                                    kl, cfg.beta, cfg.max_new_tokens)  # fmt: skip
    metrics = {
        "clip_fraction": float(clip_fraction),
        "approx_kl": float(masked_mean(kl_k3(old, logp.detach()), mask)),  # KL(old || new)
        "entropy": mean_entropy(rows.detach(), head),
    }
    if kl is not None:
        metrics["kl"] = float(masked_mean(kl.detach(), mask))
    return loss * count_units(batch, cfg.loss_aggregation), metrics


# ----------------------------------------------------------------------------- rollouts


class Rollouts(OnlineState):
    """The sampling side of the job: collate (sample, score, reference; cached across
    iterations), per-step metrics, and the state a checkpoint needs (generator, rollout)."""

    def __init__(self, cfg: GRPOConfig, model, tokenizer, examples, sources, reference):
        super().__init__(cfg.seed, device_of(model))
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.examples, self.sources, self.reference = examples, sources, reference
        self.sample = make_sampler(model, tokenizer, cfg)
        self.cache_key: tuple[int, int] | None = None  # (epoch, rollout) of the cached batches
        self.cache: dict[int, Batch] = {}  # micro index -> collated rollout
        self.stats = StepStats(PHASES)
        self.rollout_metrics: dict[str, float] = {}  # of the cached rollout
        self.collated_at = perf_counter()
        self.commit()

    def collate(self, spec: Spec) -> Batch:
        key = (spec.epoch, spec.rollout)
        if spec.iteration == 0:
            if self.cache_key != key:
                self.cache_key, self.cache = key, {}
            self.cache[spec.micro] = self.roll(spec)
        elif self.cache_key != key or spec.micro not in self.cache:
            raise RuntimeError(f"rollout {key} micro-batch {spec.micro} is not cached")
        self.collated_at = perf_counter()
        return self.cache[spec.micro]

    def roll(self, spec: Spec) -> Batch:
        """Sample G completions per prompt, score them, add advantages and reference log-probs."""
        cfg, G, stats = self.cfg, self.cfg.num_generations, self.stats
        rows = [self.examples[i] for i in spec.indices]
        start = perf_counter()
        prompt_ids = [row["input_ids"] for row in rows for _ in range(G)]
        r = self.sample(prompt_ids, self.generator, self.step)
        stats.time("generate", perf_counter() - start)
        start = perf_counter()
        rewards, parts = score_completions(self.sources, cfg, rows, r.completions(self.tokenizer),
                                           r.ended, G, self.step + 1)  # fmt: skip
        stats.time("score", perf_counter() - start)
        batch = rollout_batch(r)
        batch["advantages"] = ADVANTAGES[cfg.advantage](rewards, G)  # (B,)
        if self.reference is not None:
            start = perf_counter()
            with eval_no_grad(self.model):
                on_device = {k: v.to(device_of(self.model)) for k, v in batch.items()}
                batch["ref_logp"] = self.reference(on_device).float().cpu()
            stats.time("reference", perf_counter() - start)
        stats.add(rewards, parts, r)
        grouped = rewards.view(-1, G)
        stats.mean("zero_std_groups", grouped.max(1).values == grouped.min(1).values)
        return batch

    def after_step(self) -> dict[str, float]:
        """Metrics of the step that just finished; its state becomes the checkpointable one."""
        fresh = self.stats.summary()  # empty on steps that reuse the rollout (num_iterations > 1)
        self.rollout_metrics = fresh or self.rollout_metrics  # logged on every step of a rollout
        out = dict(self.rollout_metrics)
        out["train_s"] = perf_counter() - self.collated_at
        self.step += 1
        self.stats = StepStats(PHASES)
        self.commit()
        return out

    def extra_state(self) -> dict[str, Tensor]:
        if self.cache_key is None:
            return {}
        state = {"cache_key": torch.tensor(self.cache_key)}
        for micro, batch in self.cache.items():
            state.update({f"cache.{micro}.{k}": v for k, v in batch.items()})
        state.update({f"metrics.{k}": torch.tensor(v, dtype=torch.float64)
                      for k, v in self.rollout_metrics.items()})  # fmt: skip
        return state

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        self.cache_key, self.cache = None, {}
        if "cache_key" in state:
            self.cache_key = tuple(int(x) for x in state["cache_key"])
        for name, value in state.items():
            if name.startswith("cache."):
                _, micro, key = name.split(".", 2)
                self.cache.setdefault(int(micro), {})[key] = value
        self.rollout_metrics = {k: float(v) for k, v in unflatten("metrics", state).items()}


# ----------------------------------------------------------------------------- the method


def grpo_job(cfg: GRPOConfig, model, tokenizer, examples, sources, reference) -> Job:
    rollouts = Rollouts(cfg, model, tokenizer, examples, sources, reference)
    world = dist.world_size()
    return Job(
        model=model,
        plan=partial(plan_rollouts, len(examples), cfg, world),
        collate=rollouts.collate,
        loss=partial(grpo_step_loss, cfg=cfg),
        units=partial(count_units, aggregation=cfg.loss_aggregation),
        tokens=lambda batch: int(batch["attention_mask"].sum()),
        save_final=lambda m, path: save_model(m, tokenizer, path),
        trainable=trainable_state,
        load_trainable=load_trainable_state,
        after_step=rollouts.after_step,
        state=rollouts.state,
        load_state=rollouts.load_state,
    )


def grpo(cfg: GRPOConfig | dict) -> dict[str, float]:
    """RL-tune `cfg.model` on the prompts of `cfg.data.train`; writes `output_dir`."""
    cfg = build_config(GRPOConfig, cfg)
    device, tokenizer = begin_run(cfg)
    need = rollout_size(cfg, dist.world_size())
    what = "batch_size x grad_accum x ranks"
    examples, sources = prompts_and_rewards(cfg, tokenizer, device, need, what)
    model = load_trainable_model(cfg, tokenizer, device)
    reference = make_reference(model, cfg.temperature) if cfg.beta else None
    return run_job(grpo_job(cfg, model, tokenizer, examples, sources, reference), cfg, device)
