"""Reward sources for online RL: Python functions, the tiny world's rewards, reward models, sums.

A reward source is any callable `fn(prompts, completions, **columns) -> list[float]`: `prompts`
as in the dataset (strings or message lists), `completions` the decoded texts, and every other
dataset column as a keyword list of the same length (so `answer`, `task`, ... reach the function
by name; take `**kwargs` to ignore the rest). Sources:

- `load_function("module:function")`: a user's function (the config key `reward.fn`);
- ready functions for the tiny world: `exact_answer` (1 when the completion is the row's `answer`
  up to `normalize_answer`, as the task-accuracy metric counts it) and `gold` (the hidden gold
  reward, `posttrain.world.gold.gold_reward`; the measure of reward hacking, not a training signal
  you would have in real life);
- `RewardModel(path)`: a model trained by `posttrain reward` (folder, adapter or run directory);
- `combine`: a weighted sum of several sources, with each source's values kept for logging;
- `truncation_penalty`: subtract a constant from completions cut off before EOS.

Before the first step, each function's parameters are checked against the data's columns
(`check_columns`: a column it requires is missing, or it takes neither a column nor **kwargs).
Every value is checked (`call_reward_fn`): a function that raises, returns the wrong count, a
non-number or NaN/inf stops the run with a UserError naming the source and the prompt index
(0-based, within the batch); nothing is silently replaced by 0. To name the row of a function that
raises on the batch, it is called again row by row (so it must not rely on seeing the batch).

Simplified on purpose: functions are called synchronously in-process on the whole batch (no
async or remote rewards, no per-row `None` for "not applicable"); the reward model scores one
batch at a time with right padding.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.errors import UserError
from posttrain.evaluate.text import exact_match

RewardFn = Callable[..., Sequence[float]]


# ----------------------------------------------------------------------------- user functions


def load_function(spec: str, key: str = "reward.fn") -> RewardFn:
    """Import `module:function` (e.g. `my_rewards:length_bonus`); UserError naming `key` if not."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"{key} must look like module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{key}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{key}: module {module_name!r} has no function {attr!r}")
    return fn


def check_columns(fn: RewardFn, name: str, columns: Sequence[str]) -> None:
    """Before any sampling: every column `fn` requires is in the data, and `fn` accepts every
    column (or takes **kwargs); otherwise a UserError naming both."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: nothing to read
        return
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    needed = {p.name for p in params if p.default is p.empty and p.name in named}
    missing = sorted(needed - {"prompts", "completions"} - set(columns))
    if missing:
        raise UserError(f"{name} needs the data column {missing[0]!r}, which data.train lacks "
                        f"(columns: {', '.join(['prompt', *sorted(columns)])})")  # fmt: skip
    unexpected = sorted(set(columns) - named)
    if unexpected and not any(p.kind is p.VAR_KEYWORD for p in params):
        raise UserError(f"{name} does not take the data column {unexpected[0]!r}; every column "
                        "is passed by name: add **kwargs to ignore the rest")  # fmt: skip


def call_reward_fn(
    fn: RewardFn,
    prompts: Sequence[Any],
    completions: Sequence[str],
    columns: dict[str, Sequence[Any]] | None = None,
    name: str = "reward",
) -> list[float]:
    """`fn`'s rewards for the batch, checked: one finite number per completion."""
    columns = columns or {}
    n = len(completions)
    for column, values in columns.items():
        if len(values) != n:
            raise ValueError(f"column {column!r} has {len(values)} values for {n} completions")
    try:
        out = fn(prompts=list(prompts), completions=list(completions), **columns)
    except Exception as batch_error:  # noqa: BLE001 - any failure of user code is reported
        index, error = failing_row(fn, prompts, completions, columns)
        if index is None:
            raise UserError(f"{name} raised on the batch: {describe(batch_error)}") from batch_error
        raise UserError(
            f"{name} raised on prompt {index} ({excerpt(prompts[index])}): {describe(error)}"
        ) from error
    return check_values(out, prompts, n, name)


def failing_row(fn: RewardFn, prompts, completions, columns) -> tuple[int | None, Exception | None]:
    """The first row on which `fn` raises when called one row at a time."""
    for i in range(len(completions)):
        try:
            fn(prompts=[prompts[i]], completions=[completions[i]],
               **{k: [v[i]] for k, v in columns.items()})  # fmt: skip
        except Exception as e:  # noqa: BLE001
            return i, e
    return None, None


