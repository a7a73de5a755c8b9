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

Simplified on purpose: sampling runs on the training model through HF (no vLLM engine), one
sampler call per micro-batch; no minibatch shuffling inside a rollout batch; no masking of
truncated completions or entropy bonus; eval during training is not offered (run
`posttrain eval` on the run); FSDP and prompt/prefix tuning are not supported.
"""

from __future__ import annotations

import copy
import random
import re
import sys
from dataclasses import dataclass, field
from functools import partial
from time import perf_counter
from typing import NamedTuple

import torch
from peft import PeftModel
from torch import Tensor, nn

from posttrain.config import TrainConfig, build_config, check, opt
from posttrain.data.load import load_rows
from posttrain.errors import UserError
from posttrain.evaluate.generate import device_of, pad_id, stop_token_ids
from posttrain.losses.lm import final_hidden, output_head, token_logprobs
from posttrain.losses.rl import (
    AGGREGATIONS,
    dr_grpo_advantages,
    entropy_from_logits,
    grpo_advantages,
    grpo_loss,
    kl_k3,
    masked_mean,
    rloo_advantages,
)
from posttrain.modeling.adapters import load_trainable_state, save_model, trainable_state
from posttrain.rollout.rewards import build_sources, combine, truncation_penalty
from posttrain.rollout.sampler import encode_prompts, eval_no_grad, sample
from posttrain.train import dist
from posttrain.train.loop import Batch, Job
from posttrain.train.run import begin_run, load_trainable_model, run_job

ADVANTAGES = {"grpo": grpo_advantages, "rloo": rloo_advantages, "dr_grpo": dr_grpo_advantages}
PHASES = ("generate", "score", "reference")  # timed in collate; "train" after it
LONG_PROMPTS = {"truncate": "cut from the left", "drop": "dropped", "error": "refused"}


@dataclass
class RewardSection:
    fn: list = opt([], "reward functions, module:function (called with prompts, completions and "
                   "every other data column by name; return one float per completion)")  # fmt: skip
    model: str = opt("", "a reward model (a `posttrain reward` run, folder or adapter)")
    weights: list = opt([], "weight of each source, in the order fn..., model; empty = 1 each")
    truncation_penalty: float = opt(
        0.0, "subtracted from the reward of completions cut at max_new_tokens (no EOS)"
    )


@dataclass
class GRPOConfig(TrainConfig):
    """`posttrain grpo`: the shared training keys plus sampling, rewards and the objective."""

    batch_size: int = opt(4, "prompts per micro-batch per device (each with num_generations)")
    num_generations: int = opt(8, "G: completions sampled per prompt (a group)")
    max_new_tokens: int = opt(64, "longest completion; longer ones are cut (ended=false)")
    temperature: float = opt(1.0, "sampling temperature (> 0); log-probs use the same scaling")
    top_p: float = opt(1.0, "nucleus sampling: keep the most likely tokens up to this mass")
    top_k: int = opt(0, "keep only the k most likely tokens; 0 = all")
    stop: list = opt([], "stop strings (besides EOS / end of turn)")
    chat: bool = opt(True, "render prompts with the chat template; false = raw text to continue")
    max_prompt_length: int = opt(512, "prompt tokens allowed (see long_prompts)")
    long_prompts: str = opt(
        "truncate", "longer prompts: truncate (keep the end), drop (skip), error (refuse)"
    )
    reward: RewardSection = opt(RewardSection(), "reward sources")
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
        for key in ("max_new_tokens", "max_prompt_length", "num_iterations"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("temperature", "clip_eps"):
            check(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        for key in ("top_k", "beta", "clip_eps_high"):
            check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        for key, choices in (("long_prompts", LONG_PROMPTS), ("advantage", ADVANTAGES),
                             ("loss_aggregation", AGGREGATIONS)):  # fmt: skip
            value = getattr(self, key)
            check(value in choices, key, f"must be one of {', '.join(choices)}, got {value!r}")
        check(bool(self.reward.fn or self.reward.model), "reward.fn", "or reward.model is required")
        check(not self.data.eval, "data.eval", "is not used by grpo; run `posttrain eval` after")
        check(not self.packing, "packing", "is not used by grpo; set packing=false")
        check(not self.fsdp, "fsdp", "is not supported by grpo (ranks sample different lengths)")
        check(self.adapter not in ("prefix", "prompt"), "adapter",
              f"{self.adapter} is not supported by the rollout sampler")  # fmt: skip


# ----------------------------------------------------------------------------- prompts


def prompt_of(where: str, row: dict):
    """The row's prompt: non-empty text or a list of {role, content} messages."""
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt:
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)
    ):
        return prompt
    raise UserError(f"{where}: grpo needs a 'prompt' (text or a list of role/content messages)")


