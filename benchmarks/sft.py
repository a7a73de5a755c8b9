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

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import common
import fixtures
import versus
import versus_report

HERE = Path(__file__).resolve()


@dataclass
class Setup(versus.LlamaSetup):
    """Everything both trainers share."""

    max_words: int = 32  # words per question: sets the length spread of the chats
    train_rows: int = 2000
    holdout_rows: int = 64
    steps: int = 40
    batch_size: int = 8  # examples per micro-batch without packing
    packed_batch_size: int = 2  # rows of max_length per micro-batch with packing (~ as many tokens)
    grad_accum: int = 2
    lr: float = 1e-3
    warmup: int = 4
    repeats: int = 5


QUICK = Setup(
    train_rows=400, holdout_rows=16, steps=6, batch_size=4, packed_batch_size=1, repeats=1, warmup=2
)


# ----------------------------------------------------------------------------- preparation


def prepare(work: Path, setup: Setup) -> dict:
    """Data files, tokenizer and model under `work`; returns the shared part of a worker spec."""
    from posttrain.data.load import load_rows
    from posttrain.data.tokenize import tokenize_sft

    words = fixtures.make_words(1500)
    train = fixtures.make_chats(setup.train_rows, 1, words, setup.max_words)
    holdout = fixtures.make_chats(setup.holdout_rows, 2, words, setup.max_words)
    texts = [m["content"] for row in train for m in row["messages"]]
    tokenizer = fixtures.train_tokenizer(texts, setup.vocab)
    shared = versus.llama_spec(work, setup, tokenizer)
    common.write_jsonl(work / "train.jsonl", train)
    common.write_jsonl(work / "holdout.jsonl", holdout)
    held, _ = tokenize_sft(load_rows(str(work / "holdout.jsonl")), tokenizer, 10**6)
    (work / "holdout.json").write_text(json.dumps(held))
    return dict(shared, vocab=setup.vocab)  # the report quotes the size asked of the BPE


def check_parity(shared: dict, work: Path) -> tuple[dict, list[int]]:
    """Tokenise the training set both ways; token ids and trained positions must be identical.

    posttrain's targets are pre-shifted (targets[t] = the token trained at t+1), TRL's labels
    are not, so TRL's labels shifted left by one are compared with posttrain's targets.
    Returns the counts and the example lengths.
    """
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from posttrain.data.batching import pack_rows
    from posttrain.data.load import load_rows
    from posttrain.data.tokenize import tokenize_sft

    tokenizer = AutoTokenizer.from_pretrained(shared["model"])
    ours, stats = tokenize_sft(load_rows(shared["train"]), tokenizer, shared["max_length"])
    tokenizer.chat_template = fixtures.CHATML_GENERATION
    prepared = {
        packing: versus.trl_prepared(
            SFTTrainer,
            trl_config(dict(shared, packing=packing, seed=0, out=work / "parity")),
            shared,
            tokenizer,
        )
        for packing in (False, True)
    }
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


# ----------------------------------------------------------------------------- workers


def trl_config(spec: dict):
    from trl import SFTConfig

    return SFTConfig(
        **versus.offline_trl_args(spec),  # unpacked: read in posttrain's batch order
        learning_rate=spec["lr"],
        packing=spec["packing"],
        assistant_only_loss=True,
    )


def worker_ours(spec: dict) -> dict:
    from posttrain.train import sft

    clock = common.StepClock(spec["pad_id"])
    models = common.time_posttrain_steps(sft, clock)
    sft.sft(
        versus.posttrain_config(
            spec,
            **versus.offline_settings(spec),
            adapter="lora",
            lora=versus.posttrain_lora(spec),
            lr=spec["lr"],
            packing=spec["packing"],
        )
    )
    clock.stop()
    logs = versus.posttrain_logs(spec["out"])
    return finish(clock, logs, "lr", heldout_loss(models[0], spec))


def worker_trl(spec: dict) -> dict:
    from trl import SFTTrainer

    clock = common.StepClock(spec["pad_id"])
    tokenizer, model = versus.trl_inputs(spec)
    tokenizer.chat_template = fixtures.CHATML_GENERATION
    # unpacked: identical batches, posttrain's length-grouped order read in sequence
    args, lora = trl_config(spec), common.lora_config(spec)
    trainer = versus.train_trl(SFTTrainer, spec, clock, args, tokenizer, model, lora)
    logs = versus.logged(trainer.state.log_history)
    return finish(clock, logs, "learning_rate", heldout_loss(trainer.model, spec))


