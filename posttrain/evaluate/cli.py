"""`posttrain eval MODEL_OR_RUN [tasks=accuracy,gold_reward] [key=value ...]`.

Evaluates a model folder, adapter folder, run directory or hub id on the tiny world's test
splits, prints a table and writes the numbers as JSON (`RUN/eval.json` for a run, else
`./eval.json`, or `output=PATH`). Without `data=DIR` the world data is written to a temp
folder first (under a second).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import help_text, opt, positional_config
from posttrain.errors import UserError
from posttrain.io import write_json


@dataclass
class EvalConfig:
    """`posttrain eval`: what to evaluate, on which data, and where the JSON goes."""

    model: str = opt("", "model folder, adapter folder, run directory or hub id (positional)")
    tasks: list = opt(
        ["accuracy"], "metrics: accuracy, gold_reward, refusal, kl, perplexity, long_context"
    )
    data: str = opt("", "world data folder (posttrain world data DIR); empty = write one now")
    seed: int = opt(0, "world data seed when `data` is empty")
    ref: str = opt("", "reference model for the kl metric")
    limit: int = opt(0, "rows per test file; 0 = all")
    output: str = opt("", "JSON path; empty = RUN/eval.json for a run, else ./eval.json")


def flatten(results: dict) -> list[tuple[str, float]]:
    """("accuracy", x), ("accuracy_by_task/facts", y), ... for printing."""
    rows = []
    for key, value in results.items():
        if isinstance(value, dict):
            rows += [(f"{key}/{k}", v) for k, v in value.items()]
        else:
            rows.append((key, value))
    return rows


def table(results: dict) -> str:
    rows = flatten(results)
    width = max((len(k) for k, _ in rows), default=6)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    lines += [
        f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in rows
    ]
    return "\n".join(lines)


def default_output(model: str) -> Path:
    p = Path(model)
    return p / "eval.json" if (p / "config.yaml").is_file() else Path("eval.json")


def run_eval(cfg: EvalConfig) -> dict:
    """Load the model(s), evaluate, write the JSON; returns the results."""
    from posttrain.evaluate.suite import METRICS, evaluate_world
    from posttrain.modeling.inference import load_for_inference, resolve_model_path
    from posttrain.world.datasets import write_world_data

    if not cfg.model:
        raise UserError("eval needs a model: posttrain eval MODEL_OR_RUN [tasks=...]")
    unknown = [t for t in cfg.tasks if t not in METRICS]
    if unknown:
        raise UserError(f"tasks: unknown metric {unknown[0]!r}; known: {', '.join(METRICS)}")
    if "kl" in cfg.tasks and not cfg.ref:
        raise UserError("tasks: kl needs a reference model: ref=MODEL")
    resolve_model_path(cfg.model)  # fail fast, before writing data
    model, tok = load_for_inference(cfg.model)
    ref = load_for_inference(cfg.ref)[0] if cfg.ref else None
    with tempfile.TemporaryDirectory() as tmp:
        data = cfg.data
        if not data:
            data = tmp
            write_world_data(tmp, seed=cfg.seed, overwrite=True)
        results = evaluate_world(model, tok, data, cfg.tasks, ref, cfg.limit or None)
    write_json(Path(cfg.output) if cfg.output else default_output(cfg.model), results)
    return results


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(help_text(EvalConfig, "eval MODEL_OR_RUN"))
        return
    results = run_eval(positional_config(EvalConfig, argv))
    print(table(results))
