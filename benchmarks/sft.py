"""SFT throughput, peak memory and loss: posttrain vs TRL's `SFTTrainer` + peft LoRA.

    python benchmarks/sft.py              # the full run (~20 min); rewrites its README section
    python benchmarks/sft.py --threads 1  # the same with one torch thread per process
    python benchmarks/sft.py --quick      # a smoke run (~1-2 min), writes nothing

What is the same on both sides:
- the model: a Llama-shaped model built from a config with random weights (fp32, sdpa
  attention, untied head), saved once and loaded by each side with `from_pretrained`; the
  tokenizer is a byte-level BPE trained here on the synthetic text;
- the data: synthetic multi-turn chats in `messages` format (1-3 turns, a system prompt on a
  third, ~20 to ~500 tokens), loss on the assistant turns only: each turn's content plus its
  `<|im_end|>`. posttrain derives the mask from the plain ChatML template; TRL
  (`assistant_only_loss=True`) needs `{% generation %}` markers, so its copy of the tokenizer
  gets the same ChatML rendering with markers. Before anything is timed the script checks
  that both sides produce identical token ids and identical trained positions;
- LoRA r, alpha, dropout 0, every linear layer but the head (`all-linear`); AdamW, peak lr,
  cosine schedule with the same number of warm-up steps, clipping at 1.0, no weight decay,
  micro-batch size, gradient accumulation (the loss normalised by the trained tokens of the
  whole step on both sides), max_length, max_steps; a log line every step; no eval and no
  checkpoint during training; fp32 (`bf16=False` for TRL), gradient checkpointing off
  (`gradient_checkpointing=False` for TRL, whose default is on);
- batches: without packing TRL reads the examples in posttrain's length-grouped batch order
  (`train_sampling_strategy="sequential"` over the reordered dataset), so both sides run the
  very same padded tensors; with packing each side packs with its own best-fit decreasing
  into rows of max_length (the same number of rows here) and shuffles them.
- seeds: repeat i uses seed i on both sides; with the same seed peft draws the same LoRA
  initialisation on both sides. One extra pair without warm-up (identical schedules) checks
  that the two loss curves coincide step by step.

What is timed: each run is a fresh process. A forward pre-hook on the input embedding counts
the non-padding tokens (`input_ids != pad_id`) every forward sees, and a hook at the end of
every optimizer step (posttrain: around `Loop.train_step`; TRL: `on_step_end`) takes the
time. tokens/s = non-padding tokens fed to the model in steps 2..N / wall time from the end
of step 1 to the end of step N; step 1 is the warm-up. The span holds everything a training
step does (collation, forward, backward, clipping, optimizer, schedule, logging); it leaves
out imports, tokenisation, model loading and saving. The same tokens over the process's CPU
time are also reported: on a shared machine they move less than wall time.

Peak memory: the process's VmHWM (peak resident set, /proc/self/status) read inside the
worker at the end of the last step, so it covers imports, data, model and training but not
the final save or the held-out evaluation. Also reported: RSS when the first step starts.

Loss: the loss logged at every step (both sides: summed cross-entropy over the step's trained
tokens / their count), the mean of the last 5 steps, and a held-out loss after training on
fixed chats, computed by the same function on both sides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import common

HERE = Path(__file__).resolve()


@dataclass
class Setup:
    """Everything both trainers share."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 704
    vocab: int = 4096
    max_length: int = 512
    max_words: int = 32  # words per question: sets the length spread of the chats
    train_rows: int = 2000
    holdout_rows: int = 64
    steps: int = 40
    batch_size: int = 8  # examples per micro-batch without packing
    packed_batch_size: int = 2  # rows of max_length per micro-batch with packing (~ as many tokens)
    grad_accum: int = 2
    lr: float = 1e-3
    warmup: int = 4
    lora_r: int = 16
    lora_alpha: float = 32.0
    repeats: int = 5
    threads: int = 0  # torch threads in the workers; 0 = torch's default (one per core)
    omp_passive: bool = True  # OMP_WAIT_POLICY=PASSIVE in the workers (see common.omp_env)


