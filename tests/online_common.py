"""Shared by the online RL tests (test_grpo.py, test_ppo.py): a trivially learnable reward, a
NaN reward, a prompt file with an optional bad row, the settings both trainers' runs share,
and the run's metrics."""

from __future__ import annotations

import json
import math


def reward_fn(prompts, completions, **_):
    """Fraction of the letter e in the completion: trivially learnable by a tiny model."""
    return [c.count("e") / max(len(c), 1) for c in completions]


def reward_nan(prompts, completions, **_):
    return [math.nan if "boom" in p else 0.0 for p in prompts]


def write_prompts(path, n: int = 16, bad_row: int | None = None, varied: bool = False) -> str:
    """n arithmetic prompts ("boom" at `bad_row`); `varied` adds 0-2 " Think." to vary lengths."""
    with open(path, "w") as f:
        for i in range(n):
            prompt = f"What is {i} plus {i}?" + (" Think." * (i % 3) if varied else "")
            row = {"prompt": "boom" if i == bad_row else prompt, "answer": str(2 * i),
                   "task": "arithmetic"}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return str(path)


def online_config(tiny_dir, data, out, **settings) -> dict:
    """A short LoRA run on the tiny model with `reward_fn`, plus the test's own `settings`."""
    return {
        "model": tiny_dir,
        "data": {"train": data},
        "output_dir": str(out),
        "reward": {"fn": ["tests.online_common:reward_fn"]},
        "max_new_tokens": 8,
        "lr": 1e-2,
        "warmup": 0,
        "log_every": 1,
        "lora": {"r": 4},
        **settings,
    }


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
