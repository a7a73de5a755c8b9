"""`posttrain demo [--quick] [output_dir=DIR]`: the whole story on the tiny world.

Loads the shipped base model, writes the world's datasets, then runs each stage in
`STAGES` in order: a stage trains (or not) and names the model it produced; the demo
evaluates every policy model on the same test split and shows its completions of the same
prompts (a stage with its own `evaluate`, like the reward model, reports its own numbers),
and writes the report folder:

    DIR/report.md       results table and example completions, stage by stage
    DIR/results.json    every number of the report: {stage: {metric: value}}
    DIR/plots/*.png     training curves of each trained stage
    DIR/runs/<stage>/   the run directories (adapters, metrics.jsonl, config.yaml)
    DIR/data/           the world's datasets

A new stage is one `Stage(name, title, train)` line plus its `train` function, which
takes the demo context and returns the model folder or run directory it produced (and an
`evaluate` function when the model is not a chat policy).
`--quick` trains and evaluates less (3-4 minutes; DPO runs 30 steps, GRPO and PPO 20); the
tests run it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.config import help_text, load_config, opt
from posttrain.errors import UserError
from posttrain.io import write_json, write_text_atomic

PROMPTS = (
    "Translate cheese from English to French.",
    "What is 7 + 5?",
    "What is the capital of Norway?",
    "Reverse the letters: d, o, g",
    "What does Alice do for a living?",
)


POLICY_METRICS = ("accuracy", "gold_reward", "perplexity")
GOLD_SETS = ("prompts_test", "harmful_test", "harmless_test")  # what gold_reward generates on
ABLITERATION_METRICS = ("refusal_rate_harmful", "refusal_rate_harmless", "accuracy", "perplexity")
DPO_SETTINGS = {
    "adapter": "lora", "lora": {"r": 16, "alpha": 32}, "loss": "dpo", "beta": 0.1,
    "sft_weight": 1.0, "lr": 5e-4, "epochs": 6, "batch_size": 16, "max_length": 256,
    "warmup": 0.05, "log_every": 10, "offline": True,
}  # fmt: skip
GRPO_SETTINGS = {
    "adapter": "lora", "lora": {"r": 16, "alpha": 32}, "batch_size": 8, "num_generations": 8,
    "reward": {"fn": ["posttrain.rollout.rewards:exact_answer"]}, "max_new_tokens": 12,
    "max_steps": 150, "lr": 1e-3, "warmup": 0.05, "beta": 0.0, "log_every": 10, "offline": True,
}  # fmt: skip


@dataclass
class DemoConfig:
    """`posttrain demo`: where the report goes and how long to train."""

    output_dir: str = opt("posttrain-demo", "report folder (re-running replaces its contents)")
    quick: bool = opt(False, "a 2-3 minute version: fewer SFT steps and test rows")
    base: str = opt("", "base model folder; empty = the shipped tiny-world base")
    seed: int = opt(0, "world data seed")


@dataclass
class Context:
    """What stages share: the config, folders, and the models produced so far."""

    cfg: DemoConfig
    out: Path
    data: Path
    base: str
    models: dict[str, str] = field(default_factory=dict)

    @property
    def quick(self) -> bool:
        return self.cfg.quick


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    train: Callable[[Context], str]  # returns a model folder or run directory
    evaluate: Callable[[Context, str], tuple[dict, dict]] | None = None  # None: a policy model
    headline: str = "accuracy"  # the metric printed as the stage ends


def train_base(ctx: Context) -> str:
    return ctx.base


def train_sft(ctx: Context) -> str:
    from posttrain.train.sft import sft

    run = ctx.out / "runs" / "sft"
    sft(
        {
            "model": ctx.base,
            "data": {"train": str(ctx.data / "sft_train.jsonl")},
            "output_dir": str(run),
            "adapter": "lora",
            "lora": {"r": 16, "alpha": 32},
            "packing": False,
            "max_length": 512,
            "batch_size": 16,
            "epochs": 3 if ctx.quick else 10,
            "lr": 2e-3 if ctx.quick else 1e-3,
            "warmup": 0.05,
            "log_every": 10,
            "offline": True,
        }
    )
    return str(run)


def train_reward(ctx: Context) -> str:
    """A reward model on the gold-labelled preference pairs: a score head plus a learned weight
    x the SFT model's log-likelihood of the response (`readout=last+loglik`; the SFT model is
    frozen). A last-token head alone, from the base or the SFT model, stays near 0.88: it cannot
    tell right answers from wrong ones."""
    from posttrain.train.reward import reward

    run = ctx.out / "runs" / "reward"
    reward({"model": ctx.models["sft"], "readout": "last+loglik",
            "data": {"train": str(ctx.data / "preference_train.jsonl")},
            "output_dir": str(run), "batch_size": 16, "epochs": 1 if ctx.quick else 4,
            "lr": 1e-2, "schedule": "constant", "warmup": 0.0, "max_grad_norm": 0.0,
            "log_every": 10, "offline": True})  # fmt: skip
    return str(run)


def evaluate_reward(ctx: Context, model_path: str) -> tuple[dict, dict]:
    """Pairwise accuracy on held-out preference pairs, overall and by kind of pair."""
    from posttrain.evaluate.suite import read_rows
    from posttrain.evaluate.tasks import by_task
    from posttrain.train.reward import load_scorer, score

    model, tok = load_scorer(model_path)
    rows = read_rows(ctx.data, "preference_test", 100 if ctx.quick else None)
    chosen = score(model, tok, [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
    rejected = score(
        model, tok, [{"prompt": r["prompt"], "completion": r["rejected"]} for r in rows]
    )
    wins = [float(c > r) for c, r in zip(chosen, rejected)]
    metrics = {
        "pairwise_accuracy": sum(wins) / len(wins),
        "pairwise_accuracy_by_pair": by_task(wins, [r["pair"] for r in rows]),
    }
    return metrics, {}


def train_dpo(ctx: Context) -> str:
    """DPO (with the RPO NLL term) from the SFT run on the gold-labelled preference pairs."""
    from posttrain.train.dpo import dpo

    run = ctx.out / "runs" / "dpo"
    dpo({**DPO_SETTINGS, "model": ctx.models["sft"], "output_dir": str(run),
         "data": {"train": str(ctx.data / "preference_train.jsonl")},
         **({"max_steps": 30} if ctx.quick else {})})  # fmt: skip
    return str(run)


def train_grpo(ctx: Context) -> str:
    """GRPO from the SFT run with the exact-answer reward on the task prompts."""
    from posttrain.train.grpo import grpo

    run = ctx.out / "runs" / "grpo"
    grpo({**GRPO_SETTINGS, "model": ctx.models["sft"], "output_dir": str(run),
          "data": {"train": str(ctx.data / "prompts_train.jsonl")},
          **({"max_steps": 20} if ctx.quick else {})})  # fmt: skip
    return str(run)


def train_ppo(ctx: Context) -> str:
    """InstructGPT in small (`world/rlhf.py`): a full fine-tune of the SFT run on demonstrations
    two thirds of which are rude or rambling, a reward model on comparisons of its own samples,
    and PPO against that (the gold reward logged beside it at weight 0). From the demo's own SFT
    model PPO has nothing to fix: it never samples a refusal (README, "PPO")."""
    from posttrain.train.ppo import ppo
    from posttrain.world import rlhf

    runs = ctx.out / "runs"
    sft_run, reward_run, run = runs / "sft_flawed", runs / "reward_own_samples", runs / "ppo"
    rlhf.prepare(ctx.models["sft"], ctx.data, sft_run, reward_run, rlhf.FLAWED, ctx.quick)
    ctx.models["sft_flawed"], ctx.models["reward_own_samples"] = str(sft_run), str(reward_run)
    ppo({**rlhf.FLAWED_PPO, "model": str(sft_run), "output_dir": str(run),
         "reward": rlhf.learned_reward(reward_run),
         "data": {"train": str(ctx.data / "rl_prompts_train.jsonl")},
         **({"max_steps": 20} if ctx.quick else {})})  # fmt: skip
    return str(run)


def evaluate_ppo(ctx: Context, run: str) -> tuple[dict, dict]:
    """The flawed-demonstration SFT model and PPO from it: gold reward (by kind of prompt) and
    accuracy of each, PPO's KL per token to it on greedy replies and per reply in training."""
    from posttrain.evaluate.kl import response_kl
    from posttrain.evaluate.suite import read_rows
    from posttrain.modeling.inference import load_for_inference
    from posttrain.world import rlhf

    before, replies_before = evaluate_stage(ctx, ctx.models["sft_flawed"])
    after, replies_after = evaluate_stage(ctx, run)
    metrics = {f"{key}_{when}": numbers[key] for key in ("gold_reward", "gold_reward_by_task",
               "accuracy") for when, numbers in (("before", before), ("after", after))}  # fmt: skip
    model, tok = load_for_inference(run)
    reference, _ = load_for_inference(ctx.models["sft_flawed"])
    limit = 60 if ctx.quick else None
    prompts = [r["prompt"] for name in GOLD_SETS for r in read_rows(ctx.data, name, limit)]
    metrics["kl_to_sft"] = response_kl(model, reference, tok, prompts)["kl_per_token"]
    logged = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    kls = [row["kl"] for row in logged if "kl" in row][-10:]
    metrics["kl_per_reply_training"] = sum(kls) / len(kls)
    metrics["target_kl"], metrics["flawed"] = rlhf.FLAWED_PPO["target_kl"], rlhf.FLAWED
    return metrics, {"before": replies_before["chat"], "after": replies_after["chat"]}


