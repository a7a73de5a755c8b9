"""PPO against the learned reward model in the tiny world, with and without the KL penalty.

    posttrain demo output_dir=posttrain-demo          # the SFT run and the reward model
    python evidence/ppo.py --demo posttrain-demo [--out DIR]

Starts from the demo's SFT run with a new LoRA and optimises the demo's reward model (a
`posttrain reward` run) on the world's training prompts (task prompts, harmful and harmless
sets). The tiny world's gold reward is computed for every sample as a logged source of weight
0, so the training log shows the learned reward and the gold reward of the same completions.
Each setting runs 200 PPO steps (batch 16, 2 minibatches, 2 PPO epochs, 24 new tokens); then
the held-out evaluation: task accuracy, mean gold reward of greedy replies and the per-token
KL to the SFT model. Prints a Markdown table and writes `results.json`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

RUNS = {
    "beta 0.2, lr 1e-4": {"beta": 0.2, "target_kl": 0.0, "lr": 1e-4},
    "adaptive beta (target 1, horizon 50), lr 1e-4": {"beta": 0.05, "target_kl": 1.0,
                                                      "kl_horizon": 50, "lr": 1e-4},
    "beta 0.05 (target 2), lr 3e-4": {"beta": 0.05, "target_kl": 2.0, "lr": 3e-4},
    "no KL penalty, lr 3e-4": {"beta": 0.0, "target_kl": 0.0, "lr": 3e-4},
}  # fmt: skip
COMMON = {
    "lora": {"r": 16, "alpha": 32}, "batch_size": 16, "num_minibatches": 2, "ppo_epochs": 2,
    "max_new_tokens": 24, "max_steps": 200, "warmup": 0, "schedule": "constant",
    "log_every": 4, "kl_horizon": 1000, "offline": True,
}  # fmt: skip
GOLD_SETS = ("prompts_test", "harmful_test", "harmless_test")


def write_prompts(data: Path, path: Path) -> None:
    rows = []
    for name in ("prompts_train", "harmful_train", "harmless_train"):
        for line in (data / f"{name}.jsonl").read_text().splitlines():
            r = json.loads(line)
            answer = r.get("answer") if name == "prompts_train" else None
            rows.append({"prompt": r["prompt"], "answer": answer, "task": r.get("task")})
    random.Random(0).shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def evaluate(path: str, sft: str, data: Path) -> dict:
    from posttrain.evaluate.kl import response_kl
    from posttrain.evaluate.suite import evaluate_world, read_rows
    from posttrain.modeling.inference import load_for_inference

    model, tok = load_for_inference(path)
    out = evaluate_world(model, tok, data, ("accuracy", "gold_reward"))
    if path != sft:
        reference, _ = load_for_inference(sft)
        prompts = [r["prompt"] for name in GOLD_SETS for r in read_rows(data, name)]
        out["kl_to_sft"] = response_kl(model, reference, tok, prompts)["kl_per_token"]
    return out


def training_trend(run: Path) -> str:
    """Learned and gold reward of the samples over the first and last 10 logged steps."""
    logs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in logs if "reward/gold" in r]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    first, last = logs[:10], logs[-10:]
    return (f"learned {mean(first, 'reward/reward_model'):.2f} -> "
            f"{mean(last, 'reward/reward_model'):.2f}, gold {mean(first, 'reward/gold'):.2f} -> "
            f"{mean(last, 'reward/gold'):.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default="posttrain-demo", help="a `posttrain demo` folder")
    parser.add_argument("--out", default="ppo-evidence")
    args = parser.parse_args()
    from posttrain.train.ppo import ppo

    demo, out = Path(args.demo), Path(args.out)
    sft, reward, data = demo / "runs" / "sft", demo / "runs" / "reward", demo / "data"
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"
    write_prompts(data, prompts)
    results = {"SFT": evaluate(str(sft), str(sft), data)}
    for name, settings in RUNS.items():
        run = out / "".join(c if c.isalnum() else "_" for c in name)
        reward_cfg = {"model": str(reward), "fn": ["posttrain.rollout.rewards:gold"],
                      "weights": [0.0, 1.0]}  # fmt: skip
        ppo({**COMMON, **settings, "model": str(sft), "output_dir": str(run),
             "data": {"train": str(prompts)}, "reward": reward_cfg})  # fmt: skip
        results[name] = {**evaluate(str(run), str(sft), data), "trend": training_trend(run)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| run | accuracy | gold reward (held out) | KL to SFT | during training |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        kl = f"{r['kl_to_sft']:.2f}" if "kl_to_sft" in r else "-"
        lines.append(f"| {name} | {r['accuracy']:.3f} | {r['gold_reward']:+.3f} | {kl} | "
                     f"{r.get('trend', '')} |")  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
