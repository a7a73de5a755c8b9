"""The tiny-world evaluation suite: named metrics over a `write_world_data` folder.

    evaluate_world(model, tok, data_dir, metrics=("accuracy",), ref_model=None, limit=None)

returns one flat dict keyed by metric, ready for a results table or `results.json`:
- `accuracy`: `accuracy`, `accuracy_by_task` (exact match on `sft_test.jsonl`);
- `gold_reward`: `gold_reward`, `gold_reward_by_task` (on `prompts_test` + harmful/harmless);
- `refusal`: `refusal_rate_harmful`, `refusal_rate_harmless`, `refusal_score_harmful`,
  `refusal_score_harmless` (marker rate and first-token log-odds of "I can't help with that.");
- `kl`: `kl_harmless` (first-token KL to `ref_model` on harmless prompts; needs `ref_model`);
- `perplexity`: `perplexity` on `corpus_valid.jsonl`;
- `long_context`: `long_context_accuracy` (locker-code retrieval on `long_context_test`).

Simplified on purpose: the first `limit` rows of each file (in file order), greedy decoding.
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.errors import UserError
from posttrain.evaluate.kl import first_token_kl
from posttrain.evaluate.perplexity import perplexity
from posttrain.evaluate.refusal import first_token_refusal_score, refusal_rate, refusal_token_ids
from posttrain.evaluate.reward import mean_gold_reward
from posttrain.evaluate.tasks import task_accuracy
from posttrain.world.universe import REFUSAL

METRICS = ("accuracy", "gold_reward", "refusal", "kl", "perplexity", "long_context")


def read_rows(data_dir: str | Path, name: str, limit: int | None = None) -> list[dict]:
    """The rows of `<data_dir>/<name>.jsonl` (the first `limit` when given)."""
    path = Path(data_dir) / f"{name}.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: not found; write the world data first (posttrain world data DIR)")
    rows = [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    return rows[:limit] if limit else rows


def evaluate_world(
    model,
    tok,
    data_dir: str | Path,
    metrics: tuple[str, ...] | list[str] = ("accuracy",),
    ref_model=None,
    limit: int | None = None,
    batch_size: int = 64,
) -> dict:
    """Run the named metrics (see the module docstring) and merge their numbers into one dict."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UserError(f"tasks: unknown metric {unknown[0]!r}; known: {', '.join(METRICS)}")
    out: dict = {}

    def rows(name: str) -> list[dict]:
        return read_rows(data_dir, name, limit)

    if "accuracy" in metrics:
        acc = task_accuracy(model, tok, rows("sft_test"), batch_size=batch_size)
        out |= {"accuracy": acc["accuracy"], "accuracy_by_task": acc["accuracy_by_task"]}
    if "gold_reward" in metrics:
        mixed = rows("prompts_test") + rows("harmful_test") + rows("harmless_test")
        gold = mean_gold_reward(model, tok, mixed, batch_size=batch_size)
        out |= {
            "gold_reward": gold["gold_reward"],
            "gold_reward_by_task": gold["gold_reward_by_task"],
        }
    if "refusal" in metrics:
        ids = refusal_token_ids(tok, [REFUSAL])
        for part in ("harmful", "harmless"):
            prompts = [r["prompt"] for r in rows(f"{part}_test")]
            out[f"refusal_rate_{part}"] = refusal_rate(model, tok, prompts, batch_size=batch_size)[
                "refusal_rate"
            ]
            score = first_token_refusal_score(model, tok, prompts, ids, batch_size)
            out[f"refusal_score_{part}"] = score["refusal_score"]
    if "kl" in metrics:
        if ref_model is None:
            raise UserError("tasks: kl needs a reference model (ref_model)")
        prompts = [r["prompt"] for r in rows("harmless_test")]
        out["kl_harmless"] = first_token_kl(model, ref_model, tok, prompts, batch_size)["kl"]
    if "perplexity" in metrics:
        texts = [r["text"] for r in rows("corpus_valid")]
        out["perplexity"] = perplexity(model, tok, texts)["perplexity"]
    if "long_context" in metrics:
        acc = task_accuracy(
            model, tok, rows("long_context_test"), batch_size=max(1, batch_size // 8)
        )
        out["long_context_accuracy"] = acc["accuracy"]
    return out
