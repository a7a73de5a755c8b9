"""The harness the posttrain-vs-TRL benchmarks (sft, dpo, grpo, ppo) have in common.

- settings: the setup fields the LoRA benchmarks share (`SharedSetup`, `LlamaSetup`), the
  random-weight Llama both sides load (`llama_spec`), and what every run fixes on either side:
  `posttrain_config` (no weight decay, clipping at 1.0, a log line every step, fp32, sdpa) and
  `trl_args` (the same for TRL's TrainingArguments, plus no gradient checkpointing, no eval,
  no save); for the methods that train on a fixed dataset (SFT, DPO) also the step settings
  both sides name differently (`offline_settings`, `offline_trl_args`);
- the workers' pieces: TRL's model and tokenizer (`trl_inputs`), its trainer (`trl_trainer`,
  `train_trl`), the callback that drives a `common.StepClock` (`trl_clock`), the rows in
  posttrain's batch order (`batch_order`, `ordered_rows`) and the result a worker writes
  (`worker_result`);
- the command line: the options every script shares, the hidden `--worker/--spec/--result`
  dispatch (`parse_args`, `run_as_worker`) and the command a report quotes (`command_line`);
- running: the two sides in turn, each in a fresh process, TRL first on even repeats
  (`run_sides`, `run_repeats`), after the parity checks (`parity_holds`);
- the report's pieces: `versus_report.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import common
import fixtures

SIDES = (("ours", "posttrain"), ("trl", "TRL"))  # (side, its name in the tables)


# ----------------------------------------------------------------------------- settings


@dataclass
class SharedSetup:
    """What the LoRA benchmarks against TRL share: the LoRA shape and the workers' threads."""

    lora_r: int = 16
    lora_alpha: float = 32.0
    threads: int = 0  # torch threads in the workers; 0 = torch's default (one per core)
    omp_passive: bool = True  # OMP_WAIT_POLICY=PASSIVE in the workers (see common.omp_env)


@dataclass
class LlamaSetup(SharedSetup):
    """SharedSetup plus the shape of the random-weight Llama that `llama_spec` saves."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 704
    vocab: int = 4096
    max_length: int = 512


def llama_spec(work: Path, setup: LlamaSetup, tokenizer) -> dict[str, Any]:
    """Save a Llama of `setup`'s shape with `tokenizer` to work/model; returns the shared part
    of a worker spec: the setup's fields, the model, work/train.jsonl, work/holdout.json, the
    pad id, the vocabulary size and the parameter count."""
    model_dir = work / "model"
    params = fixtures.save_llama(
        model_dir,
        tokenizer,
        setup.hidden,
        setup.layers,
        setup.heads,
        setup.intermediate,
        max_positions=setup.max_length,
    )
    return {
        **asdict(setup),
        "model": str(model_dir),
        "train": str(work / "train.jsonl"),
        "holdout": str(work / "holdout.json"),
        "pad_id": tokenizer.pad_token_id,
        "vocab": len(tokenizer),  # what the BPE reached, at most setup.vocab
        "params": params,
    }


def llama_text(s: dict) -> str:
    """The report's sentence on the model `llama_spec` saved (`s`: its spec)."""
    return f"""Model: Llama-shaped, random weights, hidden {s["hidden"]}, {s["layers"]} layers,
{s["heads"]} heads, MLP {s["intermediate"]}, vocab {s["vocab"]} (BPE trained here), untied
head, {s["params"] / 1e6:.1f}M parameters."""


def posttrain_config(spec: dict, **settings) -> dict[str, Any]:
    """A posttrain method config with what every benchmark fixes (the spec's model, training
    file, output dir and seed; no weight decay, clipping at 1.0, a log line every step, fp32,
    sdpa) plus the method's own `settings`."""
    return {
        "model": spec["model"],
        "data": {"train": spec["train"]},
        "output_dir": str(spec["out"]),
        **settings,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "seed": spec["seed"],
        "log_every": 1,
        "dtype": "float32",
        "attn_implementation": "sdpa",
    }


def posttrain_lora(spec: dict) -> dict[str, float]:
    """posttrain's `lora` block matching `common.lora_config(spec)`."""
    return {"r": spec["lora_r"], "alpha": spec["lora_alpha"], "dropout": 0.0}


def offline_settings(spec: dict) -> dict[str, Any]:
    """posttrain's step settings for a fixed dataset (SFT, DPO): the spec's steps, micro-batch
    size, grad_accum and max_length, a cosine schedule after the spec's warm-up steps."""
    return {
        "max_steps": spec["steps"],
        "batch_size": spec["batch_size"],
        "grad_accum": spec["grad_accum"],
        "max_length": spec["max_length"],
        "schedule": "cosine",
        "warmup": float(spec["warmup"]),
    }