def evaluate_with_kl(ctx: Context, model_path: str) -> tuple[dict, dict]:
    """The policy metrics plus the KL to the SFT model on its own greedy replies."""
    from posttrain.evaluate.kl import response_kl
    from posttrain.evaluate.suite import read_rows
    from posttrain.modeling.inference import load_for_inference

    metrics, completions = evaluate_stage(ctx, model_path)
    model, tok = load_for_inference(model_path)
    reference, _ = load_for_inference(ctx.models["sft"])
    limit = 60 if ctx.quick else None
    prompts = [r["prompt"] for name in GOLD_SETS for r in read_rows(ctx.data, name, limit)]
    metrics["kl_to_sft"] = response_kl(model, reference, tok, prompts)["kl_per_token"]
    return metrics, completions


def train_abliterate(ctx: Context) -> str:
    """The DPO model (it refuses harmful requests) with its refusal direction erased."""
    from posttrain.steer.cli import abliterate

    run = ctx.out / "runs" / "abliterate"
    abliterate({"model": ctx.models["dpo"], "projected": True, "force": True,
                "output_dir": str(run), "world_limit": 60 if ctx.quick else 0,
                "max_prompts": 48 if ctx.quick else 256})  # fmt: skip
    return str(run)


def evaluate_abliterate(ctx: Context, run: str) -> tuple[dict, dict]:
    """Held-out numbers before and after the edit, from the run's report."""
    report = json.loads((Path(run) / "report.json").read_text())
    before, after = report["before"], report["after"]
    metrics = {f"{key}_{when}": numbers[key] for key in ABLITERATION_METRICS
               for when, numbers in (("before", before), ("after", after))}  # fmt: skip
    metrics |= {"kl_harmless": after["kl_harmless"], "layer": report["chosen"]["layer"],
                "induced_refusal_harmless": before["induced_refusal_harmless"],
                "induced_refusal_harmless_2x": before["induced_refusal_harmless_2x"]}  # fmt: skip
    return metrics, {}


