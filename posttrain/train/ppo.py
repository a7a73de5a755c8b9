"""RLHF with PPO, InstructGPT-style: `posttrain ppo` (Ouyang et al. 2022; Schulman et al. 2017).

Per rollout batch: the policy samples one completion per prompt (`posttrain.rollout.sampler`),
the reward sources score it (`reward.model`: a `posttrain reward` run; `reward.fn`: Python
functions; weighted sum and truncation penalty, `posttrain.rollout.rewards`), the reference
model and the value head score every completion token, and then

    r_t   = -beta * KL_t  (+ the sequence's score on its last token)   kl_penalized_rewards
    A, R  = GAE(r, V_old; gamma, lam), A whitened over the rollout batch     gae, masked_whiten
    loss  = clipped surrogate(A) + vf_coef * clipped value loss(R)       ppo_policy_loss/value_loss

for `ppo_epochs` passes over the rollout batch in `num_minibatches` minibatches (all the math
is `posttrain.losses.rl`). After each rollout the adaptive KL controller (Ziegler et al. 2019,
Sec. 2.2) moves beta toward `target_kl`; `target_kl=0` keeps beta fixed.

**The value function is a scalar head on the policy** (`posttrain.train.value_head`: why a head
and not a separate critic, and why `reward_norm`, on by default, scales the rewards to mean 0,
std 1 on the first rollout batch and keeps that map: the head shares the policy's adapter, so the
reward's scale decides how hard the value loss pulls on it).

**Where the KL goes** (`kl_estimator`, `kl_placement`): the default, k1 in the reward, makes the
returns carry the KL, which is an unbiased estimate of the gradient of the sequence-level
KL(pi || ref) (Tang & Munos 2025; `losses/rl.py` explains and tests it). `kl_placement=loss`
adds beta x the token-mean estimate to the loss *with* gradient instead: k1 then has gradient 0
in expectation, k2 gives per-token partial gradients, k3 the forward KL's (offered to study
exactly those pitfalls). The reference is the policy with its adapter disabled, or a frozen
copy of the starting model for full/top_layers/bitfit training. The KL the controller and the
`kl` metric use is the chosen estimator summed over a completion's tokens (nats per completion),
averaged over the rollout batch (over all ranks).

How it sits in the one loop (as `posttrain grpo`; shared parts in `posttrain.train.online`):
- **A minibatch is one optimizer step** = batch_size x grad_accum prompts per rank (the loop's
  micro-batches accumulated). A rollout batch is `num_minibatches` of them; each of the
  `ppo_epochs` passes reshuffles its rows into minibatches (a pure function of seed, epoch,
  rollout, pass). So each rollout batch makes ppo_epochs x num_minibatches optimizer steps;
  `max_steps` counts those.
- The first micro-batch of a rollout batch samples, scores and evaluates all of it (in sampler
  calls of batch_size prompts), so every minibatch sees the same old policy and the advantages
  are whitened over the whole batch; the rollout is cached and later micro-batches are slices.
  Every step logs the metrics of the rollout batch it trains on (so any `log_every` shows
  them; the phase timings are the sampling step's).
- Exact resume: the sampler's generator, the cached rollout and beta are the job's state as of
  the last finished step (`checkpoints/step-N/job.safetensors`).

Metrics: reward_mean/std (and per source), kl, kl_coef (the beta of the rollout), non_score_reward,
completion_length, eos_fraction, explained_variance, value_mean (at rollout); loss,
policy_loss, value_loss, clip_fraction, value_clip_fraction, approx_kl (old -> new, k3),
entropy (every step); generate_s, score_s, reference_s, value_s, train_s.

Simplified on purpose: one completion per prompt; the old log-probs are the sampler's (exact on
CPU, slightly different from a training forward under bf16 on GPU); no per-batch reward whitening
or clipping, no entropy bonus, no early stop on approx_kl; HF sampling only (no vLLM); FSDP and
prefix/prompt tuning are not supported.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from time import perf_counter
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.config import build_config, check, opt
from posttrain.errors import UserError
from posttrain.evaluate.generate import device_of, pad_id
from posttrain.losses.rl import (
    DEFAULT_KL_ESTIMATOR,
    DEFAULT_KL_PLACEMENT,
    KL_ESTIMATORS,
    explained_variance,
    gae,
    kl_estimate,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from posttrain.modeling.adapters import load_trainable_state, trainable_state
from posttrain.rollout.sampler import eval_no_grad
from posttrain.train import dist
from posttrain.train.loop import Batch, Job
from posttrain.train.online import (
    OnlineConfig,
    OnlineState,
    StepStats,
    completion_logprobs,
    flatten,
    make_reference,
    make_sampler,
    mean_entropy,
    prompts_and_rewards,
    rollout_batch,
    scatter_rows,
    score_completions,
    unflatten,
)
from posttrain.train.run import begin_run, load_trainable_model, run_job
from posttrain.train.value_head import PolicyWithValueHead, save_policy_and_value, token_values

KL_PLACEMENTS = ("reward", "loss")
PHASES = ("generate", "score", "reference", "value")  # timed in collate; "train" after it


@dataclass
class PPOConfig(OnlineConfig):
    """`posttrain ppo`: the shared training keys plus sampling, rewards, PPO and the KL control."""

    command: ClassVar[str] = "ppo"

    batch_size: int = opt(8, "prompts per micro-batch per device (one completion each)")
    num_minibatches: int = opt(1, "optimizer steps per pass over a rollout batch (a rollout "
                               "batch = batch_size x grad_accum x num_minibatches x ranks prompts)")  # fmt: skip
    ppo_epochs: int = opt(4, "passes over each rollout batch (rows reshuffled into minibatches)")
    gamma: float = opt(1.0, "GAE discount")
    lam: float = opt(0.95, "GAE lambda")
    clip_eps: float = opt(0.2, "clip range of the policy ratio")
    vf_coef: float = opt(0.1, "weight of the value loss")
    cliprange_value: float = opt(0.2, "clip range of the new values around the old ones")
    whiten_advantages: bool = opt(True, "normalise advantages over each rollout batch")
    beta: float = opt(0.05, "initial KL coefficient (stays fixed when target_kl=0); 0 = no penalty")
    kl_estimator: str = opt(DEFAULT_KL_ESTIMATOR, "per-token KL estimator: k1, k2, k3")
    kl_placement: str = opt(DEFAULT_KL_PLACEMENT, "reward (per-token penalty in the returns; "
                            "with k1 the unbiased KL gradient) or loss (differentiated)")  # fmt: skip
    target_kl: float = opt(6.0, "adaptive KL controller's target, nats per completion; 0 = fixed")
    kl_horizon: int = opt(10000, "adaptive KL controller's horizon, in completions")
    value_lr_mult: float = opt(1.0, "the value head's learning rate as a multiple of lr")
    reward_norm: bool = opt(True, "scale the rewards to mean 0, std 1 over the first rollout "
                            "batch (Ziegler et al. 2019) and keep that scaling for the run")  # fmt: skip

    def validate(self) -> None:
        super().validate()
        for key in ("num_minibatches", "ppo_epochs", "kl_horizon"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        check(self.value_lr_mult > 0, "value_lr_mult", f"must be > 0, got {self.value_lr_mult}")
        for key in ("gamma", "lam"):
            check(0 <= getattr(self, key) <= 1, key, f"must be in [0, 1], got {getattr(self, key)}")
        for key in ("clip_eps", "cliprange_value"):
            check(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        for key in ("vf_coef", "beta", "target_kl"):
            check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        for key, choices in (("kl_estimator", KL_ESTIMATORS), ("kl_placement", KL_PLACEMENTS)):
            value = getattr(self, key)
            check(value in choices, key, f"must be one of {', '.join(choices)}, got {value!r}")
        check(self.beta > 0 or self.target_kl == 0, "target_kl",
              "must be 0 when beta=0 (the controller scales beta, it cannot leave 0)")  # fmt: skip


# ----------------------------------------------------------------------------- KL controller


def adaptive_kl_coef(beta: float, kl: float, target: float, horizon: int, n: int) -> float:
    """Next KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences", Sec. 2.2; as TRL's old AdaptiveKLController):

        e = clip(KL / target - 1, -0.2, 0.2),   beta <- beta * (1 + e * n / horizon)

    `kl`: the rollout batch's mean KL per completion, `n`: its completions. target 0 = fixed."""
    if target <= 0:
        return beta
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n / horizon)


