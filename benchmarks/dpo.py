"""DPO throughput, peak memory and loss: posttrain vs TRL's `DPOTrainer`, two configurations.

    python benchmarks/dpo.py           # the full run (~12 min); rewrites its README section
    python benchmarks/dpo.py --quick   # a smoke run (~2 min), writes nothing

Configurations (both trainers in each):
- `lora`: LoRA r 16 on every linear layer but the head; the reference is the same model with
  the adapter disabled, one extra no-grad forward per micro-batch on both sides;
- `full`: full fine-tuning with reference log-probs computed once before training (posttrain:
  always, cached in output_dir/reference_logps.json; TRL: `precompute_ref_log_probs=True`).
  The first repeat also runs TRL's own default for full fine-tuning (`precompute_ref_log_probs=
  False`: a second model copy and a reference forward per micro-batch), reported beside it.

What is the same on both sides:
- the model: Llama-shaped, random weights (fp32, sdpa, untied head), saved once and loaded by
  each side with `from_pretrained`; a byte-level BPE tokenizer trained here;
- the data: synthetic preference pairs `{"prompt": [messages], "chosen": [assistant],
  "rejected": [assistant]}`: word tasks (fixtures.make_turn) after an optional system prompt and
  an optional earlier turn; chosen is the correct answer, rejected the same answer corrupted
  (two words swapped, one dropped or one replaced). The chat template is ChatML with the
  newline written between turns instead of after each: with plain ChatML TRL also trains the
  "\\n" after the answer's `<|im_end|>` (its completion is everything the full render adds to
  the prompt render), which posttrain does not train. With this template both sides train
  exactly the answer and its `<|im_end|>`; the script checks before anything is timed that
  both produce identical token ids and trained positions for every chosen and rejected;
- the loss: sigmoid DPO, beta 0.1, summed log-probs of the trained tokens, the mean over the
  pairs of the step (TRL: mean per micro-batch / grad_accum, the same with equal micro-batches);
- AdamW, lr, cosine schedule, warm-up steps, clipping 1.0, no weight decay, micro-batch size
  (pairs), grad_accum, max_length, max_steps, a log line every step, no eval, no checkpoint;
  fp32 (`bf16=False`), `gradient_checkpointing=False` (TRL's default is on);
- batches: the same number of pairs per micro-batch, and over the run every pair once (one
  epoch), each side length-grouped for its own layout. TRL runs a pair as two rows (chosen rows
  first), so it reads the pairs (`train_sampling_strategy="sequential"` over the reordered
  dataset) in the order posttrain's batch plan gives when grouping by the longer response;
  posttrain runs one row per pair (the prompt once, then chosen and rejected, a 4D mask keeping
  the two apart: `posttrain/data/shared_prompt.py`) and groups by that row's length. Repeat i uses seed i on both sides
  (peft then draws the same LoRA initialisation). One extra pair per configuration without
  warm-up (identical schedules), TRL reading posttrain's own batches, checks that the loss
  curves coincide step by step and start at log 2 (policy = reference at step 1).

What is timed: each run is a fresh process; a hook at the end of every optimizer step
(posttrain: around `Loop.train_step`; TRL: `on_step_end`) takes the time. Tokens are counted by
the full chosen + rejected sequences of the step's pairs, once per step (TRL: a forward pre-hook
on the input embedding, only for forwards run with gradients enabled, counting the non-padding
ids of the policy's rows; posttrain: the trainer's own count, which credits a one-row pair with
both full sequences, as two rows would hold them; the two counts are equal). The reference forwards of `lora` (no-grad on
both sides) and the precomputation of `full` (before step 1 on both sides) are not counted as
tokens, but the reference forwards' time is inside the timed steps. tokens/s = non-padding
tokens of steps 2..N / wall time from the end of step 1 to the end of step N; the same tokens
over the process's CPU time are also reported.

Peak memory: the worker's VmHWM at the end of the last step (imports, data, model, reference
precomputation and training; not the final save or the held-out evaluation).

Loss: the loss logged at every step, the mean of its last 5 steps, and, after training, the
DPO loss and reward accuracy on held-out pairs against reference log-probs computed once from
the initial model, by the same function on both sides.
"""

from __future__ import annotations