QUICK = Setup(
    train_rows=400, holdout_rows=16, steps=6, batch_size=4, packed_batch_size=1, repeats=1, warmup=2
)


# ----------------------------------------------------------------------------- preparation


def prepare(work: Path, setup: Setup) -> dict:
    """Data files, tokenizer and model under `work`; returns the shared part of a worker spec."""
    from posttrain.data.load import load_rows
    from posttrain.data.tokenize import tokenize_sft

    words = common.make_words(1500)
    train = common.make_chats(setup.train_rows, 1, words, setup.max_words)
    holdout = common.make_chats(setup.holdout_rows, 2, words, setup.max_words)
    texts = [m["content"] for row in train for m in row["messages"]]
    tokenizer = common.train_tokenizer(texts, setup.vocab)
    model_dir = work / "model"
    params = common.save_llama(
        model_dir,
        tokenizer,
        setup.hidden,
        setup.layers,
        setup.heads,
        setup.intermediate,
        max_positions=setup.max_length,
    )
    common.write_jsonl(work / "train.jsonl", train)
    held, _ = tokenize_sft(load_rows(_write(work / "holdout.jsonl", holdout)), tokenizer, 10**6)
    (work / "holdout.json").write_text(json.dumps(held))
    return {
        "model": str(model_dir),
        "train": str(work / "train.jsonl"),
        "holdout": str(work / "holdout.json"),
        "pad_id": tokenizer.pad_token_id,
        "vocab": len(tokenizer),
        "params": params,
        **asdict(setup),
    }


def _write(path: Path, rows: list[dict]) -> str:
    common.write_jsonl(path, rows)
    return str(path)


def check_parity(shared: dict, work: Path) -> tuple[dict, list[int]]:
    """Tokenise the training set both ways; token ids and trained positions must be identical.

    posttrain's targets are pre-shifted (targets[t] = the token trained at t+1), TRL's labels
    are not, so TRL's labels shifted left by one are compared with posttrain's targets.
    Returns the counts and the example lengths.
    """
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from posttrain.data.batching import pack_rows
    from posttrain.data.load import load_rows
    from posttrain.data.tokenize import tokenize_sft

    tokenizer = AutoTokenizer.from_pretrained(shared["model"])
    ours, stats = tokenize_sft(load_rows(shared["train"]), tokenizer, shared["max_length"])
    tokenizer.chat_template = common.CHATML_GENERATION
    datasets.disable_progress_bars()
    prepared = {}
    for packing in (False, True):
        trainer = SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(shared["model"]),
            args=trl_config(dict(shared, packing=packing, seed=0), work / "parity"),
            train_dataset=datasets.Dataset.from_list(common.read_jsonl(shared["train"])),
            processing_class=tokenizer,
            peft_config=common.lora_config(shared),
        )
        prepared[packing] = trainer.train_dataset
    theirs = prepared[False]
    shifted = [[*labels[1:], -100] for labels in theirs["labels"]]
    lengths = [len(e["input_ids"]) for e in ours]
    packed = pack_rows(lengths, list(range(len(lengths))), shared["max_length"])
    parity = {
        "examples": stats["examples"],
        "tokens": stats["tokens"],
        "trained_tokens": stats["target_tokens"],
        "truncated": stats["truncated"],
        "identical_ids": [e["input_ids"] for e in ours] == theirs["input_ids"],
        "identical_trained_positions": [e["targets"] for e in ours] == shifted,
        "rows_packed_ours": len(packed),
        "rows_packed_trl": len(prepared[True]),
    }
    return parity, lengths


def batch_order(lengths: list[int], spec: dict) -> list[int]:
    """Example indices in the order posttrain's unpacked batches take them (epochs 0, 1, ...)."""
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


# ----------------------------------------------------------------------------- workers


def trl_config(spec: dict, out: Path):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out),
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["grad_accum"],
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=spec["warmup"],
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_length=spec["max_length"],
        packing=spec["packing"],
        assistant_only_loss=True,
        # unpacked: the examples come in posttrain's batch order (see worker_trl)
        train_sampling_strategy="sequential" if spec.get("order") else "random",
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