def offline_trl_args(spec: dict) -> dict[str, Any]:
    """`trl_args` plus TRL's names for `offline_settings`, reading the dataset in sequence
    when the spec has an `order` (posttrain's batches) and shuffled otherwise."""
    return dict(
        trl_args(spec),
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["grad_accum"],
        max_length=spec["max_length"],
        lr_scheduler_type="cosine",
        warmup_steps=spec["warmup"],
        train_sampling_strategy="sequential" if spec.get("order") else "random",
    )


def trl_args(spec: dict) -> dict[str, Any]:
    """The TrainingArguments every TRL side shares: the spec's output dir and seed, no weight
    decay, clipping at 1.0, fp32, no gradient checkpointing (TRL's default is on), a log line
    every step, no eval, no save, no reporting, progress bars or pinned memory."""
    return dict(
        output_dir=str(spec["out"]),
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=spec["seed"],
    )


# ----------------------------------------------------------------------------- workers


def batch_order(lengths: list[int], spec: dict) -> list[int]:
    """Example indices in the order posttrain's unpacked length-grouped batches take them
    (epochs 0, 1, ... until the spec's steps are covered), for TRL to read in sequence."""
    from posttrain.data.batching import plan_batches

    need = spec["steps"] * spec["grad_accum"] * spec["batch_size"]
    order: list[int] = []
    epoch = 0
    while len(order) < max(need, len(lengths)):
        plan = plan_batches(
            lengths, spec["batch_size"], spec["max_length"], False, spec["seed"], epoch
        )
        order += [row[0] for batch in plan for row in batch]
        epoch += 1
    return order


def trl_reads_in_order(lengths: list[int]) -> Callable[[str, dict], dict]:
    """A `run_sides` extension giving the TRL side's spec the `batch_order` of `lengths`."""

    def extend(side: str, spec: dict) -> dict:
        return {"order": batch_order(lengths, spec)} if side == "trl" else {}

    return extend


def ordered_rows(spec: dict) -> list[dict]:
    """The spec's training rows, in the spec's `order` when it has one (posttrain's batches)."""
    rows = common.read_jsonl(spec["train"])
    if spec.get("order"):
        rows = [rows[i] for i in spec["order"]]
    return rows


def load_causal_lm(path: str):
    """A causal LM as both sides load it: fp32, sdpa attention."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="float32", attn_implementation="sdpa")


def trl_inputs(spec: dict):
    """(tokenizer, model) of the spec's model for a TRL worker, with datasets' bars off."""
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    return tokenizer, load_causal_lm(spec["model"])


def trl_trainer(trainer_cls, model, args, rows: list[dict], tokenizer, peft_config, **extra):
    """`trainer_cls` (a TRL trainer) on `rows` as a dataset; `extra`: its other arguments."""
    import datasets

    return trainer_cls(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
        **extra,
    )


def train_trl(trainer_cls, spec: dict, clock: common.StepClock, args, tokenizer, model, peft):
    """Train `trainer_cls` (with `args`, the `peft` config or None) on the spec's rows, in
    posttrain's batch order when the spec has one; `clock` counts the model's tokens and times
    its steps. Returns the trainer."""
    clock.attach(model)
    rows = ordered_rows(spec)
    callbacks = [trl_clock(clock)]
    trainer = trl_trainer(trainer_cls, model, args, rows, tokenizer, peft, callbacks=callbacks)
    trainer.train()
    clock.stop()
    return trainer


def trl_prepared(trainer_cls, args, shared: dict, tokenizer):
    """The training set as a TRL trainer (`trainer_cls` with `args`, LoRA) prepares it."""
    import datasets
    from transformers import AutoModelForCausalLM

    datasets.disable_progress_bars()
    model = AutoModelForCausalLM.from_pretrained(shared["model"])
    rows = common.read_jsonl(shared["train"])
    lora = common.lora_config(shared)
    return trl_trainer(trainer_cls, model, args, rows, tokenizer, lora).train_dataset


def trl_clock(clock: common.StepClock):
    """A TrainerCallback that begins `clock` with training and ends a step at `on_step_end`."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end()

    return Clock()


def logged(rows: list[dict], key: str = "loss") -> list[dict]:
    """The training log lines (those with `key`) of a run's log history or metrics."""
    return [r for r in rows if key in r]


def posttrain_logs(out: str | Path) -> list[dict]:
    """The training log lines (those with a loss) of a posttrain run's metrics.jsonl."""
    return logged(common.read_jsonl(Path(out) / "metrics.jsonl"))