# ----------------------------------------------------------------------------- plan


class Spec(NamedTuple):
    """One micro-batch: which rollout batch, which PPO pass and minibatch, which rows."""

    epoch: int
    rollout: int
    ppo_epoch: int
    minibatch: int
    micro: int
    prompts: tuple[int, ...]  # this rank's prompts of the whole rollout batch (data indices)
    rows: tuple[int, ...]  # the rollout rows (positions in `prompts`) this micro-batch trains on


def rollout_size(cfg: PPOConfig, world: int) -> int:
    """Prompts per rollout batch, all ranks."""
    return cfg.batch_size * cfg.grad_accum * cfg.num_minibatches * world


def plan_rollouts(n_prompts: int, cfg: PPOConfig, world: int, epoch: int) -> list[Spec]:
    """Every micro-batch spec of an epoch in the loop's order (rollout, pass, minibatch, micro,
    rank). The prompt order is a pure function of (seed, epoch) and each pass's row order of
    (seed, epoch, rollout, pass); the last incomplete rollout batch is left out."""
    order = list(range(n_prompts))
    random.Random(cfg.seed * 1_000_003 + epoch).shuffle(order)
    per_rank = cfg.batch_size * cfg.grad_accum * cfg.num_minibatches
    specs = []
    for r in range(n_prompts // (per_rank * world)):
        base = r * per_rank * world
        mine = [tuple(order[base + k * per_rank : base + (k + 1) * per_rank]) for k in range(world)]
        for e in range(cfg.ppo_epochs):
            rows = list(range(per_rank))
            random.Random(f"{cfg.seed}/{epoch}/{r}/{e}").shuffle(rows)
            for m in range(cfg.num_minibatches):
                for j in range(cfg.grad_accum):
                    start = (m * cfg.grad_accum + j) * cfg.batch_size
                    chunk = tuple(rows[start : start + cfg.batch_size])
                    specs += [Spec(epoch, r, e, m, j, mine[k], chunk) for k in range(world)]
    return specs


# ----------------------------------------------------------------------------- rollout tensors


def concat_rollouts(chunks: list[Batch], pad: int) -> Batch:
    """One rollout from sampler chunks: prompts left-padded, completions right-padded to the
    widest; (B,) tensors concatenated; positions recomputed from the mask."""
    P = max(c["input_ids"].shape[1] - c["completion_mask"].shape[1] for c in chunks)
    T = max(c["completion_mask"].shape[1] for c in chunks)
    out = {}
    for key in chunks[0]:
        parts = []
        for c in chunks:
            t = c["completion_mask"].shape[1]
            p, v = c["input_ids"].shape[1] - t, c[key]
            if key in ("input_ids", "attention_mask", "position_ids"):
                fill = pad if key == "input_ids" else 0
                v = torch.cat([F.pad(v[:, :p], (P - p, 0), value=fill),
                               F.pad(v[:, p:], (0, T - t), value=fill)], 1)  # fmt: skip
            elif v.ndim == 2:
                v = F.pad(v, (0, T - t))
            parts.append(v)
        out[key] = torch.cat(parts)
    out["position_ids"] = (out["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return out


def select_rows(rollout: Batch, rows: tuple[int, ...]) -> Batch:
    """The micro-batch of the given rollout rows, trimmed to its own widest prompt/completion."""
    batch = {k: v[list(rows)] for k, v in rollout.items()}
    mask = batch["completion_mask"]
    T, width = int(mask.sum(1).max()), mask.shape[1]
    P = batch["input_ids"].shape[1] - width
    lead = int((batch["attention_mask"][:, :P].cumsum(1) == 0).sum(1).min())  # common left pad
    for key, value in batch.items():
        if key in ("input_ids", "attention_mask", "position_ids"):
            batch[key] = value[:, lead : P + T]
        elif value.ndim == 2:
            batch[key] = value[:, :T]
    return batch


def returns_and_advantages(rollout: Batch, beta: float, cfg: PPOConfig) -> tuple[Batch, Tensor]:
    """({advantages, returns} (B, T), per-token KL estimate (B, T)) of a rollout: the KL
    penalty in the rewards (when kl_placement=reward), GAE, whitening."""
    mask = rollout["completion_mask"].float()
    in_reward = beta if cfg.kl_placement == "reward" else 0.0
    rewards, kl = kl_penalized_rewards(rollout["scores"], rollout["old_logp"], rollout["ref_logp"],
                                       mask, in_reward, cfg.kl_estimator)  # fmt: skip
    advantages, returns = gae(rewards, rollout["old_values"], mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return {"advantages": advantages, "returns": returns}, kl


# ----------------------------------------------------------------------------- loss


def count_tokens(batch: Batch) -> int:
    """The loss is a mean over the minibatch's completion tokens: summed over them here."""
    return int(batch["completion_mask"].sum())


def ppo_step_loss(model: PolicyWithValueHead, batch: Batch, cfg: PPOConfig):
    """Clipped surrogate + vf_coef x clipped value loss (+ beta x KL with kl_placement=loss),
    summed over the micro-batch's completion tokens; per-token metrics."""
    mask = batch["completion_mask"].float()  # (B, T)
    logp, rows, head = completion_logprobs(model.policy, batch, cfg.temperature)
    values = scatter_rows(model.values(rows), mask)  # (B, T)
    policy_loss, clip_fraction, approx_kl = ppo_policy_loss(
        logp, batch["old_logp"], batch["advantages"], mask, cfg.clip_eps
    )
    value_loss, value_clip = ppo_value_loss(
        values, batch["old_values"], batch["returns"], mask, cfg.cliprange_value
    )
    loss = policy_loss + cfg.vf_coef * value_loss
    metrics = {
        "policy_loss": float(policy_loss.detach()),
        "value_loss": float(value_loss.detach()),
        "clip_fraction": float(clip_fraction),
        "value_clip_fraction": float(value_clip),
        "approx_kl": float(approx_kl),  # KL(old || new), k3
        "entropy": mean_entropy(rows.detach(), head),
    }
    if cfg.kl_placement == "loss":
        kl_loss = masked_mean(kl_estimate(logp, batch["ref_logp"], cfg.kl_estimator), mask)
        loss = loss + float(batch["kl_coef"][0]) * kl_loss
        metrics["kl_loss"] = float(kl_loss.detach())
    return loss * count_tokens(batch), metrics


# ----------------------------------------------------------------------------- rollouts


class Rollouts(OnlineState):
    """The sampling side of the job: collate (the whole rollout batch on its first micro-batch,
    then slices of it), the KL controller, per-step metrics and the checkpointed state."""

    def __init__(self, cfg: PPOConfig, model: PolicyWithValueHead, tokenizer, examples, sources,
                 reference):  # fmt: skip
        super().__init__(cfg.seed, device_of(model.policy))
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.examples, self.sources, self.reference = examples, sources, reference
        self.pad = pad_id(tokenizer)
        self.sample = make_sampler(model.policy, tokenizer, cfg)
        self.beta = float(cfg.beta)  # the KL coefficient the next rollout uses
        self.reward_scaling: tuple[float, float] | None = None  # (mean, std), with reward_norm
        self.cache_key: tuple[int, int] | None = None  # (epoch, rollout) of the cached rollout
        self.rollout: Batch = {}
        self.rollout_metrics: dict[str, float] = {}  # of the cached rollout, logged every step
        self.stats = StepStats(PHASES)
        self.collated_at = perf_counter()
        self.commit()

    def collate(self, spec: Spec) -> Batch:
        key = (spec.epoch, spec.rollout)
        if self.cache_key != key:
            if (spec.ppo_epoch, spec.minibatch, spec.micro) != (0, 0, 0):
                raise RuntimeError(f"rollout {key} is not cached at {spec[:5]}")
            self.cache_key, self.rollout = key, self.roll(spec)
        self.collated_at = perf_counter()
        return select_rows(self.rollout, spec.rows)

    def roll(self, spec: Spec) -> Batch:
        """Sample, score and evaluate this rank's rollout batch; rewards, GAE; update beta."""
        cfg, size = self.cfg, self.cfg.batch_size
        examples = [self.examples[i] for i in spec.prompts]
        chunks = [self.roll_chunk(examples[s : s + size]) for s in range(0, len(examples), size)]
        rollout = concat_rollouts(chunks, self.pad)
        if cfg.reward_norm:
            rollout["scores"] = self.normalise(rollout["scores"])
        extra, kl = returns_and_advantages(rollout, self.beta, cfg)
        rollout.update(extra)
        rollout["kl_coef"] = torch.full_like(rollout["scores"], self.beta, dtype=torch.float64)
        mask = rollout["completion_mask"].float()
        kl_sequence = kl.sum(1)  # (B,) nats per completion
        self.record(rollout, kl_sequence, mask)
        total = dist.sum_scalar(float(kl_sequence.double().sum()), device_of(self.model.policy))
        n = dist.sum_scalar(len(kl_sequence), device_of(self.model.policy))
        self.beta = adaptive_kl_coef(self.beta, total / n, cfg.target_kl, cfg.kl_horizon, int(n))
        return rollout

    def normalise(self, scores: Tensor) -> Tensor:
        """(scores - mean) / std, both fixed on the first rollout batch (over all ranks); a
        constant first batch (std under 1e-6) only shifts."""
        if self.reward_scaling is None:
            device = device_of(self.model.policy)
            n = dist.sum_scalar(len(scores), device)
            mean = dist.sum_scalar(float(scores.double().sum()), device) / n
            square = dist.sum_scalar(float((scores.double() - mean).square().sum()), device)
            std = (square / max(n - 1, 1)) ** 0.5
            self.reward_scaling = (mean, std if std > 1e-6 else 1.0)
        mean, std = self.reward_scaling
        return (scores.double() - mean).div(std).to(scores.dtype)

    def roll_chunk(self, examples: list[dict]) -> Batch:
        """One sampler call: completions, scores, reference log-probs and old values."""
        stats, device = self.stats, device_of(self.model.policy)
        start = perf_counter()
        r = self.sample([e["input_ids"] for e in examples], self.generator, self.step)
        stats.time("generate", perf_counter() - start)
        start = perf_counter()
        scores, parts = score_completions(self.sources, self.cfg, examples,
                                          r.completions(self.tokenizer), r.ended, 1,
                                          self.step + 1)  # fmt: skip
        stats.time("score", perf_counter() - start)
        stats.add(scores, parts, r)
        batch = rollout_batch(r)
        batch["scores"] = scores  # (B,)
        with eval_no_grad(self.model):
            on_device = {k: v.to(device) for k, v in batch.items()}
            start = perf_counter()
            batch["ref_logp"] = self.reference(on_device).float().cpu()
            stats.time("reference", perf_counter() - start)
            start = perf_counter()
            batch["old_values"] = token_values(self.model, on_device).float().cpu()
            stats.time("value", perf_counter() - start)
        return batch

    def record(self, rollout: Batch, kl_sequence: Tensor, mask: Tensor) -> None:
        """Rollout-level metrics for the step that sampled."""
        self.stats.mean("kl", kl_sequence)
        self.stats.mean("kl_coef", torch.tensor(self.beta))
        if self.cfg.kl_placement == "reward":
            self.stats.mean("non_score_reward", -self.beta * kl_sequence)
        ev = explained_variance(rollout["old_values"], rollout["returns"], mask)
        self.stats.mean("explained_variance", ev)
        self.stats.mean("value_mean", masked_mean(rollout["old_values"], mask))

    def after_step(self) -> dict[str, float]:
        """Metrics of the step that just finished; its state becomes the checkpointable one."""
        if self.stats.rewards:
            self.rollout_metrics = self.stats.summary()
        out = {**self.rollout_metrics, "train_s": perf_counter() - self.collated_at}
        self.step += 1
        self.stats = StepStats(PHASES)
        self.commit()
        return out

    def extra_state(self) -> dict[str, Tensor]:
        state = {"kl_coef": torch.tensor(self.beta, dtype=torch.float64)}
        if self.reward_scaling is not None:
            state["reward_scaling"] = torch.tensor(self.reward_scaling, dtype=torch.float64)
        if self.cache_key is not None:
            state["rollout_key"] = torch.tensor(self.cache_key)
            state.update(flatten("rollout", self.rollout))
            state.update({f"metrics.{k}": torch.tensor(v, dtype=torch.float64)
                          for k, v in self.rollout_metrics.items()})  # fmt: skip
        return state

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        if "kl_coef" not in state:
            raise UserError("checkpoint has no KL controller state; start a new run")
        self.beta = float(state["kl_coef"])
        scaling = state.get("reward_scaling")
        self.reward_scaling = None if scaling is None else tuple(scaling.tolist())
        self.cache_key, self.rollout = None, {}
        if "rollout_key" in state:
            self.cache_key = tuple(int(x) for x in state["rollout_key"])
            self.rollout = unflatten("rollout", state)
            self.rollout_metrics = {k: float(v) for k, v in unflatten("metrics", state).items()}


# ----------------------------------------------------------------------------- the method


def ppo_job(cfg: PPOConfig, model: PolicyWithValueHead, tokenizer, examples, sources,
            reference) -> Job:  # fmt: skip
    rollouts = Rollouts(cfg, model, tokenizer, examples, sources, reference)
    return Job(
        model=model,
        plan=partial(plan_rollouts, len(examples), cfg, dist.world_size()),
        collate=rollouts.collate,
        loss=partial(ppo_step_loss, cfg=cfg),
        units=count_tokens,
        tokens=lambda batch: int(batch["attention_mask"].sum()),
        save_final=lambda m, path: save_policy_and_value(m, tokenizer, path),
        trainable=trainable_state,
        load_trainable=load_trainable_state,
        after_step=rollouts.after_step,
        state=rollouts.state,
        load_state=rollouts.load_state,
    )


def ppo(cfg: PPOConfig | dict) -> dict[str, float]:
    """PPO-tune `cfg.model` on the prompts of `cfg.data.train`; writes `output_dir`."""
    cfg = build_config(PPOConfig, cfg)
    device, tokenizer = begin_run(cfg)
    need = rollout_size(cfg, dist.world_size())
    what = "batch_size x grad_accum x num_minibatches x ranks"
    examples, sources = prompts_and_rewards(cfg, tokenizer, device, need, what)
    policy = load_trainable_model(cfg, tokenizer, device)
    reference = make_reference(policy, cfg.temperature)
    model = PolicyWithValueHead(policy, cfg.value_lr_mult)
    return run_job(ppo_job(cfg, model, tokenizer, examples, sources, reference), cfg, device)