def load_prompts(source: str, split: str, tokenizer, cfg: GRPOConfig) -> list[dict]:
    """Prompt examples {where, prompt, input_ids, columns}, long prompts handled per config."""
    rows = load_rows(source, split=split)
    prompts = [prompt_of(where, row) for where, row in rows]
    encoded = encode_prompts(tokenizer, prompts, cfg.chat)
    names = sorted({k for _, row in rows for k in row if k != "prompt"})
    examples, long = [], 0
    for (where, row), prompt, ids in zip(rows, prompts, encoded):
        if len(ids) > cfg.max_prompt_length:
            long += 1
            if cfg.long_prompts == "error":
                raise UserError(f"{where}: the prompt has {len(ids)} tokens, more than "
                                f"max_prompt_length={cfg.max_prompt_length}; raise it or set "
                                "long_prompts=truncate or drop")  # fmt: skip
            if cfg.long_prompts == "drop":
                continue
            ids = ids[-cfg.max_prompt_length :]
        columns = {k: row.get(k) for k in names}
        examples.append({"where": where, "prompt": prompt, "input_ids": ids, "columns": columns})
    if dist.is_main():
        print(f"train: {len(examples)} prompts from {len(rows)} rows; longer than "
              f"max_prompt_length={cfg.max_prompt_length}: {long} "
              f"({LONG_PROMPTS[cfg.long_prompts]})", file=sys.stderr)  # fmt: skip
    if not examples:
        raise UserError(f"{source}: no prompt left (all longer than max_prompt_length)")
    return examples


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


# ----------------------------------------------------------------------------- log-probs


class TemperatureHead(nn.Module):
    """The output head with logits divided by the sampling temperature (in float32)."""

    def __init__(self, head: nn.Module, temperature: float):
        super().__init__()
        self.head, self.temperature = head, temperature

    def forward(self, hidden: Tensor) -> Tensor:
        return self.head(hidden).float() / self.temperature


def completion_logprobs(model: nn.Module, batch: Batch, temperature: float):
    """(log-probs (B, T) of the completion tokens under softmax(logits / temperature), 0 on
    padding; the hidden rows (N, H) of the real completion tokens; the head)."""
    hidden = final_hidden(model, batch)  # (B, P + T, H), prompt left-padded
    mask = batch["completion_mask"].bool()  # (B, T)
    T = mask.shape[1]
    rows = hidden[:, -T - 1 : -1][mask]  # (N, H): position t predicts completion token t
    head = TemperatureHead(output_head(model), temperature)
    logp = token_logprobs(rows, head, batch["input_ids"][:, -T:][mask])  # (N,)
    out = torch.zeros(mask.shape, dtype=logp.dtype, device=logp.device)
    out[mask] = logp
    return out, rows, head


@torch.no_grad()
def mean_entropy(rows: Tensor, head: nn.Module, chunk: int = 4096) -> float:
    """Mean entropy (nats) of the sampling distribution over the completion tokens."""
    total = sum(float(entropy_from_logits(head(rows[s : s + chunk])).sum())
                for s in range(0, rows.shape[0], chunk))  # fmt: skip
    return total / max(rows.shape[0], 1)


def make_reference(cfg: GRPOConfig, model: nn.Module):
    """batch -> reference log-probs (B, T), or None when beta = 0 (see the module doc)."""
    if cfg.beta == 0:
        return None
    if isinstance(model, PeftModel):

        def disabled(batch: Batch) -> Tensor:
            with model.disable_adapter():
                return completion_logprobs(model, batch, cfg.temperature)[0]

        return disabled
    frozen = copy.deepcopy(model).requires_grad_(False).eval()
    return lambda batch: completion_logprobs(frozen, batch, cfg.temperature)[0]


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


@dataclass
class StepStats:
    """What the micro-batches sampled during one optimizer step saw."""

    rewards: list = field(default_factory=list)
    parts: dict = field(default_factory=dict)
    lengths: list = field(default_factory=list)
    ended: list = field(default_factory=list)
    zero_std: list = field(default_factory=list)
    seconds: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    def summary(self) -> dict[str, float]:
        if not self.rewards:
            return {}
        rewards = torch.cat(self.rewards)
        out = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std())}
        out.update({f"reward/{k}": float(torch.cat(v).mean()) for k, v in self.parts.items()})
        out["completion_length"] = float(torch.cat(self.lengths).float().mean())
        out["eos_fraction"] = float(torch.cat(self.ended).float().mean())
        out["zero_std_groups"] = float(torch.cat(self.zero_std).float().mean())
        out.update({f"{k}_s": v for k, v in self.seconds.items()})
        return out


def source_label(name: str) -> str:
    return name.rpartition(":")[2] or name


def locate(error: UserError, rows: list[dict], group: int, step: int) -> str:
    """The reward error with its step and the data row of the completion it names."""
    found = re.search(r"\bprompt (\d+)\b", str(error))
    where = ""
    if found:
        index = int(found.group(1))
        where = f" [completion {index} = data row {rows[index // group]['where']}]"
    return f"reward at step {step}: {error}{where}"