import json
import math
import statistics
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
CONFIGS = {
    "lora": "LoRA, reference = adapter disabled",
    "full": "full fine-tuning, precomputed reference",
}
# ChatML with "\n" between turns rather than after each one: a rendered conversation ends at
# its last <|im_end|>, so TRL's completion (full render minus prompt render) is exactly what
# posttrain trains (see the module docstring).
CHATML_DPO = (
    "{% for m in messages %}"
    "{% if not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\n' }}{% endif %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Setup(versus.LlamaSetup):
    """Everything both trainers share."""

    max_words: int = 24  # words per question: sets the length spread of the pairs
    train_rows: int = 320  # = steps x grad_accum x batch_size: one epoch, every batch full
    holdout_rows: int = 64
    steps: int = 20
    parity_steps: int = 8  # steps of the no-warm-up same-curve pairs
    batch_size: int = 8  # pairs per micro-batch (2 x 8 rows)
    grad_accum: int = 2
    lr_lora: float = 1e-3
    lr_full: float = 1e-4
    warmup: int = 2
    beta: float = 0.1
    repeats: int = 3


QUICK = Setup(
    train_rows=128,
    holdout_rows=16,
    steps=5,
    parity_steps=3,
    max_words=12,
    batch_size=4,
    warmup=2,
    repeats=1,
)


# ----------------------------------------------------------------------------- data


def pair_logps(model, examples: list[dict], pad_id: int, batch_size: int = 8) -> list[list[float]]:
    """[chosen, rejected] summed log-probs of the trained tokens per example, from the model's
    own full logits in eval mode (the same function for both sides and the reference)."""
    import torch

    model.eval()
    seqs = [r for e in examples for r in e["responses"]]
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            ids, targets, mask = common.pad_batch(seqs[start : start + batch_size], pad_id)
            logps = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            logps = logps.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
            out += (logps * (targets != -100)).sum(1).tolist()
    return [out[i : i + 2] for i in range(0, len(out), 2)]


def heldout_metrics(model, holdout: dict, pad_id: int, beta: float) -> dict[str, float]:
    """Mean DPO loss and reward accuracy on the held-out pairs vs their reference log-probs."""
    losses, wins = [], []
    for (c, r), (rc, rr) in zip(pair_logps(model, holdout["examples"], pad_id), holdout["ref"]):
        z = beta * ((c - rc) - (r - rr))
        losses.append(math.log1p(math.exp(-z)) if z > -30 else -z)
        wins.append(float(z > 0))
    return {"heldout_loss": statistics.fmean(losses), "heldout_accuracy": statistics.fmean(wins)}


def prepare(work: Path, setup: Setup) -> dict:
    """Data files, tokenizer and model under `work`; returns the shared part of a worker spec."""
    from transformers import AutoModelForCausalLM

    from posttrain.data.load import load_rows
    from posttrain.data.preference import tokenize_ranked

    words = fixtures.make_words(1500)
    train = fixtures.make_pairs(setup.train_rows, 1, words, setup.max_words)
    holdout = fixtures.make_pairs(setup.holdout_rows, 2, words, setup.max_words)
    texts = [m["content"] for row in train for k in row for m in row[k]]
    tokenizer = fixtures.train_tokenizer(texts, setup.vocab, CHATML_DPO)
    shared = versus.llama_spec(work, setup, tokenizer)
    common.write_jsonl(work / "train.jsonl", train)
    common.write_jsonl(work / "holdout.jsonl", holdout)
    held, _ = tokenize_ranked(load_rows(str(work / "holdout.jsonl")), tokenizer, 10**6)
    model = AutoModelForCausalLM.from_pretrained(shared["model"], dtype="float32")
    ref = pair_logps(model, held, tokenizer.pad_token_id)
    (work / "holdout.json").write_text(json.dumps({"examples": held, "ref": ref}))
    return shared


def check_parity(shared: dict, work: Path) -> tuple[dict, dict[str, list[int]]]:
    """Tokenise the pairs both ways: chosen/rejected ids and trained positions must match.

    TRL's sequence is prompt_ids + chosen_ids (its collator truncates it to max_length, keeping
    the start) with the completion tokens trained; posttrain's targets are pre-shifted, so
    TRL's completion mask shifted left by one is compared with posttrain's targets.
    Returns the counts and the lengths each side's batches are best grouped by: posttrain's
    one row per pair (both responses, their shared prompt once) and TRL's row per response
    (the longer response of the pair).
    """
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    from posttrain.data.load import load_rows
    from posttrain.data.preference import tokenize_ranked
    from posttrain.data.shared_prompt import row_length

    tokenizer = AutoTokenizer.from_pretrained(shared["model"])
    ours, stats = tokenize_ranked(load_rows(shared["train"]), tokenizer, shared["max_length"])
    args = trl_config(dict(shared, config="lora", seed=0, out=work / "parity"))
    theirs = versus.trl_prepared(DPOTrainer, args, shared, tokenizer)
    cut = shared["max_length"]
    same_ids = same_targets = len(theirs) == len(ours)
    for e, prompt, *answers in zip(
        ours, theirs["prompt_ids"], theirs["chosen_ids"], theirs["rejected_ids"]
    ):
        for mine, answer in zip(e["responses"], answers):
            ids = (prompt + answer)[:cut]
            trained = ([0] * len(prompt) + [1] * len(answer))[:cut]
            targets = [t if m else -100 for t, m in zip(ids[1:], trained[1:])] + [-100]
            same_ids &= mine["input_ids"] == ids
            same_targets &= mine["targets"] == targets
    responses = [r for e in ours for r in e["responses"]]
    parity = {
        "pairs": stats["examples"],
        "tokens": sum(len(r["input_ids"]) for r in responses),
        "trained_tokens": sum(sum(t != -100 for t in r["targets"]) for r in responses),
        "truncated": stats["truncated"],
        "identical_ids": same_ids,
        "identical_trained_positions": same_targets,
    }
    lengths = {
        "ours": [row_length(e) for e in ours],
        "trl": [max(len(r["input_ids"]) for r in e["responses"]) for e in ours],
    }
    return parity, lengths


# ----------------------------------------------------------------------------- workers


def lr_of(spec: dict) -> float:
    return spec["lr_lora"] if spec["config"] == "lora" else spec["lr_full"]


def trl_config(spec: dict):
    from trl import DPOConfig

    return DPOConfig(
        **versus.offline_trl_args(spec),
        learning_rate=lr_of(spec),
        beta=spec["beta"],
        loss_type=["sigmoid"],
        precompute_ref_log_probs=spec["config"] == "full",
    )


def policy_clock(spec: dict) -> common.StepClock:
    """A StepClock that counts only forwards with gradients enabled: the policy's, not the
    no-grad reference forwards or the reference precomputation."""
    return common.StepClock(spec["pad_id"], grad_only=True)


def worker_ours(spec: dict) -> dict:
    from posttrain.train import dpo

    clock = policy_clock(spec)
    clock.job_tokens = 0  # both sequences of a pair, as the trainer counts them (one row or two)
    models = common.time_posttrain_steps(dpo, clock)
    dpo.dpo(
        versus.posttrain_config(
            spec,
            **versus.offline_settings(spec),
            adapter="lora" if spec["config"] == "lora" else "full",
            lora=versus.posttrain_lora(spec),
            loss="dpo",
            beta=spec["beta"],
            lr=lr_of(spec),
        )
    )
    clock.stop()
    logs = versus.posttrain_logs(spec["out"])
    return finish(clock, logs, ("lr", "accuracy"), heldout(models[0], spec))


def worker_trl(spec: dict) -> dict:
    from trl import DPOTrainer

    clock = policy_clock(spec)
    tokenizer, model = versus.trl_inputs(spec)
    lora = common.lora_config(spec) if spec["config"] == "lora" else None
    # the pairs in a posttrain batch plan's order, read in sequence
    trainer = versus.train_trl(DPOTrainer, spec, clock, trl_config(spec), tokenizer, model, lora)
    logs = versus.logged(trainer.state.log_history)
    return finish(
        clock, logs, ("learning_rate", "rewards/accuracies"), heldout(trainer.model, spec)
    )


def heldout(model, spec: dict) -> dict[str, float]:
    """heldout_metrics on the spec's held-out pairs."""
    holdout = json.loads(Path(spec["holdout"]).read_text())
    return heldout_metrics(model, holdout, spec["pad_id"], spec["beta"])


def finish(clock: common.StepClock, logs: list[dict], keys: tuple[str, str], held: dict) -> dict:
    """The worker's result: timings, memory, per-step loss, lr, gradient norm, accuracy."""
    lr_key, accuracy_key = keys
    series = {
        "losses": "loss",
        "lrs": lr_key,
        "grad_norms": "grad_norm",
        "accuracies": accuracy_key,
    }
    return versus.worker_result(clock, logs, series, **held)


# ----------------------------------------------------------------------------- report


def main_table(results: dict, steps: int) -> str:
    headers = [
        "config",
        "trainer",
        *versus_report.versus_headers("tokens/s", "tokens/CPU-s", "peak RSS MiB"),
        "RSS at start MiB",
        "padding",
        "loss, step 1",
        f"loss, last 5 of {steps} steps",
        "held-out loss",
        "held-out accuracy",
    ]
    keys = ("tokens_per_s", "tokens_per_cpu_s", "peak_rss_mib")
    rows = []
    for config, side, name, runs in versus_report.side_rows(results, CONFIGS):
        r = runs[side]
        rows.append([
            config,
            name,
            *versus_report.versus_cells(runs, side, keys),
            common.median_spread([x["rss_start_mib"] for x in r]),
            versus_report.padding_cell(r),
            common.mean_sd([x["losses"][0] for x in r]),
            common.mean_sd([common.tail_mean(x["losses"]) for x in r]),
            common.mean_sd([x["heldout_loss"] for x in r]),
            common.mean_sd([x["heldout_accuracy"] for x in r]),
        ])  # fmt: skip
    return common.markdown_table(headers, rows)


def curve_table(results: dict, steps: int) -> str:
    marks = sorted({1, 2, 5, *range(10, steps + 1, 10), steps})
    rows = versus_report.curve_rows(results, CONFIGS, str)
    return versus_report.curve_table(rows, marks, "losses", 4)


def live_line(results: dict) -> str:
    """posttrain `full` against TRL's default for full fine-tuning (a live reference model)."""
    ours, live = results.get(("ours", "full"), []), results.get(("trl-live", "full"), [])
    if not ours or not live:
        return ""
    speed = [x["tokens_per_s"] for x in live]
    rss = [x["peak_rss_mib"] for x in live]
    cpu = common.median_spread([x["tokens_per_cpu_s"] for x in live])
    step1 = common.mean_sd([x["losses"][0] for x in live])
    faster = statistics.median(x["tokens_per_s"] for x in ours) / statistics.median(speed)
    memory = statistics.median(x["peak_rss_mib"] for x in ours) / statistics.median(rss)
    return (
        "\nTRL's default for full fine-tuning (one run, seed 0), `precompute_ref_log_probs=False`"
        " (a second copy of the model as the reference, one no-grad reference forward per "
        f"micro-batch), same settings otherwise: {common.median_spread(speed)} tokens/s, {cpu} "
        f"tokens/CPU-s, peak RSS {common.median_spread(rss)} MiB, loss at step 1 {step1}; "
        f"posttrain `full` (median) is **{faster:.2f}x** its tokens/s at {memory:.2f}x its peak "
        "RSS.\n"
    )


def parity_line(config: str, pair: dict) -> str:
    first, last = versus_report.both(pair, "losses", 0, 6), versus_report.both(pair, "losses", -1)
    tokens = f"{pair['ours']['tokens']} vs {pair['trl']['tokens']}"
    return (
        f"- {config}: step 1 loss {first} (log 2 = {math.log(2):.6f}); "
        f"{versus_report.loss_gap_text(pair)} (last: {last}); {versus_report.lr_and_heldout_text(pair)}; "
        f"tokens credited over the timed steps {tokens}"
    )


def report(results, pairs, parity, shared, command, elapsed) -> str:
    s = shared
    same_curves = "\n".join(parity_line(c, pair) for c, pair in pairs.items())
    return f"""{versus_report.report_header(results, s, command, elapsed)}

{versus.llama_text(s)} Configurations: `lora` = LoRA r={s["lora_r"]},
alpha={s["lora_alpha"]:g}, dropout 0, every linear layer but the head, reference = the adapter
disabled (a no-grad forward per micro-batch), lr {s["lr_lora"]:g}; `full` = every parameter,
reference log-probs precomputed before step 1 (TRL `precompute_ref_log_probs=True`), lr
{s["lr_full"]:g}. Data: {parity["pairs"]} synthetic preference pairs, {parity["tokens"]} tokens
(chosen + rejected sequences), {parity["trained_tokens"]} trained (the answers and their
`<|im_end|>`), {parity["truncated"]} truncated. Same token ids on both sides:
{parity["identical_ids"]}; same trained positions: {parity["identical_trained_positions"]}.
Sigmoid DPO, beta {s["beta"]:g}; {s["steps"]} steps of grad_accum {s["grad_accum"]}
micro-batches of {s["batch_size"]} pairs ({2 * s["batch_size"]} rows), max_length
{s["max_length"]}, cosine, {s["warmup"]} warm-up steps, clipping 1.0, AdamW, a log line every
step: one epoch, every pair once. {s["repeats"]} repeats per row, posttrain and TRL
alternating; repeat i uses seed i on both sides. Each side's micro-batches are grouped by
length for its own layout: posttrain's one row per pair by that row (both responses, the
prompt once), TRL's two rows per pair by the longer response (TRL reads the pairs in that
order); the same-curve check below gives TRL posttrain's own batches.

{main_table(results, s["steps"])}
{live_line(results)}
- tokens/s: real (non-padding) tokens of the pairs' full chosen + rejected sequences in steps
  2..{s["steps"]} (counted once per step; reference forwards and precomputation not counted)
  / wall time from the end of step 1 to the end of step {s["steps"]}; median over repeats
  (min-max). The time includes the `lora` reference forwards; the `full` precomputation runs
  before step 1 on both sides and is not timed. tokens/CPU-s: the same tokens / the worker's
  CPU time over the same span. "vs TRL": ratio of the medians (per-repeat ratios).
- padding: the share of padded positions in the rows each side runs (posttrain's rows hold
  a pair each, TRL's a response each, so their shapes differ).
- Peak RSS: VmHWM of the worker process at the end of the last step (imports, data, model,
  reference precomputation, training); RSS at start: when the first step begins.
- Loss: mean ± sd over the repeats; held-out: sigmoid DPO loss and reward accuracy on
  {s["holdout_rows"]} fixed pairs after training, against reference log-probs of the initial
  model, the same function on both sides.

Same-curve check ({s["parity_steps"]} steps, seed 0, no warm-up, so the schedules are
identical; same batches and the same LoRA initialisation on both sides; the loss at step 1
must be log 2 since the policy is the reference):
{same_curves}.
With warm-up the schedules differ by one step: transformers' warm-up gives lr 0 to the first
step (k/W for step k = 0..W-1), posttrain (k+1)/W.

Loss curves (median over repeats of the loss logged at each step):

{curve_table(results, s["steps"])}
"""


# ----------------------------------------------------------------------------- main


def run_pair(
    shared: dict, work: Path, name: str, config: str, seed: int, lengths, sides=("trl",), **extra
) -> dict:
    """Run both trainers (in the order `sides`) on one setting; returns {side: result}. TRL
    reads the pairs in the order posttrain's batch plan gives for `lengths`."""
    spec = dict(shared, config=config, seed=seed, **extra)
    env = versus.worker_env(shared, TQDM_DISABLE="1")
    extend = versus.trl_reads_in_order(lengths)
    return versus.run_sides(HERE, work, name, sides, spec, env, describe, extend)


def describe(result: dict) -> str:
    """A worker's stderr progress line."""
    return (
        f"{versus_report.speed_text(result)}, loss step 1 {result['losses'][0]:.5f}, "
        f"last {common.tail_mean(result['losses']):.4f}, held-out {result['heldout_loss']:.4f}, "
        f"{versus_report.load_text(result)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = versus.benchmark_parser(__doc__)
    parser.add_argument("--config", choices=[*CONFIGS, "both"], default="both")
    versus.add_run_options(parser, "do not write README.md (--config: never)")
    args = versus.parse_args(parser, argv)
    if versus.run_as_worker(args, {"ours": worker_ours, "trl": worker_trl}):
        return 0

    setup = versus.apply_run_options(QUICK if args.quick else Setup(), args)
    configs = list(CONFIGS) if args.config == "both" else [args.config]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        work = Path(tmp)
        shared = prepare(work, setup)
        parity, grouping = check_parity(shared, work)
        checks = [parity["identical_ids"], parity["identical_trained_positions"]]
        if not versus.parity_holds(parity, checks, "train on the same tokens"):
            return 1
        pairs = {
            c: run_pair(
                shared,
                work,
                f"{c}-parity",
                c,
                0,
                grouping["ours"],  # the same batches on both sides
                ("ours", "trl"),
                warmup=0,
                steps=setup.parity_steps,
            )
            for c in configs
        }

        def run(repeat: int, config: str, sides) -> dict:
            name, trl_lengths = f"{config}-{repeat}", grouping["trl"]  # grouped for TRL
            runs = run_pair(shared, work, name, config, repeat, trl_lengths, sides)
            if config == "full" and repeat == 0:  # TRL's default for full fine-tuning
                live = run_pair(shared, work, f"live-{repeat}", "full_live", 0, trl_lengths)
                runs["trl-live"] = live["trl"]
            return runs

        results = versus.run_repeats(setup.repeats, configs, run)
        config_flag = (f"--config {args.config}", args.config != "both")
        command = versus.command_line("dpo.py", args, config_flag)
        text = report(results, pairs, parity, shared, command, time.perf_counter() - started)
    print(text)
    if not args.no_readme and not args.quick and args.config == "both":
        common.update_readme("DPO: posttrain vs TRL DPOTrainer (CPU)", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
