"""Where the demo's reward model helps PPO and where it cannot: its scores on held-out pairs.

    posttrain demo output_dir=posttrain-demo
    python evidence/reward_probe.py --demo posttrain-demo

For the held-out preference pairs, grouped by prompt kind (harmful, how-to, task), prints the
reward model's mean score of the chosen and the rejected answer, its pairwise accuracy, its
mean score of the SFT model's greedy reply, and how often that greedy reply outscores the
chosen answer. A reward model that prefers the policy's own replies to the gold-preferred
answer pushes PPO away from the gold reward on that kind of prompt.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ppo import demo_run


def kind_of(prompt: str) -> str:
    from posttrain.world.gold import howto_topic, is_harmful

    return "harmful" if is_harmful(prompt) else "howto" if howto_topic(prompt) else "task"


def text(value) -> str:
    return value if isinstance(value, str) else value[-1]["content"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default="posttrain-demo", help="a `posttrain demo` folder")
    args = parser.parse_args()
    from posttrain.evaluate.generate import generate
    from posttrain.modeling.inference import load_for_inference
    from posttrain.rollout.rewards import RewardModel

    demo = Path(args.demo)
    sft, reward_run = demo_run(demo, "sft"), demo_run(demo, "reward")
    lines = (demo / "data" / "preference_test.jsonl").read_text().splitlines()
    groups: dict[str, list[dict]] = {}
    for row in map(json.loads, lines):
        groups.setdefault(kind_of(text(row["prompt"])), []).append(row)
    reward = RewardModel(str(reward_run))
    model, tok = load_for_inference(str(sft))
    print("| prompts | pairs | chosen | rejected | accuracy | SFT greedy | greedy > chosen |")
    print("|---|---|---|---|---|---|---|")
    for kind, rows in sorted(groups.items()):
        prompts = [r["prompt"] for r in rows]
        chosen = reward(prompts, [text(r["chosen"]) for r in rows])
        rejected = reward(prompts, [text(r["rejected"]) for r in rows])
        greedy = reward(prompts, generate(model, tok, prompts, 16, 64))
        n = len(rows)
        print(f"| {kind} | {n} | {sum(chosen) / n:+.2f} | {sum(rejected) / n:+.2f} | "
              f"{sum(c > r for c, r in zip(chosen, rejected)) / n:.2f} | {sum(greedy) / n:+.2f} | "
              f"{sum(g > c for g, c in zip(greedy, chosen)) / n:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