class Rollouts:
    """The sampling side of the job: collate (sample, score, reference; cached across
    iterations), per-step metrics, and the state a checkpoint needs (generator, rollout)."""

    def __init__(self, cfg: GRPOConfig, model, tokenizer, examples, sources, reference):
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self.examples, self.sources, self.reference = examples, sources, reference
        self.generator = torch.Generator(device=device_of(model)).manual_seed(
            cfg.seed + dist.rank()
        )
        self.eos, self.pad = stop_token_ids(tokenizer), pad_id(tokenizer)
        self.step = 0  # optimizer steps finished
        self.cache_key: tuple[int, int] | None = None  # (epoch, rollout) of the cached batches
        self.cache: dict[int, Batch] = {}  # micro index -> collated rollout
        self.stats = StepStats()
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
        cfg, G, seconds = self.cfg, self.cfg.num_generations, self.stats.seconds
        rows = [self.examples[i] for i in spec.indices]
        start = perf_counter()
        r = sample(self.model, [row["input_ids"] for row in rows for _ in range(G)],
                   pad_token_id=self.pad, eos_token_ids=self.eos,
                   max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                   top_k=cfg.top_k, top_p=cfg.top_p, stop_strings=cfg.stop,
                   tokenizer=self.tokenizer, generator=self.generator)  # fmt: skip
        seconds["generate"] += perf_counter() - start
        start = perf_counter()
        rewards = self.score(rows, r.completions(self.tokenizer), r.ended)
        seconds["score"] += perf_counter() - start
        mask = torch.cat([r.prompt_mask, r.completion_mask], 1)
        batch = {
            "input_ids": torch.cat([r.prompt_ids, r.completion_ids], 1),  # (B, P + T)
            "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
            "completion_mask": r.completion_mask,  # (B, T)
            "old_logp": r.logprobs,  # (B, T) from the sampler: the policy before this update
            "advantages": ADVANTAGES[cfg.advantage](rewards, G),  # (B,)
        }
        if self.reference is not None:
            start = perf_counter()
            with eval_no_grad(self.model):
                on_device = {k: v.to(device_of(self.model)) for k, v in batch.items()}
                batch["ref_logp"] = self.reference(on_device).float().cpu()
            seconds["reference"] += perf_counter() - start
        self.stats.lengths.append(r.completion_mask.sum(1))
        self.stats.ended.append(r.ended)
        grouped = rewards.view(-1, G)
        self.stats.zero_std.append(grouped.max(1).values == grouped.min(1).values)
        return batch

    def score(self, rows: list[dict], completions: list[str], ended: Tensor) -> Tensor:
        """Total reward per completion (N,); records the sources' values for the step metrics."""
        G = self.cfg.num_generations
        prompts = [row["prompt"] for row in rows for _ in range(G)]
        columns = {k: [row["columns"][k] for row in rows for _ in range(G)]
                   for k in rows[0]["columns"]}  # fmt: skip
        try:
            total, parts = combine(self.sources, prompts, completions, columns)
        except UserError as e:
            raise UserError(locate(e, rows, G, self.step + 1)) from None
        if self.cfg.reward.truncation_penalty:
            total = truncation_penalty(total, ended, self.cfg.reward.truncation_penalty)
        for name, values in parts.items():
            self.stats.parts.setdefault(source_label(name), []).append(values)
        self.stats.rewards.append(total)
        return total

    def after_step(self) -> dict[str, float]:
        """Metrics of the step that just finished; its state becomes the checkpointable one."""
        out = self.stats.summary()
        out["train_s"] = perf_counter() - self.collated_at
        self.step += 1
        self.stats = StepStats()
        self.commit()
        return out

    def commit(self) -> None:
        self.committed = {"generator": self.generator.get_state(), "step": torch.tensor(self.step)}
        if self.cache_key is not None:
            self.committed["cache_key"] = torch.tensor(self.cache_key)
            for micro, batch in self.cache.items():
                self.committed.update({f"cache.{micro}.{k}": v for k, v in batch.items()})

    def state(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.committed.items()}

    def load_state(self, state: dict[str, Tensor]) -> None:
        if "generator" not in state:
            raise UserError("checkpoint has no sampler state (job.safetensors); start a new run")
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        self.cache_key, self.cache = None, {}
        if "cache_key" in state:
            self.cache_key = tuple(int(x) for x in state["cache_key"])
        for name, value in state.items():
            if name.startswith("cache."):
                _, micro, key = name.split(".", 2)
                self.cache.setdefault(int(micro), {})[key] = value
        self.commit()


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
    examples = load_prompts(cfg.data.train, cfg.data.split, tokenizer, cfg)
    need = rollout_size(cfg, dist.world_size())
    if len(examples) < need:
        raise UserError(f"data.train: {len(examples)} prompts, fewer than one rollout "
                        f"batch (batch_size x grad_accum x ranks = {need})")  # fmt: skip
    sources = build_sources(cfg.reward.fn, cfg.reward.model or None, cfg.reward.weights or None,
                            device)  # fmt: skip
    model = load_trainable_model(cfg, tokenizer, device)
    reference = make_reference(cfg, model)
    return run_job(grpo_job(cfg, model, tokenizer, examples, sources, reference), cfg, device)