STAGES = (
    Stage("base", "Base model (pretrained only)", train_base),
    Stage("sft", "SFT with LoRA", train_sft),
    Stage(
        "reward",
        "Reward model (Bradley-Terry; head + SFT log-likelihood)",
        train_reward,
        evaluate_reward,
        "pairwise_accuracy",
    ),  # fmt: skip
    Stage(
        "dpo", "DPO from SFT (LoRA, + NLL of chosen)", train_dpo, evaluate_with_kl, "gold_reward"
    ),
    Stage("grpo", "GRPO from SFT (exact-answer reward)", train_grpo, evaluate_with_kl),
    Stage(
        "ppo",
        "PPO from flawed demonstrations against a reward model of its own samples",
        train_ppo,
        evaluate_ppo,
        "gold_reward_after",
    ),  # fmt: skip
    Stage(
        "abliterate",
        "Abliteration of the DPO model (refusal direction erased)",
        train_abliterate,
        evaluate_abliterate,
        "refusal_rate_harmful_after",
    ),  # fmt: skip
)


def evaluate_stage(ctx: Context, model_path: str) -> tuple[dict, dict]:
    """(metrics, completions) of one model on the test split and the demo prompts."""
    from posttrain.evaluate.generate import generate
    from posttrain.evaluate.suite import evaluate_world
    from posttrain.modeling.inference import load_for_inference

    model, tok = load_for_inference(model_path)
    limit = 60 if ctx.quick else None
    metrics = evaluate_world(model, tok, ctx.data, POLICY_METRICS, limit=limit)
    completions = {
        "chat": dict(zip(PROMPTS, generate(model, tok, list(PROMPTS), max_new_tokens=24))),
        "raw": dict(zip(PROMPTS, generate(model, tok, list(PROMPTS), 40, chat=False))),
    }
    return metrics, completions


