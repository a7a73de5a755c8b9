"""The reward-vs-KL frontier in the tiny world: DPO and PPO at several betas (cf. Figure 2 of
the DPO paper), as gold reward of held-out greedy replies against KL to the SFT model (the
table also has the sampled replies' gold reward and the learned reward, as `evidence/ppo.py`).

    posttrain demo output_dir=posttrain-demo
    python evidence/frontier.py --demo posttrain-demo [--out DIR] [--seed N]

DPO: LoRA on the demo's SFT run, the gold-labelled pairs, with the chosen NLL (RPO,
`sft_weight=1`), 3 epochs at lr 1e-3 per beta. PPO: as `evidence/ppo.py` (200 steps against
the demo's reward model, lr 1e-4, fixed beta, rewards normalised). Writes `frontier.png`, `results.json` and
prints a Markdown table; adds both to the demo folder's `report.md` (a section, replaced on each
run; a new `posttrain demo` run rewrites the report without it, as its SFT model is new).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ppo import COMMON as PPO_COMMON
from ppo import demo_run, evaluate, rl_prompts, table

DPO_BETAS = (0.05, 0.1, 0.3, 1.0)
PPO_BETAS = (0.02, 0.05, 0.1, 0.2, 0.5)
DPO = {
    "adapter": "lora", "lora": {"r": 16, "alpha": 32}, "loss": "dpo", "sft_weight": 1.0,
    "lr": 1e-3, "epochs": 3, "batch_size": 16, "max_length": 256, "warmup": 0.05,
    "log_every": 50, "offline": True,
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default="posttrain-demo", help="a `posttrain demo` folder")
    parser.add_argument("--out", default="frontier-evidence")
    parser.add_argument("--seed", type=int, default=42,
                        help="training seed of every DPO/PPO run (42: the config default)")  # fmt: skip
    args = parser.parse_args()
    from posttrain.rollout.rewards import RewardModel
    from posttrain.train.dpo import dpo
    from posttrain.train.ppo import ppo

    demo, out = Path(args.demo), Path(args.out)
    sft, reward, data = demo_run(demo, "sft"), demo_run(demo, "reward"), demo / "data"
    out.mkdir(parents=True, exist_ok=True)
    prompts = rl_prompts(data)
    scorer = RewardModel(str(reward))
    results: dict[str, dict] = {"SFT": evaluate(str(sft), str(sft), data, scorer)}
    seed = {"seed": args.seed}
    tag = f"_seed{args.seed}" if args.seed != 42 else ""  # a run folder per seed
    for beta in DPO_BETAS:
        run = out / f"dpo_beta{beta}{tag}"
        if not (run / "final").is_dir():
            dpo({**DPO, **seed, "beta": beta, "model": str(sft), "output_dir": str(run),
                 "data": {"train": str(data / "preference_train.jsonl")}})  # fmt: skip
        results[f"DPO beta {beta}"] = evaluate(str(run), str(sft), data, scorer)
    for beta in PPO_BETAS:
        run = out / f"ppo_beta{beta}{tag}"
        if not (run / "final").is_dir():
            reward_cfg = {"model": str(reward)}
            ppo({**PPO_COMMON, **seed, "beta": beta, "target_kl": 0.0, "lr": 1e-4, "model": str(sft),
                 "output_dir": str(run), "data": {"train": str(prompts)},
                 "reward": reward_cfg})  # fmt: skip
        results[f"PPO beta {beta}"] = evaluate(str(run), str(sft), data, scorer)
    (out / f"results{tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "frontier.png")
    add_to_report(demo, results, out / "frontier.png")
    print(table(results))
    runs = [json.loads(path.read_text()) for path in sorted(out.glob("results*.json"))]
    if len(runs) > 1:
        print(f"\nOver the {len(runs)} seeds in {out}, mean (min-max):\n\n{seeds_table(runs)}")


def seeds_table(runs: list[dict]) -> str:
    """Greedy gold and KL to SFT over several seeds' results: mean (min-max) per row."""
    import statistics

    def cell(values: list[float], fmt: str) -> str:
        if max(values) == min(values):
            return format(values[0], fmt)
        spread = f"{min(values):{fmt}} to {max(values):{fmt}}"
        return f"{statistics.mean(values):{fmt}} ({spread})"

    lines = ["| run | gold, greedy | KL to SFT |", "|---|---|---|"]
    for name in runs[0]:
        gold = cell([r[name]["gold_greedy"] for r in runs], "+.3f")
        kl = (
            cell([r[name]["kl_to_sft"] for r in runs], ".2f")
            if "kl_to_sft" in runs[0][name]
            else "-"
        )
        lines.append(f"| {name} | {gold} | {kl} |")
    return "\n".join(lines)


SECTION = "## Reward vs KL: DPO and PPO at several betas (evidence/frontier.py)"


def add_to_report(demo: Path, results: dict, figure: Path) -> None:
    """Put the table and the figure into the demo's report.md, replacing an earlier section."""
    import shutil

    from posttrain.io import write_text_atomic

    if not (demo / "report.md").is_file():  # an interrupted demo: the figure stays in --out
        print(f"{demo / 'report.md'}: not found; the frontier is not added to it")
        return
    (demo / "plots").mkdir(exist_ok=True)
    shutil.copyfile(figure, demo / "plots" / "frontier.png")
    text = (demo / "report.md").read_text()
    start = text.find(SECTION)
    if start >= 0:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + (text[end + 1 :] if end >= 0 else "")
    section = [SECTION, "", table(results), "", "![reward vs KL](plots/frontier.png)", "", ""]
    at = text.find("## Completions")
    at = at if at >= 0 else len(text)
    write_text_atomic(demo / "report.md", text[:at] + "\n".join(section) + text[at:])


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, marker in (("DPO", "o"), ("PPO", "s")):
        points = [(r["kl_to_sft"], r["gold_greedy"], name.split()[-1])
                  for name, r in results.items() if name.startswith(method)]  # fmt: skip
        ax.plot([p[0] for p in points], [p[1] for p in points], marker, label=method)
        for x, y, beta in points:
            ax.annotate(f"β={beta}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(results["SFT"]["gold_greedy"], color="grey", ls="--", label="SFT")
    ax.set_xlabel("KL(policy || SFT) per token, held-out greedy replies")
    ax.set_ylabel("mean gold reward, held out")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
