"""Contrastive prompt sets for abliteration and steering: read, check, split.

A set is a data file in any of the data formats (`data.load.load_rows`: .jsonl/.json/.csv/
.parquet or a hub dataset) from which each row's prompt is taken (`prompt` as a string or a
message list, `messages` up to the last user turn, alpaca `instruction` + `input`, or `text`),
or a plain text file (.txt or anything else that is not a data file) with one prompt per line.

`split_prompts` shuffles with a seed and cuts train / validation (/ test) parts, so the
direction is found on one part, chosen on another and evaluated on prompts it never saw.

Simplified on purpose: completions are ignored (only what the user sends matters), and
duplicate prompts are kept.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from posttrain.data.load import FILE_TYPES, load_rows
from posttrain.errors import UserError
from posttrain.evaluate.generate import Prompt


def row_prompt(where: str, row: dict) -> Prompt:
    """The user-side prompt of one data row (a string or a message list)."""
    if "prompt" in row:
        return row["prompt"]
    if "messages" in row or "conversations" in row:
        messages = row.get("messages") or row.get("conversations")
        users = [
            i for i, m in enumerate(messages) if m.get("role", m.get("from")) in ("user", "human")
        ]
        if not users:
            raise UserError(f"{where}: no user message to use as a prompt")
        return messages[: users[-1] + 1]
    if "instruction" in row:
        extra = row.get("input") or ""
        return f"{row['instruction']}\n\n{extra}" if extra else row["instruction"]
    if "text" in row:
        return row["text"]
    raise UserError(
        f"{where}: no prompt found (keys: {', '.join(row)}); "
        "expected prompt, messages, instruction or text"
    )


def read_prompts(source: str) -> list[Prompt]:
    """The prompts of a data file or dataset, or of a text file (one per line)."""
    path = Path(source)
    if path.suffix.lower() == ".txt" and not path.is_file():
        raise UserError(f"{source}: no such file")
    if path.is_file() and path.suffix.lower() not in FILE_TYPES:
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as exc:
            raise UserError(f"{source}: not UTF-8 text ({exc.reason})") from None
        return [line.strip() for line in lines if line.strip()]
    return [row_prompt(where, row) for where, row in load_rows(source)]


def check_count(prompts: Sequence[Prompt], key: str, source: str, minimum: int) -> None:
    """UserError naming the key and file when a set is too small to split."""
    if len(prompts) < minimum:
        raise UserError(
            f"{key}: {source} has {len(prompts)} prompts; at least {minimum} are needed "
            f"(or lower min_prompts)"
        )


def split_prompts(
    prompts: Sequence[Prompt], fractions: Sequence[float], seed: int = 0
) -> list[list[Prompt]]:
    """Seeded shuffle, then consecutive parts: the given fractions, and the rest first.

    split_prompts(p, [0.2]) -> [train (80%), val (20%)]; [0.2, 0.2] -> [train, val, test].
    Every part gets at least one prompt.
    """
    order = list(prompts)
    random.Random(seed).shuffle(order)
    sizes = [max(1, round(f * len(order))) for f in fractions]
    if sum(sizes) >= len(order):
        raise ValueError(f"{len(order)} prompts cannot be split into {len(sizes) + 1} parts")
    cut = len(order) - sum(sizes)
    parts, start = [order[:cut]], cut
    for size in sizes:
        parts.append(order[start : start + size])
        start += size
    return parts