def base_model(cfg: DemoConfig) -> str:
    from posttrain.world.pretrain import BASE_DIR

    base = Path(cfg.base) if cfg.base else BASE_DIR
    if not (base / "config.json").is_file():
        raise UserError(
            f"{base}: no base model; build it with `posttrain world pretrain output_dir={base}`"
        )
    return str(base)


def run_demo(cfg: DemoConfig | dict) -> dict:
    """Run every stage, evaluate it, and write the report folder; returns results.json's dict."""
    from posttrain.config import build_config
    from posttrain.world.datasets import write_world_data

    cfg = build_config(DemoConfig, cfg)
    out = Path(cfg.output_dir)
    ctx = Context(cfg, out, out / "data", base_model(cfg))
    write_world_data(ctx.data, seed=cfg.seed, overwrite=True)
    clear_runs(out)
    results, completions, seconds = {}, {}, {}
    for stage in STAGES:
        say(f"== {stage.title}")
        start = time.time()
        ctx.models[stage.name] = stage.train(ctx)
        evaluate = stage.evaluate or evaluate_stage
        results[stage.name], completions[stage.name] = evaluate(ctx, ctx.models[stage.name])
        seconds[stage.name] = round(time.time() - start, 1)
        value = results[stage.name][stage.headline]
        say(f"   {stage.headline} {value:.3f} ({seconds[stage.name]} s)")
    plots = write_plots(ctx)
    write_json(out / "results.json", results)
    write_text_atomic(out / "report.md", report(ctx, results, completions, seconds, plots))
    say(f"report: {out / 'report.md'}")
    return results


def clear_runs(out: Path) -> None:
    """Stage runs start fresh on every demo run (a run directory would otherwise resume)."""
    import shutil

    shutil.rmtree(out / "runs", ignore_errors=True)


def write_plots(ctx: Context) -> dict[str, Path]:
    from posttrain.plot import plot_run

    plots = {}
    for name, path in ctx.models.items():
        if (Path(path) / "metrics.jsonl").is_file():
            plots[name] = plot_run(path, ctx.out / "plots" / f"{name}.png")
    return plots


