"""`posttrain demo [--quick] [output_dir=DIR]`: the whole story on the tiny world.

Loads the shipped base model, writes the world's datasets, then runs each stage in
`STAGES` in order: a stage trains (or not) and names the model it produced; the demo
evaluates every policy model on the same test split and shows its completions of the same
prompts (a stage with its own `evaluate`, like the reward model, reports its own numbers;
GRPO and PPO report before and after from where their method has something to fix), and writes
the report folder (`demo_report.py`):

    DIR/report.md       results table, sections and example completions, stage by stage
    DIR/results.json    every number of the report: {stage: {metric: value}}
    DIR/plots/*.png     training curves of each trained stage
    DIR/runs/<stage>/   the run directories (adapters, metrics.jsonl, config.yaml)
    DIR/data/           the world's datasets

A new stage is one `Stage(name, title, train)` line plus its `train` function, which
takes the demo context and returns the model folder or run directory it produced (and an
`evaluate` function when the model is not a chat policy).
`--quick` trains and evaluates less (1-4 minutes; DPO runs 30 steps, GRPO and PPO 20); the
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
from posttrain.demo_report import ABLITERATION_METRICS, PROMPTS, report
from posttrain.errors import UserError
from posttrain.io import write_json, write_text_atomic

POLICY_METRICS = ("accuracy", "gold_reward", "perplexity")
GOLD_SETS = ("prompts_test", "harmful_test", "harmless_test")  # what gold_reward generates on
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


def sft_settings(quick: bool) -> dict:
    """The SFT stage's settings; `quick` is also the short SFT the GRPO stage starts from."""
    return {"adapter": "lora", "lora": {"r": 16, "alpha": 32}, "packing": False,
            "max_length": 512, "batch_size": 16, "epochs": 3 if quick else 10,
            "lr": 2e-3 if quick else 1e-3, "warmup": 0.05, "log_every": 10, "offline": True}  # fmt: skip


def train_sft(ctx: Context) -> str:
    from posttrain.train.sft import sft

    run = ctx.out / "runs" / "sft"
    sft({**sft_settings(ctx.quick), "model": ctx.base, "output_dir": str(run),
         "data": {"train": str(ctx.data / "sft_train.jsonl")}})  # fmt: skip
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
    """GRPO with the exact-answer reward on the arithmetic prompts, from a short SFT run (the
    `--quick` SFT settings, as `evidence/grpo.py`): the full SFT run's arithmetic is already
    0.94, which leaves GRPO no room (README, "The tiny world")."""
    from posttrain.train.grpo import grpo
    from posttrain.train.sft import sft

    runs = ctx.out / "runs"
    start = ctx.models["sft"]
    if not ctx.quick:
        start = str(runs / "sft_short")
        sft({**sft_settings(quick=True), "model": ctx.base, "output_dir": start,
             "data": {"train": str(ctx.data / "sft_train.jsonl")}})  # fmt: skip
    ctx.models["sft_short"] = start
    rows = (ctx.data / "prompts_train.jsonl").read_text().splitlines()
    prompts = runs / "grpo_prompts.jsonl"
    prompts.write_text("".join(r + "\n" for r in rows if json.loads(r)["task"] == "arithmetic"))
    run = runs / "grpo"
    grpo({**GRPO_SETTINGS, "model": start, "output_dir": str(run),
          "data": {"train": str(prompts)}, **({"max_steps": 20} if ctx.quick else {})})  # fmt: skip
    return str(run)


def evaluate_grpo(ctx: Context, run: str) -> tuple[dict, dict]:
    """Task accuracy (by kind) and gold reward of the short SFT model and of GRPO from it."""
    keys = ("accuracy", "accuracy_by_task", "gold_reward")
    return before_after(ctx, ctx.models["sft_short"], run, keys)


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
    from posttrain.world import rlhf

    keys = ("gold_reward", "gold_reward_by_task", "accuracy")
    metrics, replies = before_after(ctx, ctx.models["sft_flawed"], run, keys)
    logged = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    kls = [row["kl"] for row in logged if "kl" in row][-10:]
    metrics["kl_per_reply_training"] = sum(kls) / len(kls)
    metrics["target_kl"], metrics["flawed"] = rlhf.FLAWED_PPO["target_kl"], rlhf.FLAWED
    return metrics, replies


def before_after(ctx: Context, start: str, run: str, keys: tuple) -> tuple[dict, dict]:
    """`keys` of the starting model and of the trained one (as KEY_before, KEY_after), the
    trained one's KL per token to the start, and both models' greedy chat replies."""
    before, replies_before = evaluate_stage(ctx, start)
    after, replies_after = evaluate_stage(ctx, run)
    metrics = {f"{key}_{when}": numbers[key] for key in keys
               for when, numbers in (("before", before), ("after", after))}  # fmt: skip
    metrics["kl_to_sft"] = kl_to(ctx, run, start)
    return metrics, {"before": replies_before["chat"], "after": replies_after["chat"]}


def evaluate_with_kl(ctx: Context, model_path: str) -> tuple[dict, dict]:
    """The policy metrics plus the KL to the SFT model on its own greedy replies."""
    metrics, completions = evaluate_stage(ctx, model_path)
    metrics["kl_to_sft"] = kl_to(ctx, model_path, ctx.models["sft"])
    return metrics, completions


def kl_to(ctx: Context, path: str, reference_path: str) -> float:
    """Per-token KL(model || reference) on the model's greedy replies to the gold prompts."""
    from posttrain.evaluate.kl import response_kl
    from posttrain.evaluate.suite import read_rows
    from posttrain.modeling.inference import load_for_inference

    model, tok = load_for_inference(path)
    reference, _ = load_for_inference(reference_path)
    limit = 60 if ctx.quick else None
    prompts = [r["prompt"] for name in GOLD_SETS for r in read_rows(ctx.data, name, limit)]
    return response_kl(model, reference, tok, prompts)["kl_per_token"]


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
    Stage(
        "grpo",
        "GRPO from a short SFT run (exact-answer reward on arithmetic)",
        train_grpo,
        evaluate_grpo,
        "accuracy_after",
    ),  # fmt: skip
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
    write_text_atomic(
        out / "report.md",
        report(ctx, [s.name for s in STAGES], results, completions, seconds, plots),
    )
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
