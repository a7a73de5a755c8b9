"""Exact-match task accuracy: greedy replies compared with `answer` after `normalize_answer`.

Rows are dicts with `messages` (the prompt is every message before the final assistant
one) or `prompt` (a string or a message list), an `answer` (else the final assistant
message) and an optional `task` kind. `accuracy` is the mean of the per-kind accuracies, so
every kind counts the same whatever its row count; `accuracy_micro` is the plain mean.

Simplified on purpose: the whole reply must be the answer, no extraction from longer text.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from posttrain.errors import UserError
from posttrain.evaluate.generate import generate
from posttrain.evaluate.text import exact_match, normalize_answer

__all__ = ["normalize_answer", "exact_match", "split_rows", "score_responses", "task_accuracy"]


def split_rows(rows: Sequence[dict]) -> tuple[list, list, list]:
    """(prompts, answers, task kinds) from dataset rows; answers are None when absent."""
    prompts, answers, kinds = [], [], []
    for n, row in enumerate(rows):
        answer = row.get("answer")
        if "messages" in row:
            messages = list(row["messages"])
            if messages and messages[-1].get("role") == "assistant":
                last = messages.pop()
                answer = answer if answer is not None else last.get("content")
            prompts.append(messages)
        elif "prompt" in row:
            prompts.append(row["prompt"])
        else:
            raise UserError(f"row {n + 1}: needs a `messages` or `prompt` field")
        answers.append(answer)
        kinds.append(row.get("task", "all"))
    return prompts, answers, kinds


def by_task(values: Sequence[float], kinds: Sequence[str]) -> dict[str, float]:
    """Mean of `values` per task kind, kinds sorted by name."""
    groups: dict[str, list[float]] = defaultdict(list)
    for v, k in zip(values, kinds):
        groups[k].append(v)
    return {k: sum(vs) / len(vs) for k, vs in sorted(groups.items())}


def score_responses(responses: Sequence[str], answers: Sequence[str], kinds: Sequence[str]) -> dict:
    """{"accuracy" (mean over kinds), "accuracy_micro", "accuracy_by_task", "n"}."""
    hits = [float(exact_match(r, a)) for r, a in zip(responses, answers)]
    per_task = by_task(hits, kinds)
    return {
        "accuracy": sum(per_task.values()) / len(per_task) if per_task else 0.0,
        "accuracy_micro": sum(hits) / len(hits) if hits else 0.0,
        "accuracy_by_task": per_task,
        "n": len(hits),
    }


def task_accuracy(
    model, tok, rows: Sequence[dict], max_new_tokens: int = 24, batch_size: int = 64
) -> dict:
    """Greedy-generate a reply per row and score exact match against its answer."""
    prompts, answers, kinds = split_rows(rows)
    missing = [i + 1 for i, a in enumerate(answers) if a is None]
    if missing:
        raise UserError(f"row {missing[0]}: no `answer` field and no final assistant message")
    responses = generate(model, tok, prompts, max_new_tokens, batch_size)
    return score_responses(responses, answers, kinds)