def report(ctx, results: dict, completions: dict, seconds: dict, plots: dict) -> str:
    """The Markdown report: results table, per-task accuracy, completions, plots."""
    from posttrain.world.tasks import KINDS

    stages = [s for s in STAGES if s.name in results and "accuracy" in results[s.name]]
    lines = ["# posttrain demo: the tiny world", ""]
    lines += [f"Base model: `{ctx.base}`. Quick mode: {ctx.quick}.", "", "## Results", ""]
    header = ["stage", "accuracy", *KINDS, "gold reward", "KL to SFT", "perplexity", "seconds"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in stages:
        r = results[s.name]
        by_task = [f"{r['accuracy_by_task'].get(k, 0.0):.2f}" for k in KINDS]
        row = [
            s.name,
            f"{r['accuracy']:.3f}",
            *by_task,
            f"{r['gold_reward']:.3f}",
            f"{r['kl_to_sft']:.3f}" if "kl_to_sft" in r else "",
            f"{r['perplexity']:.2f}",
            str(seconds[s.name]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Accuracy: exact match on the held-out task split. Gold reward: the hidden gold reward "
        "(-2.2 to 1; correct, concise, polite, refuses only forbidden topics) of greedy replies "
        "to held-out task, harmful and harmless prompts. KL to SFT: mean per-token KL(model || "
        "SFT) on the model's own greedy replies to those prompts.",
    ]
    lines += reward_section(results, seconds)
    lines += ppo_section(results, seconds, completions.get("ppo", {}))
    lines += abliteration_section(results, seconds)
    lines += ["", "## Completions (greedy, through the chat template)", ""]
    for prompt in PROMPTS:
        lines.append(f"**{prompt}**")
        lines += [f"- {s.name}: `{one_line(completions[s.name]['chat'][prompt])}`" for s in stages]
        lines.append("")
    lines += ["## Base model continuing the raw text (no chat template)", ""]
    for prompt in PROMPTS[:2]:
        lines += [f"**{prompt}** -> `{one_line(completions['base']['raw'][prompt])}`", ""]
    lines += ["## Training curves", ""]
    lines += [f"![{name}](plots/{path.name})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


def reward_section(results: dict, seconds: dict) -> list[str]:
    """Pairwise accuracy of the reward model on held-out pairs, by kind of pair."""
    if "reward" not in results:
        return []
    r = results["reward"]
    kinds = list(r["pairwise_accuracy_by_pair"])
    lines = ["", "## Reward model: held-out preference pairs", ""]
    lines += ["| pairwise accuracy | " + " | ".join(kinds) + " | seconds |"]
    lines += ["|" + "---|" * (len(kinds) + 2)]
    by_pair = [f"{r['pairwise_accuracy_by_pair'][k]:.2f}" for k in kinds]
    lines.append(
        f"| {r['pairwise_accuracy']:.3f} | " + " | ".join(by_pair) + f" | {seconds['reward']} |"
    )
    return lines


def ppo_section(results: dict, seconds: dict, replies: dict) -> list[str]:
    """The SFT model of flawed demonstrations before and after PPO against its reward model,
    with their greedy replies to the demo's first three prompts."""
    if "ppo" not in results:
        return []
    r = results["ppo"]
    kinds = list(r["gold_reward_by_task_before"])
    lines = ["", "## PPO: flawed demonstrations -> reward model of its own samples -> PPO", ""]
    lines += ["| | gold reward | " + " | ".join(kinds) + " | accuracy |"]
    lines += ["|" + "---|" * (len(kinds) + 3)]
    for when, name in (("before", "SFT on flawed demonstrations"), ("after", "PPO")):
        by_kind = [f"{r[f'gold_reward_by_task_{when}'][k]:+.2f}" for k in kinds]
        lines.append(f"| {name} | {r[f'gold_reward_{when}']:+.3f} | " + " | ".join(by_kind)
                     + f" | {r[f'accuracy_{when}']:.3f} |")  # fmt: skip
    lines += ["", f"{r['flawed']:.0%} of the SFT answers were rude or rambling; the reward model "
              f"learned from the world's pairs plus gold-labelled pairs of the SFT model's own "
              f"samples. PPO's KL per reply in training {r['kl_per_reply_training']:.2f} (target "
              f"{r['target_kl']:g}), KL per "
              f"token to the SFT model on greedy replies {r['kl_to_sft']:.3f}; "
              f"{seconds['ppo']} s (`posttrain/world/rlhf.py`)."]  # fmt: skip
    for prompt in PROMPTS[:3] if replies else ():
        lines += ["", f"**{prompt}**"]
        lines += [f"- {name}: `{one_line(replies[when][prompt])}`"
                  for when, name in (("before", "SFT"), ("after", "PPO"))]  # fmt: skip
    return lines


def abliteration_section(results: dict, seconds: dict) -> list[str]:
    """The DPO model before and after its refusal direction is erased."""
    if "abliterate" not in results:
        return []
    r = results["abliterate"]
    lines = ["", "## Abliteration of the DPO model: held-out prompts", ""]
    lines += ["| | " + " | ".join(ABLITERATION_METRICS) + " |", "|---" * 5 + "|"]
    for when in ("before", "after"):
        cells = [f"{r[f'{key}_{when}']:.3f}" for key in ABLITERATION_METRICS]
        lines.append(f"| {when} | " + " | ".join(cells) + " |")
    lines += ["", f"Stream point {r['layer']}; first-token KL on harmless prompts "
              f"{r['kl_harmless']:.3f}; adding the direction makes "
              f"{r['induced_refusal_harmless']:.0%} of harmless prompts refuse "
              f"({r['induced_refusal_harmless_2x']:.0%} at twice its strength); "
              f"{seconds['abliterate']} s.", "",
              "![per-layer candidate scores](runs/abliterate/scores.png)"]  # fmt: skip
    return lines


def one_line(text: str) -> str:
    return text.replace("\n", " \\n ").replace("`", "'")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(help_text(DemoConfig, "demo [--quick]"))
        return
    args = ["quick=true" if a == "--quick" else a for a in argv]
    bad = [a for a in args if "=" not in a]
    if bad:
        raise UserError(
            f"unexpected argument {bad[0]!r}; usage: posttrain demo [--quick] [key=value]"
        )
    run_demo(load_config(DemoConfig, None, args))
