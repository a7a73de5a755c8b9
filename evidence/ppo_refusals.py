"""PPO from an SFT model that has seen refusals, against a reward model trained on that model's
own samples, over seeds and beside a random-reward control, in the tiny world.

    posttrain demo output_dir=posttrain-demo          # the SFT run and the world's data
    python evidence/ppo_refusals.py --demo posttrain-demo [--out DIR] [--seeds 3]
    python evidence/ppo_refusals.py --demo posttrain-demo --flawed 0.67 --target-kl 2

The demo's SFT model never saw a refusal, so on-policy RL cannot find one (`evidence/ppo.py`).
InstructGPT's pipeline, in small (steps 1 and 2 are `posttrain/world/rlhf.py`, which explains
them; the demo's PPO stage runs it once with `--flawed 0.67 --target-kl 2` and seed 0):
1. SFT with refusals: a full fine-tune of the demo's SFT run on the world's refusal
   demonstrations plus 600 task chats; with `--flawed F`, a fraction F of the answers in that mix
   (not the refusals) are made rude or rambling.
2. A reward model on the world's preference pairs plus gold-labelled comparisons of the SFT
   model's own samples.
3. PPO from the SFT model (200 steps, lr 1e-4, beta 0.05, the full vocabulary at temperature
   1), against the gold reward itself (the oracle), the reward model, and a random reward (a
   control: a standard normal drawn from a hash of the prompt and reply, so any change it makes
   is PPO's drift, not signal), each over `--seeds` seeds; and the reward model once at lr 3e-4
   and once without the KL penalty (more optimisation against the same reward model).
   `--target-kl` turns on the adaptive KL controller (nats per reply); the table's last column
   is the KL per reply over the last 40 training steps.
Evaluated as in `evidence/ppo.py`, with 16 sampled replies per prompt. Prints a Markdown table
(the mean over seeds, with the range) and writes `results.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
from pathlib import Path

from ppo import COMMON, GOLD, LEARNED, demo_run, evaluate, fail, reward_config, rl_prompts

from posttrain.world.rlhf import prepare

RANDOM = "random"
SAMPLES = 16  # sampled replies per held-out prompt
PPO = {**COMMON, "lr": 1e-4, "beta": 0.05}
SEEDED = {
    "gold reward as the reward (oracle)": {"reward": GOLD},
    "learned reward model": {"reward": LEARNED},
    "random reward (control)": {"reward": RANDOM},
}
ONCE = {
    "learned reward model, lr 3e-4": {"reward": LEARNED, "lr": 3e-4},
    "learned reward model, no KL penalty": {"reward": LEARNED, "beta": 0.0, "target_kl": 0.0},
}
METRICS = ("gold_greedy", "gold_sampled", "learned_greedy", "accuracy", "kl_to_sft", "kl_training")


def random_reward(prompts: list, completions: list[str], **_) -> list[float]:
    """A reward without signal: a standard normal drawn from a hash of each (prompt, reply)."""
    out = []
    for prompt, completion in zip(prompts, completions):
        digest = hashlib.sha256(f"{prompt}\x00{completion}".encode()).digest()
        u = (int.from_bytes(digest[:8], "big") + 0.5) / 2**64
        out.append(statistics.NormalDist().inv_cdf(u))
    return out


def ppo_reward(kind: str, reward_model: Path) -> dict:
    """PPO's `reward` config for a run kind (the random control is this module's function)."""
    return (
        {"fn": ["ppo_refusals:random_reward"]}
        if kind == RANDOM
        else reward_config(kind, reward_model)
    )


def same_settings(out: Path, settings: dict) -> None:
    """Runs in `out` are reused, so they must have been made with these settings (recorded)."""
    path = out / "settings.json"
    if path.is_file() and json.loads(path.read_text()) != settings:
        fail(f"{out} was made with {path.read_text().strip()}, not {json.dumps(settings)}; "
             "choose another --out")  # fmt: skip
    path.write_text(json.dumps(settings) + "\n")


def training_kl(run: Path, last: int = 10) -> float:
    """Mean KL to the SFT model per reply (what `target_kl` bounds) over the last logged steps."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.mean([r["kl"] for r in rows if "kl" in r][-last:])


def cell(values: list[float], signed: bool) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    mean = fmt.format(statistics.mean(values))
    if len(values) == 1:
        return mean
    return f"{mean} ({fmt.format(min(values))}..{fmt.format(max(values))})"


def seed_table(results: dict[str, list[dict]]) -> str:
    """One row per run: each metric's mean over its seeds, with the range when there are several."""
    lines = ["| run | seeds | gold, greedy | gold, sampled | learned reward | accuracy | KL to SFT "
             "| KL per reply, training |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, runs in results.items():
        cells = [cell([r[m] for r in runs], m in METRICS[:3])
                 if m in runs[0] else "-" for m in METRICS]  # fmt: skip
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default="posttrain-demo", help="a `posttrain demo` folder")
    parser.add_argument("--out", help="default: ppo-refusals-evidence[-flawed]")
    parser.add_argument("--seeds", type=int, default=3, help="PPO seeds per seeded run")
    parser.add_argument("--flawed", type=float, default=0.0,
                        help="fraction of the SFT answers made rude or rambling")  # fmt: skip
    parser.add_argument("--target-kl", type=float, default=0.0,
                        help="PPO's adaptive KL target, nats per reply (0: beta stays fixed)")  # fmt: skip
    args = parser.parse_args()
    if not 0 <= args.flawed <= 1 or args.seeds < 1 or args.target_kl < 0:
        fail("need 0 <= --flawed <= 1, --seeds >= 1 and --target-kl >= 0")
    from posttrain.rollout.rewards import RewardModel
    from posttrain.train.ppo import ppo

    demo = Path(args.demo)
    out = Path(args.out or "ppo-refusals-evidence" + ("-flawed" if args.flawed else ""))
    data, prompts = demo / "data", rl_prompts(demo / "data")
    out.mkdir(parents=True, exist_ok=True)
    same_settings(out, {"flawed": args.flawed, "target_kl": args.target_kl})
    sft_run, reward_run = out / "sft_refusals", out / "reward_own_samples"
    own = prepare(str(demo_run(demo, "sft")), data, sft_run, reward_run, args.flawed)
    if own:
        print(f"{own} pairs of the SFT model's own samples")
    scorer = RewardModel(str(reward_run))
    label = "SFT with flawed demonstrations" if args.flawed else "SFT with refusals"
    results = {label: [evaluate(str(sft_run), str(sft_run), data, scorer, SAMPLES)]}
    runs = [(n, s, seed) for n, s in SEEDED.items() for seed in range(args.seeds)]
    for name, settings, seed in runs + [(n, s, 0) for n, s in ONCE.items()]:
        settings = dict(settings)
        reward_source = ppo_reward(settings.pop("reward"), reward_run)
        run = out / f"{''.join(c if c.isalnum() else '_' for c in name)}_seed{seed}"
        ppo({**PPO, "target_kl": args.target_kl, **settings, "seed": seed, "model": str(sft_run),
             "output_dir": str(run), "data": {"train": str(prompts)}, "reward": reward_source})  # fmt: skip
        result = evaluate(str(run), str(sft_run), data, scorer, SAMPLES)
        results.setdefault(name, []).append({**result, "kl_training": training_kl(run)})
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(seed_table(results))


if __name__ == "__main__":
    main()
