"""PPO from an SFT model whose demonstrations include refusals, in the tiny world.

    posttrain demo output_dir=posttrain-demo          # the SFT run and the world's data
    python evidence/ppo_refusals.py --demo posttrain-demo [--out DIR]

The demo's SFT model never saw a refusal, so on-policy RL cannot find one (`evidence/ppo.py`).
InstructGPT's SFT data covers every kind of prompt; this script does the same in small:
1. SFT with refusals: a LoRA on the demo's SFT run, 2 epochs at lr 3e-4 on the world's refusal
   demonstrations (`refusal_sft_train`: harmful -> refusal, how-to -> answer) plus 600 task
   chats, so that the model refuses harmful requests greedily but still over-refuses some
   harmless ones and writes weak how-to answers;
2. a reward model from it: a last-token head (`readout=last`, lr 5e-4, 4 epochs) on the
   gold-labelled preference pairs (the log-likelihood readout of the demo scores compliance
   above refusal on harmful prompts, see `evidence/reward_probe.py`);
3. PPO from the SFT model, 200 steps as in `evidence/ppo.py`, sampling from the 5 most likely
   tokens (`top_k=5`; at temperature 1 the tiny model's long tail swallows the apostrophe of
   "can't", so full-vocabulary samples almost never refuse), against the gold reward itself
   (the oracle) and against that reward model at two betas.
Evaluated as in `evidence/ppo.py` (sampled replies with the same top_k). Prints a Markdown
table and writes `results.json`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from ppo import COMMON, GOLD, LEARNED, evaluate, reward_config, rl_prompts, table

TOP_K = 5
SFT = {
    "adapter": "lora", "lora": {"r": 16, "alpha": 32}, "packing": False, "max_length": 512,
    "batch_size": 16, "epochs": 2, "lr": 3e-4, "warmup": 0.0, "schedule": "constant",
    "log_every": 10, "offline": True, "seed": 0,
}  # fmt: skip
REWARD = {
    "readout": "last", "batch_size": 16, "epochs": 4, "lr": 5e-4, "schedule": "constant",
    "warmup": 0.0, "max_grad_norm": 0.0, "log_every": 10, "offline": True,
}  # fmt: skip
RUNS = {
    "gold reward as the reward (oracle), beta 0.05": {"reward": GOLD, "beta": 0.05},
    "learned reward model, beta 0.05": {"reward": LEARNED, "beta": 0.05},
    "learned reward model, beta 0.2": {"reward": LEARNED, "beta": 0.2},
}
PPO = {**COMMON, "lr": 1e-4, "top_k": TOP_K}


def write_mix(data: Path, path: Path) -> None:
    """The refusal demonstrations plus 600 of the SFT task chats, shuffled (seeded)."""
    tasks = (data / "sft_train.jsonl").read_text().splitlines()
    random.Random(0).shuffle(tasks)
    rows = (data / "refusal_sft_train.jsonl").read_text().splitlines() + tasks[:600]
    random.Random(1).shuffle(rows)
    path.write_text("\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default="posttrain-demo", help="a `posttrain demo` folder")
    parser.add_argument("--out", default="ppo-refusals-evidence")
    args = parser.parse_args()
    from posttrain.rollout.rewards import RewardModel
    from posttrain.train.ppo import ppo
    from posttrain.train.reward import reward
    from posttrain.train.sft import sft

    demo, out = Path(args.demo), Path(args.out)
    data = demo / "data"
    out.mkdir(parents=True, exist_ok=True)
    sft_run, reward_run = out / "sft_refusals", out / "reward_last"
    if not (sft_run / "final").is_dir():
        write_mix(data, out / "sft_mix.jsonl")
        sft({**SFT, "model": str(demo / "runs" / "sft"), "output_dir": str(sft_run),
             "data": {"train": str(out / "sft_mix.jsonl")}})  # fmt: skip
    if not (reward_run / "final").is_dir():
        reward({**REWARD, "model": str(sft_run), "output_dir": str(reward_run),
                "data": {"train": str(data / "preference_train.jsonl")}})  # fmt: skip
    scorer = RewardModel(str(reward_run))
    results = {"SFT with refusals": evaluate(str(sft_run), str(sft_run), data, scorer, TOP_K)}
    for name, settings in RUNS.items():
        run = out / "".join(c if c.isalnum() else "_" for c in name)
        ppo({**PPO, "beta": settings["beta"], "model": str(sft_run), "output_dir": str(run),
             "data": {"train": str(rl_prompts(data))},
             "reward": reward_config(settings["reward"], reward_run)})  # fmt: skip
        results[name] = evaluate(str(run), str(sft_run), data, scorer, TOP_K)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