def worker_ours(spec: dict) -> dict:
    from posttrain.train import sft

    clock = common.StepClock(spec["pad_id"])
    models = common.time_posttrain_steps(sft, clock)
    out = Path(spec["out"])
    sft.sft(
        {
            "model": spec["model"],
            "data": {"train": spec["train"]},
            "output_dir": str(out),
            "adapter": "lora",
            "lora": {"r": spec["lora_r"], "alpha": spec["lora_alpha"], "dropout": 0.0},
            "max_steps": spec["steps"],
            "batch_size": spec["batch_size"],
            "grad_accum": spec["grad_accum"],
            "lr": spec["lr"],
            "schedule": "cosine",
            "warmup": float(spec["warmup"]),
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "max_length": spec["max_length"],
            "packing": spec["packing"],
            "seed": spec["seed"],
            "log_every": 1,
            "dtype": "float32",
            "attn_implementation": "sdpa",
        }
    )
    clock.stop()
    logs = [r for r in common.read_jsonl(out / "metrics.jsonl") if "loss" in r]
    holdout = json.loads(Path(spec["holdout"]).read_text())
    return finish(clock, logs, "lr", common.heldout_loss(models[0], holdout, spec["pad_id"]))


def worker_trl(spec: dict) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    clock = common.StepClock(spec["pad_id"])

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end()

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    tokenizer.chat_template = common.CHATML_GENERATION
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype="float32", attn_implementation="sdpa"
    )
    clock.attach(model)
    rows = common.read_jsonl(spec["train"])
    if spec.get("order"):  # identical batches: posttrain's length-grouped order, read in sequence
        rows = [rows[i] for i in spec["order"]]
    trainer = SFTTrainer(
        model=model,
        args=trl_config(spec, Path(spec["out"])),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=common.lora_config(spec),
        callbacks=[Clock()],
    )
    trainer.train()
    clock.stop()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    holdout = json.loads(Path(spec["holdout"]).read_text())
    heldout = common.heldout_loss(trainer.model, holdout, spec["pad_id"])
    return finish(clock, logs, "learning_rate", heldout)