def heldout_loss(model, spec: dict) -> float:
    """common.heldout_loss on the spec's held-out chats."""
    holdout = json.loads(Path(spec["holdout"]).read_text())
    return common.heldout_loss(model, holdout, spec["pad_id"])


def finish(clock: common.StepClock, logs: list[dict], lr_key: str, heldout: float) -> dict:
    """The worker's result: timings, memory, and per-step loss, lr and gradient norm."""
    keys = {"losses": "loss", "lrs": lr_key, "grad_norms": "grad_norm"}
    return versus.worker_result(clock, logs, keys, heldout_loss=heldout)


# ----------------------------------------------------------------------------- report


def main_table(results: dict, steps: int) -> str:
    headers = [
        "packing",
        "trainer",
        *versus_report.versus_headers("tokens/s", "tokens/CPU-s"),
        "peak RSS MiB",
        "RSS at start MiB",
        "padding",
        f"loss, last 5 of {steps} steps",
        "held-out loss",
    ]
    rows = []
    for packing, side, name, runs in versus_report.side_rows(results, (False, True)):
        r = runs[side]
        rows.append([
            "on" if packing else "off",
            name,
            *versus_report.versus_cells(runs, side, ("tokens_per_s", "tokens_per_cpu_s")),
            common.median_spread([x["peak_rss_mib"] for x in r]),
            common.median_spread([x["rss_start_mib"] for x in r]),
            versus_report.padding_cell(r),
            common.mean_sd([common.tail_mean(x["losses"]) for x in r]),
            common.mean_sd([x["heldout_loss"] for x in r]),
        ])  # fmt: skip
    return common.markdown_table(headers, rows)


def curve_table(results: dict, steps: int) -> str:
    marks = sorted({1, 2, 5, *range(10, steps + 1, 10), steps})
    rows = versus_report.curve_rows(
        results, (False, True), lambda p: f"packing {'on' if p else 'off'}"
    )
    return versus_report.curve_table(rows, marks, "losses", 3)


def parity_line(pair: dict) -> str:
    first, last = versus_report.both(pair, "losses", 0), versus_report.both(pair, "losses", -1)
    return (
        f"{versus_report.loss_gap_text(pair)} (step 1: {first}; last: {last}); "
        f"{versus_report.lr_and_heldout_text(pair)}"
    )


def report(results, pair, parity, shared, command, elapsed) -> str:
    s = shared
    return f"""{versus_report.report_header(results, s, command, elapsed)}

{versus.llama_text(s)} LoRA r={s["lora_r"]}, alpha={s["lora_alpha"]:g},
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
):
    """Run both trainers (in the order `sides`) on one setting; returns {side: result}.
    Without packing TRL reads the examples in posttrain's batch order for `lengths`."""
    if packing:
        extra["batch_size"] = shared["packed_batch_size"]
    spec = dict(shared, packing=packing, seed=seed, **extra)
    env = versus.worker_env(shared)
    extend = None if packing else versus.trl_reads_in_order(lengths)
    return versus.run_sides(HERE, work, name, sides, spec, env, describe, extend)


def describe(result: dict) -> str:
    """A worker's stderr progress line."""
    return (
        f"{versus_report.speed_text(result)}, loss {common.tail_mean(result['losses']):.3f}, "
        f"held-out {result['heldout_loss']:.3f}, {versus_report.load_text(result)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = versus.benchmark_parser(__doc__)
    parser.add_argument("--packing", choices=["off", "on", "both"], default="both")
    versus.add_run_options(parser)
    args = versus.parse_args(parser, argv)
    if versus.run_as_worker(args, {"ours": worker_ours, "trl": worker_trl}):
        return 0

    setup = versus.apply_run_options(QUICK if args.quick else Setup(), args)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.packing]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
        work = Path(tmp)
        shared = prepare(work, setup)
        parity, lengths = check_parity(shared, work)
        checks = [parity["identical_ids"], parity["identical_trained_positions"]]
        if not versus.parity_holds(parity, checks, "train on the same tokens"):
            return 1
        pair = run_pair(shared, work, "parity", False, 0, lengths, ("ours", "trl"), warmup=0)

        def run(repeat: int, packing: bool, sides) -> dict:
            name = f"{'packed' if packing else 'padded'}-{repeat}"
            return run_pair(shared, work, name, packing, repeat, lengths, sides)

        results = versus.run_repeats(setup.repeats, modes, run)
        command = versus.command_line("sft.py", args)
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