def check_values(out: Any, prompts: Sequence[Any], n: int, name: str) -> list[float]:
    """Floats from `out`, or a UserError naming the first bad prompt index."""
    if isinstance(out, torch.Tensor):
        out = out.detach().float().cpu().reshape(-1).tolist()
    try:
        values = list(out)
    except TypeError:
        raise UserError(f"{name} returned {type(out).__name__}, not a list of floats") from None
    if len(values) != n:
        raise UserError(f"{name} returned {len(values)} rewards for {n} completions")
    floats = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise UserError(f"{name} returned {v!r} for prompt {i} ({excerpt(prompts[i])}): "
                            "not a number")  # fmt: skip
        if not math.isfinite(v):
            raise UserError(f"{name} returned {v} for prompt {i} ({excerpt(prompts[i])})")
        floats.append(float(v))
    return floats


def describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0]


def excerpt(prompt: Any, width: int = 60) -> str:
    text = prompt_text(prompt).replace("\n", " ")
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def prompt_text(prompt: Any) -> str:
    """The prompt string, or the last user message of a message list."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


# ----------------------------------------------------------------------------- tiny world


def exact_answer(prompts: list, completions: list[str], answer: list[str], **_) -> list[float]:
    """1.0 when the completion is the row's `answer` (after `normalize_answer`), else 0.0."""
    return [float(exact_match(c, a)) for c, a in zip(completions, answer)]


def gold(prompts: list, completions: list[str], answer: list | None = None, **_) -> list[float]:
    """The tiny world's hidden gold reward of each completion (uses `answer` when given)."""
    from posttrain.world.gold import gold_reward

    answers = answer if answer is not None else [None] * len(prompts)
    return [gold_reward(prompt_text(p), c, a) for p, c, a in zip(prompts, completions, answers)]


# ----------------------------------------------------------------------------- reward models


class RewardModel:
    """A trained reward model as a reward source: scores (prompt, completion) with its head."""

    def __init__(
        self,
        path: str,
        device: torch.device | str | None = None,
        batch_size: int = 32,
        max_length: int = 2048,
    ):
        from posttrain.train.reward import load_scorer

        model, self.tokenizer = load_scorer(path)
        self.model = model.to(device or "cpu")
        self.batch_size, self.max_length = batch_size, max_length

    def __call__(self, prompts: list, completions: list[str], **_) -> list[float]:
        from posttrain.train.reward import score

        rows = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]
        return score(self.model, self.tokenizer, rows, self.batch_size, self.max_length, first=0)


# ----------------------------------------------------------------------------- combining


@dataclass
class RewardSource:
    """A named reward callable and its weight in the total."""

    name: str
    fn: RewardFn
    weight: float = 1.0


def build_sources(
    functions: Sequence[str] = (),
    reward_model: str | None = None,
    weights: Sequence[float] | None = None,
    device: torch.device | str | None = None,
    columns: Sequence[str] | None = None,
) -> list[RewardSource]:
    """Sources from config values: `module:function` specs, then the reward model if any;
    `weights` in that order (default 1 each). With the data's `columns` (all but `prompt`),
    each function's parameters are checked against them first."""
    sources = [RewardSource(spec, load_function(spec)) for spec in functions]
    for source in sources if columns is not None else ():
        check_columns(source.fn, f"reward.fn {source.name}", columns)
    if reward_model:
        sources.append(RewardSource("reward_model", RewardModel(reward_model, device)))
    if not sources:
        raise UserError("reward: set reward.fn and/or reward.model")
    if weights is not None:
        if len(weights) != len(sources):
            raise UserError(f"reward.weights has {len(weights)} values for {len(sources)} sources")
        for source, w in zip(sources, weights):
            source.weight = float(w)
    return sources


def combine(
    sources: Sequence[RewardSource],
    prompts: Sequence[Any],
    completions: Sequence[str],
    columns: dict[str, Sequence[Any]] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(sum_k weight_k * reward_k, {name: reward_k}) as float32 tensors of shape (N,)."""
    parts = {
        s.name: torch.tensor(call_reward_fn(s.fn, prompts, completions, columns, s.name))
        for s in sources
    }
    total = torch.zeros(len(completions))
    for s in sources:
        total += s.weight * parts[s.name]
    return total, parts


def truncation_penalty(rewards: torch.Tensor, ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """rewards - penalty for completions cut off before EOS / a stop string (`ended` False).

    As TRL's `missing_eos_penalty`. rewards, ended: (N,)."""
    return rewards - penalty * (~ended.bool()).float()