def finish(clock: common.StepClock, logs: list[dict], lr_key: str, heldout: float) -> dict:
    """The worker's result: timings, memory, and per-step loss, lr and gradient norm."""
    import torch

    return {
        **clock.summary(skip=1),
        "losses": [r["loss"] for r in logs],
        "lrs": [r[lr_key] for r in logs],
        "grad_norms": [r["grad_norm"] for r in logs],
        "heldout_loss": heldout,
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- report


def main_table(results: dict, steps: int) -> str:
    headers = [
        "packing",
        "trainer",
        "tokens/s",
        "vs TRL",
        "tokens/CPU-s",
        "vs TRL",
        "peak RSS MiB",
        "RSS at start MiB",
        "padding",
        f"loss, last 5 of {steps} steps",
        "held-out loss",
    ]
    rows = []
    for packing in (False, True):
        runs = {side: results.get((side, packing), []) for side in ("ours", "trl")}
        if not runs["ours"] or not runs["trl"]:
            continue
        for side, name in (("ours", "posttrain"), ("trl", "TRL")):
            r = runs[side]
            cells = []
            for key in ("tokens_per_s", "tokens_per_cpu_s"):
                mine = [x[key] for x in r]
                other = [x[key] for x in runs["trl"]]
                cells += [
                    common.median_spread(mine),
                    common.ratio_cell(mine, other) if side == "ours" else "1.00x",
                ]
            rows.append(
                [
                    "on" if packing else "off",
                    name,
                    *cells,
                    common.median_spread([x["peak_rss_mib"] for x in r]),
                    common.median_spread([x["rss_start_mib"] for x in r]),
                    f"{100 * statistics.median(x['padding_share'] for x in r):.1f}%",
                    common.mean_sd([common.tail_mean(x["losses"]) for x in r]),
                    common.mean_sd([x["heldout_loss"] for x in r]),
                ]
            )
    return common.markdown_table(headers, rows)


def curve_table(results: dict, steps: int) -> str:
    marks = sorted({1, 2, 5, *range(10, steps + 1, 10), steps})
    rows = []
    for (side, packing), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        name = "posttrain" if side == "ours" else "TRL"
        cells = [f"{statistics.median(r['losses'][m - 1] for r in runs):.3f}" for m in marks]
        rows.append([f"{name}, packing {'on' if packing else 'off'}", *cells])
    return common.markdown_table(["run", *[f"step {m}" for m in marks]], rows)


def parity_line(pair: dict) -> str:
    ours, trl = pair["ours"], pair["trl"]
    diffs = [abs(a - b) for a, b in zip(ours["losses"], trl["losses"])]
    lr_diff = max(abs(a - b) for a, b in zip(ours["lrs"], trl["lrs"]))
    return (
        f"max |loss difference| over the {len(diffs)} steps {max(diffs):.2e} (step 1: "
        f"{ours['losses'][0]:.4f} vs {trl['losses'][0]:.4f}; last: {ours['losses'][-1]:.4f} vs "
        f"{trl['losses'][-1]:.4f}); max |lr difference| {lr_diff:.1e}; held-out loss "
        f"{ours['heldout_loss']:.4f} vs {trl['heldout_loss']:.4f}"
    )


def report(results, pair, parity, shared, command, elapsed) -> str:
    s = shared
    threads = sorted({r["threads"] for runs in results.values() for r in runs})
    loads = [r["load_start"] for runs in results.values() for r in runs]
    policy = "PASSIVE" if s["omp_passive"] else "default (spin)"
    return f"""Command: `{command}` ({elapsed / 60:.0f} min in all, on a shared machine).

Machine: {common.machine()}; {common.versions("torch", "transformers", "peft", "trl")};
{"/".join(map(str, threads))} torch threads, OMP_WAIT_POLICY={policy}, fp32, sdpa attention.
Load average at the start of the runs: {min(loads):.1f} to {max(loads):.1f} (2.0 = both
cores busy).

Model: Llama-shaped, random weights, hidden {s["hidden"]}, {s["layers"]} layers,
{s["heads"]} heads, MLP {s["intermediate"]}, vocab {s["vocab"]} (BPE trained here), untied
head, {s["params"] / 1e6:.1f}M parameters. LoRA r={s["lora_r"]}, alpha={s["lora_alpha"]:g},
dropout 0, every linear layer but the head. Data: {parity["examples"]} synthetic chats,
{parity["tokens"]} tokens, {parity["trained_tokens"]} trained (assistant turns and their
`<|im_end|>`), {parity["truncated"]} truncated. Same token ids on both sides:
{parity["identical_ids"]}; same trained positions: {parity["identical_trained_positions"]}.
Packed rows: posttrain {parity["rows_packed_ours"]}, TRL {parity["rows_packed_trl"]}.
{s["steps"]} steps of grad_accum {s["grad_accum"]} micro-batches of {s["batch_size"]} examples
(packing off) or {s["packed_batch_size"]} rows of {s["max_length"]} tokens (packing on), max_length
{s["max_length"]}, lr {s["lr"]:g}, cosine, {s["warmup"]} warm-up steps, clipping 1.0, AdamW,
a log line every step. {s["repeats"]} repeats per row, posttrain and TRL alternating; repeat i
uses seed i on both sides. Without packing TRL reads the examples in posttrain's batch order
(`train_sampling_strategy="sequential"`), so both sides process identical batches.

{main_table(results, s["steps"])}

- tokens/s: real (non-padding) tokens fed to the model in steps 2..{s["steps"]} / wall time
  from the end of step 1 to the end of step {s["steps"]}; median over repeats (min-max).
  tokens/CPU-s: the same tokens / the worker's CPU time over the same span (less sensitive
  to other jobs on the machine). "vs TRL": ratio of the medians (per-repeat ratios).
- Peak RSS: VmHWM of the worker process at the end of the last step (imports, data, model,
  training); RSS at start: when the first step begins.
- Loss: mean ± sd over the repeats; held-out: mean cross-entropy on {s["holdout_rows"]} fixed
  chats after training, the same function on both sides.

Same-curve check (no packing, seed 0, no warm-up, so the schedules are identical; same
batches and, with the same seed, the same LoRA initialisation on both sides):
{parity_line(pair)}. With warm-up the schedules differ by one step: transformers'
warm-up gives lr 0 to the first step (k/W for step k = 0..W-1), posttrain (k+1)/W.

Loss curves (median over repeats of the loss logged at each step):

{curve_table(results, s["steps"])}
"""


# ----------------------------------------------------------------------------- main


def run_pair(
    shared: dict, work: Path, name: str, packing: bool, seed: int, lengths, sides, **extra
) -> dict:
    """Run both trainers (in the order `sides`) on one setting; returns {side: result}."""
    out = {}
    if packing:
        extra["batch_size"] = shared["packed_batch_size"]
    for side in sides:
        spec = dict(shared, packing=packing, seed=seed, out=str(work / f"{side}-{name}"), **extra)
        if side == "trl" and not packing:
            spec["order"] = batch_order(lengths, spec)
        path = work / f"{side}-{name}.spec.json"
        path.write_text(json.dumps(spec))
        args = ["--worker", side, "--spec", str(path)]
        env = common.omp_env(shared["threads"], shared["omp_passive"])
        result = common.run_worker(HERE, args, env)
        print(
            f"{side}-{name}: {result['tokens_per_s']:.0f} tok/s "
            f"({result['tokens_per_cpu_s']:.0f}/CPU-s), "
            f"peak RSS {result['peak_rss_mib']:.0f} MiB, "
            f"loss {common.tail_mean(result['losses']):.3f}, held-out {result['heldout_loss']:.3f}, "
            f"load {result['load_start']:.1f}->{result['load_end']:.1f}",
            file=sys.stderr,
            flush=True,
        )
        out[side] = result
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--packing", choices=["off", "on", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=0, help="override the repeats")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument(
        "--omp-spin", action="store_true", help="keep OpenMP's default spin-waiting"
    )
    parser.add_argument("--no-readme", action="store_true", help="do not write README.md")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        run = worker_ours if args.worker == "ours" else worker_trl
        Path(args.result).write_text(json.dumps(run(spec)))
        return 0

    setup = QUICK if args.quick else Setup()
    if args.repeats:
        setup.repeats = args.repeats
    setup.threads = args.threads
    setup.omp_passive = not args.omp_spin
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.packing]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
        work = Path(tmp)
        shared = prepare(work, setup)
        parity, lengths = check_parity(shared, work)
        print(json.dumps(parity), file=sys.stderr)
        if not (parity["identical_ids"] and parity["identical_trained_positions"]):
            print("error: the two sides do not train on the same tokens", file=sys.stderr)
            return 1
        pair = run_pair(shared, work, "parity", False, 0, lengths, ("ours", "trl"), warmup=0)
        results: dict[tuple[str, bool], list[dict]] = {}
        for repeat in range(setup.repeats):
            sides = ("ours", "trl") if repeat % 2 else ("trl", "ours")
            for packing in modes:
                name = f"{'packed' if packing else 'padded'}-{repeat}"
                runs = run_pair(shared, work, name, packing, repeat, lengths, sides)
                for side, result in runs.items():
                    results.setdefault((side, packing), []).append(result)
        flags = [
            f
            for f, on in (
                ("--quick", args.quick),
                (f"--threads {args.threads}", args.threads),
                ("--omp-spin", args.omp_spin),
            )
            if on
        ]
        command = " ".join(["python benchmarks/sft.py", *flags])
        text = report(results, pair, parity, shared, command, time.perf_counter() - started)
    print(text)
    if not args.no_readme and not args.quick:
        title = "SFT: posttrain vs TRL SFTTrainer (LoRA, CPU"
        title += (
            f", {args.threads} thread{'s' if args.threads > 1 else ''})" if args.threads else ")"
        )
        common.update_readme(title, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
