"""PPO against the learned reward model in the tiny world, beside PPO on the gold reward itself.

    posttrain demo output_dir=posttrain-demo          # the SFT run and the reward model
    python evidence/ppo.py --demo posttrain-demo [--out DIR]

Starts from the demo's SFT run with a new LoRA and optimises the demo's reward model (a `posttrain
reward` run) on the world's training prompts (task prompts, harmful and harmless sets), at several
KL settings (one also without `reward_norm`). One more run optimises the hidden gold reward itself
(an oracle reward model: what PPO could reach here if the reward model were perfect). Each run
takes 200 PPO steps (batch 16, 2 minibatches, 2 PPO epochs, 24 new tokens).

Held-out evaluation on the gold prompts (task, harmful and harmless test sets): the mean gold
reward of greedy replies and of sampled ones (temperature 1, what PPO optimises; 4 per prompt,
fixed seed), the learned reward of the greedy replies, task accuracy and the per-token KL to the
SFT model on the greedy replies. All on fixed prompts, so the rows compare: the rewards logged
during training are not (each step's prompts are a different draw of the task/harmful mix).
Prints a Markdown table and writes `results.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import NoReturn

from posttrain.demo import GOLD_SETS
from posttrain.world.rlhf import GOLD_FN, PPO_SETTINGS, learned_reward, sampled_replies

LEARNED, GOLD = "learned", "gold"
RUNS = {
    "gold reward as the reward (oracle), beta 0.05": {"reward": GOLD, "beta": 0.05, "lr": 1e-4},
    "learned, beta 0.2": {"reward": LEARNED, "beta": 0.2, "lr": 1e-4},
    "learned, adaptive beta (target 1)": {"reward": LEARNED, "beta": 0.05, "target_kl": 1.0,
                                          "kl_horizon": 50, "lr": 1e-4},
    "learned, beta 0.05, lr 3e-4": {"reward": LEARNED, "beta": 0.05, "lr": 3e-4},
    "learned, beta 0.05, lr 3e-4, reward_norm off": {"reward": LEARNED, "beta": 0.05, "lr": 3e-4,
                                                     "reward_norm": False},
    "learned, no KL penalty, lr 3e-4": {"reward": LEARNED, "beta": 0.0, "lr": 3e-4},
}  # fmt: skip
COMMON = {**PPO_SETTINGS, "kl_horizon": 1000}  # each run sets beta, lr
SAMPLES = 4  # sampled replies per held-out prompt


def fail(message: str) -> NoReturn:
    """Bad input to an evidence script: one line on stderr and exit code 2, as the CLI does."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def rl_prompts(data: Path) -> Path:
    """The world's online-RL prompts; a demo folder written before they existed must be redone."""
    path = data / "rl_prompts_train.jsonl"
    if not path.is_file():
        fail(f"{path}: not found; rewrite the data: posttrain world data {data} overwrite=true")
    return path


def demo_run(demo: Path, name: str) -> Path:
    """A finished run of the demo folder; a missing one is a one-line error naming the command."""
    path = demo / "runs" / name
    if not (path / "final").is_dir():
        fail(f"{path}: no finished run; write it with: posttrain demo output_dir={demo}")
    return path


def reward_config(kind: str, reward_model: Path) -> dict:
    """The learned reward model, with the gold reward logged beside it at weight 0; or gold."""
    return {"fn": [GOLD_FN]} if kind == GOLD else learned_reward(reward_model)


def sampled_gold(model, tok, rows: list[dict], samples: int = SAMPLES) -> float:
    """Mean gold reward of `samples` replies per prompt at temperature 1 (seeded)."""
    from posttrain.world.gold import gold_reward

    return statistics.mean(
        gold_reward(row["prompt"], text, row.get("answer"))
        for row, texts in sampled_replies(model, tok, rows, samples)
        for text in texts
    )


def evaluate(path: str, sft: str, data: Path, scorer, samples: int = SAMPLES) -> dict:
    """Accuracy, gold reward (greedy and sampled), learned reward and KL to `sft` on the held-out
    gold prompts (see the module doc)."""
    from posttrain.evaluate.generate import generate
    from posttrain.evaluate.kl import response_kl
    from posttrain.evaluate.suite import evaluate_world, read_rows
    from posttrain.modeling.inference import load_for_inference
    from posttrain.world.gold import gold_reward

    model, tok = load_for_inference(path)
    out = evaluate_world(model, tok, data, ("accuracy",))
    rows = [r for name in GOLD_SETS for r in read_rows(data, name)]
    prompts = [r["prompt"] for r in rows]
    replies = generate(model, tok, prompts, max_new_tokens=COMMON["max_new_tokens"])
    out["gold_greedy"] = statistics.mean(
        gold_reward(r["prompt"], reply, r.get("answer")) for r, reply in zip(rows, replies)
    )
    out["gold_sampled"] = sampled_gold(model, tok, rows, samples)
    out["learned_greedy"] = statistics.mean(scorer(prompts, replies))
    if path != sft:
        reference, _ = load_for_inference(sft)
        out["kl_to_sft"] = response_kl(model, reference, tok, prompts)["kl_per_token"]
    return out


def table(results: dict) -> str:
    lines = ["| run | gold, greedy | gold, sampled | learned reward | accuracy | KL to SFT |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        kl = f"{r['kl_to_sft']:.2f}" if "kl_to_sft" in r else "-"
        lines.append(f"| {name} | {r['gold_greedy']:+.3f} | {r['gold_sampled']:+.3f} | "
                     f"{r['learned_greedy']:+.2f} | {r['accuracy']:.3f} | {kl} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default="posttrain-demo", help="a `posttrain demo` folder")
    parser.add_argument("--out", default="ppo-evidence")
    args = parser.parse_args()
    from posttrain.rollout.rewards import RewardModel
    from posttrain.train.ppo import ppo

    demo, out = Path(args.demo), Path(args.out)
    sft, reward_model, data = demo_run(demo, "sft"), demo_run(demo, "reward"), demo / "data"
    out.mkdir(parents=True, exist_ok=True)
    prompts = rl_prompts(data)  # tasks, harmful and harmless requests
    scorer = RewardModel(str(reward_model))
    results = {"SFT": evaluate(str(sft), str(sft), data, scorer)}
    for name, settings in RUNS.items():
        run = out / "".join(c if c.isalnum() else "_" for c in name)
        settings = dict(settings)
        reward = reward_config(settings.pop("reward"), reward_model)
        ppo({**COMMON, **settings, "model": str(sft), "output_dir": str(run),
             "data": {"train": str(prompts)}, "reward": reward})  # fmt: skip
        results[name] = evaluate(str(run), str(sft), data, scorer)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
