"""GRPO with a verifiable reward in the tiny world: arithmetic accuracy before and after.

    python evidence/grpo.py [--out DIR] [--engine hf|vllm]

Trains a short SFT model (the demo's `--quick` settings: LoRA r 16, 3 epochs at lr 2e-3, so
arithmetic has room to improve), then GRPO with a new LoRA on the 500 arithmetic training
prompts with the exact-answer reward (`posttrain.rollout.rewards:exact_answer`): 8 prompts x
8 completions per step, 150 steps, lr 1e-3, beta 0. Both settings are the demo's own
(`posttrain.demo`), so this is the demo's GRPO stage on its own. Evaluates exact-match
accuracy per task kind on the held-out split before and after; prints a Markdown table,
writes results_ENGINE.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from posttrain.demo import GRPO_SETTINGS as GRPO  # the demo's GRPO stage is this run
from posttrain.demo import sft_settings

SFT = sft_settings(quick=True)


def accuracy(path: Path, data: Path) -> dict:
    from posttrain.evaluate.suite import evaluate_world
    from posttrain.modeling.inference import load_for_inference

    model, tok = load_for_inference(str(path))
    return evaluate_world(model, tok, data, ("accuracy",))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="grpo-evidence")
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                        help="GRPO's sampler (vllm: in a venv with vLLM, `make test-vllm`)")  # fmt: skip
    args = parser.parse_args()
    from posttrain.train.grpo import grpo
    from posttrain.train.sft import sft
    from posttrain.world.datasets import write_world_data
    from posttrain.world.pretrain import BASE_DIR

    out = Path(args.out)
    data = out / "data"
    if not (data / "manifest.json").is_file():
        write_world_data(data, seed=0, overwrite=True)
    prompts = out / "arithmetic_prompts.jsonl"
    rows = [json.loads(x) for x in (data / "prompts_train.jsonl").read_text().splitlines()]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows if r["task"] == "arithmetic"))
    sft_run, grpo_run = out / "sft", out / ("grpo" if args.engine == "hf" else "grpo_vllm")
    if not (sft_run / "final").is_dir():
        sft({**SFT, "model": str(BASE_DIR), "output_dir": str(sft_run),
             "data": {"train": str(data / "sft_train.jsonl")}})  # fmt: skip
    if not (grpo_run / "final").is_dir():
        grpo({**GRPO, "engine": args.engine, "model": str(sft_run), "output_dir": str(grpo_run),
              "data": {"train": str(prompts)}})  # fmt: skip
    results = {"SFT": accuracy(sft_run, data), "SFT + GRPO": accuracy(grpo_run, data)}
    (out / f"results_{args.engine}.json").write_text(json.dumps(results, indent=2) + "\n")
    kinds = ("arithmetic", "facts", "strings", "translation")
    print("| model | " + " | ".join(kinds) + " | mean |\n|" + "---|" * (len(kinds) + 2))
    for name, r in results.items():
        cells = " | ".join(f"{r['accuracy_by_task'][k]:.2f}" for k in kinds)
        print(f"| {name} | {cells} | {r['accuracy']:.3f} |")


if __name__ == "__main__":
    main()