def worker_result(
    clock: common.StepClock, logs: list[dict] = (), keys: dict[str, str] | None = None, **extra
) -> dict[str, Any]:
    """A worker's result: `clock`'s summary (step 1 is warm-up), a list per `keys` entry
    (result name -> log key) taken from `logs`, `extra`, and torch's thread count."""
    import torch

    series = {name: [r[key] for r in logs] for name, key in (keys or {}).items()}
    return {**clock.summary(skip=1), **series, **extra, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- command line


def benchmark_parser(doc: str, quick_help: str = "a fast smoke run") -> argparse.ArgumentParser:
    """An argument parser described by the first line of `doc`, with `--quick`."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    return parser


def add_run_options(
    parser: argparse.ArgumentParser, no_readme_help: str = "", steps: bool = False
) -> None:
    """--repeats, (with `steps`) --steps, --threads, --omp-spin and --no-readme."""
    parser.add_argument("--repeats", type=int, default=0, help="override the repeats")
    if steps:
        parser.add_argument("--steps", type=int, default=0, help="override the steps")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument(
        "--omp-spin", action="store_true", help="keep OpenMP's default spin-waiting"
    )
    parser.add_argument(
        "--no-readme", action="store_true", help=no_readme_help or "do not write README.md"
    )


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Add the hidden worker options (--worker, --spec, --result) and parse `argv`."""
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_as_worker(args: argparse.Namespace, workers: dict[str, Callable[[dict], dict]]) -> bool:
    """In a worker process (`--worker SIDE`), run `workers[SIDE]` on the spec and write its
    result; returns whether this was a worker."""
    if not args.worker:
        return False
    spec = json.loads(Path(args.spec).read_text())
    Path(args.result).write_text(json.dumps(workers[args.worker](spec)))
    return True


def apply_run_options(setup, args: argparse.Namespace):
    """`setup` with --repeats (when given), --threads and --omp-spin applied."""
    setup.repeats = args.repeats or setup.repeats
    setup.threads = args.threads
    setup.omp_passive = not args.omp_spin
    return setup


def command_line(script: str, args: argparse.Namespace, *flags: tuple[str, Any]) -> str:
    """`python benchmarks/SCRIPT` with the options given: --quick, `flags` ((text, given)
    pairs), --threads, --omp-spin."""
    given = [
        ("--quick", args.quick),
        *flags,
        (f"--threads {args.threads}", args.threads),
        ("--omp-spin", args.omp_spin),
    ]
    return " ".join([f"python benchmarks/{script}", *(text for text, on in given if on)])


# ----------------------------------------------------------------------------- running


def parity_holds(parity: dict, checks: list[bool], what: str) -> bool:
    """Print the parity counts to stderr; unless every check holds, print `error: the two
    sides do not WHAT` and return False."""
    print(json.dumps(parity), file=sys.stderr)
    if all(checks):
        return True
    print(f"error: the two sides do not {what}", file=sys.stderr)
    return False


def side_order(repeat: int) -> tuple[str, str]:
    """Which side runs first in a repeat: TRL on even repeats, posttrain on odd ones."""
    return ("ours", "trl") if repeat % 2 else ("trl", "ours")


def worker_env(shared: dict, **extra: str) -> dict[str, str]:
    """The OpenMP settings of the shared setup (common.omp_env) plus `extra` variables."""
    return dict(common.omp_env(shared["threads"], shared["omp_passive"]), **extra)


def run_sides(
    script: Path,
    work: Path,
    name: str,
    sides: Iterable[str],
    spec: dict,
    env: dict[str, str],
    describe: Callable[[dict], str],
    extend: Callable[[str, dict], dict] | None = None,
    python: dict[str, str] | None = None,
) -> dict[str, dict]:
    """Run `script`'s worker for each side in `sides`, in that order, each in a fresh process,
    on `spec` plus `out` (work/SIDE-NAME) and `extend(side, spec)`'s keys (`python`: a side's
    interpreter); print `SIDE-NAME: describe(result)` to stderr; returns {side: result}."""
    out = {}
    for side in sides:
        side_spec = dict(spec, out=str(work / f"{side}-{name}"))
        side_spec.update(extend(side, side_spec) if extend else {})
        path = work / f"{side}-{name}.spec.json"
        path.write_text(json.dumps(side_spec))
        interpreter = (python or {}).get(side, sys.executable)
        args = ["--worker", side, "--spec", str(path)]
        result = common.run_worker(script, args, env, python=interpreter)
        print(f"{side}-{name}: {describe(result)}", file=sys.stderr, flush=True)
        out[side] = result
    return out


def run_repeats(
    repeats: int, settings: Iterable, run: Callable[[int, Any, tuple[str, str]], dict]
) -> dict[tuple[str, Any], list[dict]]:
    """`run(repeat, setting, sides)` -> {side: result} for each repeat and setting in turn, the
    sides in `side_order(repeat)`; returns the results as {(side, setting): [per repeat]}."""
    results: dict[tuple[str, Any], list[dict]] = {}
    for repeat in range(repeats):
        for setting in settings:
            for side, result in run(repeat, setting, side_order(repeat)).items():
                results.setdefault((side, setting), []).append(result)
    return results
