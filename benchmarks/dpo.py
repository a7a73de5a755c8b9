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
  "rejected": [assistant]}`: word tasks (common.make_turn) after an optional system prompt and
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

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import common

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
class Setup:
    """Everything both trainers share."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 704
    vocab: int = 4096
    max_length: int = 512
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
    lora_r: int = 16
    lora_alpha: float = 32.0
    repeats: int = 3
    threads: int = 0  # torch threads in the workers; 0 = torch's default (one per core)
    omp_passive: bool = True  # OMP_WAIT_POLICY=PASSIVE in the workers (see common.omp_env)


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


def corrupt(rng: random.Random, answer: str, words: list[str]) -> str:
    """The answer with two words swapped, one dropped or one replaced (never unchanged)."""
    tokens = answer.split(" ")
    while True:
        out = list(tokens)
        kind = rng.randrange(3)
        i, j = rng.randrange(len(out)), rng.randrange(len(out))
        if kind == 0:
            out[i], out[j] = out[j], out[i]
        elif kind == 1 and len(out) > 1:
            del out[i]
        else:
            out[i] = rng.choice(words)
        if out != tokens:
            return " ".join(out)


def make_pairs(n: int, seed: int, words: list[str], max_words: int) -> list[dict]:
    """n rows {prompt: messages, chosen: [assistant], rejected: [assistant]}."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = []
        if rng.random() < 1 / 3:
            prompt.append({"role": "system", "content": "You are a careful word assistant."})
        for _ in range(rng.choice((0, 0, 1))):
            user, assistant = common.make_turn(rng, words, max_words)
            prompt += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": assistant},
            ]
        user, answer = common.make_turn(rng, words, max_words)
        prompt.append({"role": "user", "content": user})
        rejected = corrupt(rng, answer, words)
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return rows


def pair_logps(model, examples: list[dict], pad_id: int, batch_size: int = 8) -> list[list[float]]:
    """[chosen, rejected] summed log-probs of the trained tokens per example, from the model's
    own full logits in eval mode (the same function for both sides and the reference)."""
    import torch

    model.eval()
    seqs = [r for e in examples for r in e["responses"]]
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]
            width = max(len(s["input_ids"]) for s in chunk)
            ids = torch.full((len(chunk), width), pad_id)
            targets = torch.full((len(chunk), width), -100)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, s in enumerate(chunk):
                n = len(s["input_ids"])
                ids[i, :n] = torch.tensor(s["input_ids"])
                targets[i, :n] = torch.tensor(s["targets"])
                mask[i, :n] = 1
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

    words = common.make_words(1500)
    train = make_pairs(setup.train_rows, 1, words, setup.max_words)
    holdout = make_pairs(setup.holdout_rows, 2, words, setup.max_words)
    texts = [m["content"] for row in train for k in row for m in row[k]]
    tokenizer = common.train_tokenizer(texts, setup.vocab, CHATML_DPO)
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
    common.write_jsonl(work / "holdout.jsonl", holdout)
    held, _ = tokenize_ranked(load_rows(str(work / "holdout.jsonl")), tokenizer, 10**6)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    ref = pair_logps(model, held, tokenizer.pad_token_id)
    (work / "holdout.json").write_text(json.dumps({"examples": held, "ref": ref}))
    return {
        **asdict(setup),
        "model": str(model_dir),
        "train": str(work / "train.jsonl"),
        "holdout": str(work / "holdout.json"),
        "pad_id": tokenizer.pad_token_id,
        "vocab": len(tokenizer),  # what the BPE reached, at most setup.vocab
        "params": params,
    }


def check_parity(shared: dict, work: Path) -> tuple[dict, list[int]]:
    """Tokenise the pairs both ways: chosen/rejected ids and trained positions must match.

    TRL's sequence is prompt_ids + chosen_ids (its collator truncates it to max_length, keeping
    the start) with the completion tokens trained; posttrain's targets are pre-shifted, so
    TRL's completion mask shifted left by one is compared with posttrain's targets.
    Returns the counts and the lengths each side's batches are best grouped by: posttrain's
    one row per pair (both responses, their shared prompt once) and TRL's row per response
    (the longer response of the pair).
    """
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from posttrain.data.load import load_rows
    from posttrain.data.preference import tokenize_ranked
    from posttrain.data.shared_prompt import row_length

    tokenizer = AutoTokenizer.from_pretrained(shared["model"])
    ours, stats = tokenize_ranked(load_rows(shared["train"]), tokenizer, shared["max_length"])
    datasets.disable_progress_bars()
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(shared["model"]),
        args=trl_config(dict(shared, config="lora", seed=0), work / "parity"),
        train_dataset=datasets.Dataset.from_list(common.read_jsonl(shared["train"])),
        processing_class=tokenizer,
        peft_config=common.lora_config(shared),
    )
    theirs = trainer.train_dataset
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


def batch_order(lengths: list[int], spec: dict) -> list[int]:
    """Pair indices in the order posttrain's batches take them (epochs 0, 1, ...)."""
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


class PolicyClock(common.StepClock):
    """A StepClock that counts only forwards with gradients enabled: the policy's, not the
    no-grad reference forwards or the reference precomputation."""

    def attach(self, model) -> None:
        import torch

        def count(module, args):
            if self.counting and torch.is_grad_enabled():
                ids = args[0]
                self.real += int((ids != self.pad_id).sum())
                self.padded += ids.numel()

        model.get_input_embeddings().register_forward_pre_hook(count)


def lr_of(spec: dict) -> float:
    return spec["lr_lora"] if spec["config"] == "lora" else spec["lr_full"]


def trl_config(spec: dict, out: Path):
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(out),
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["grad_accum"],
        learning_rate=lr_of(spec),
        lr_scheduler_type="cosine",
        warmup_steps=spec["warmup"],
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_length=spec["max_length"],
        beta=spec["beta"],
        loss_type=["sigmoid"],
        precompute_ref_log_probs=spec["config"] == "full",
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
    from posttrain.train import dpo

    clock = PolicyClock(spec["pad_id"])
    clock.job_tokens = 0  # both sequences of a pair, as the trainer counts them (one row or two)
    models = common.time_posttrain_steps(dpo, clock)
    out = Path(spec["out"])
    dpo.dpo(
        {
            "model": spec["model"],
            "data": {"train": spec["train"]},
            "output_dir": str(out),
            "adapter": "lora" if spec["config"] == "lora" else "full",
            "lora": {"r": spec["lora_r"], "alpha": spec["lora_alpha"], "dropout": 0.0},
            "loss": "dpo",
            "beta": spec["beta"],
            "max_steps": spec["steps"],
            "batch_size": spec["batch_size"],
            "grad_accum": spec["grad_accum"],
            "lr": lr_of(spec),
            "schedule": "cosine",
            "warmup": float(spec["warmup"]),
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "max_length": spec["max_length"],
            "seed": spec["seed"],
            "log_every": 1,
            "dtype": "float32",
            "attn_implementation": "sdpa",
        }
    )
    clock.stop()
    logs = [r for r in common.read_jsonl(out / "metrics.jsonl") if "loss" in r]
    holdout = json.loads(Path(spec["holdout"]).read_text())
    held = heldout_metrics(models[0], holdout, spec["pad_id"], spec["beta"])
    return finish(clock, logs, ("lr", "accuracy"), held)


def worker_trl(spec: dict) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOTrainer

    clock = PolicyClock(spec["pad_id"])

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.begin()

        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end()

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype="float32", attn_implementation="sdpa"
    )
    clock.attach(model)
    rows = common.read_jsonl(spec["train"])
    if spec.get("order"):  # identical batches: posttrain's length-grouped order, read in sequence
        rows = [rows[i] for i in spec["order"]]
    trainer = DPOTrainer(
        model=model,
        args=trl_config(spec, Path(spec["out"])),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=common.lora_config(spec) if spec["config"] == "lora" else None,
        callbacks=[Clock()],
    )
    trainer.train()
    clock.stop()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    holdout = json.loads(Path(spec["holdout"]).read_text())
    held = heldout_metrics(trainer.model, holdout, spec["pad_id"], spec["beta"])
    return finish(clock, logs, ("learning_rate", "rewards/accuracies"), held)


def finish(clock: common.StepClock, logs: list[dict], keys: tuple[str, str], held: dict) -> dict:
    """The worker's result: timings, memory, per-step loss, lr, gradient norm, accuracy."""
    import torch

    lr_key, accuracy_key = keys
    return {
        **clock.summary(skip=1),
        "losses": [r["loss"] for r in logs],
        "lrs": [r[lr_key] for r in logs],
        "grad_norms": [r["grad_norm"] for r in logs],
        "accuracies": [r[accuracy_key] for r in logs],
        **held,
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- report


def main_table(results: dict, steps: int) -> str:
    headers = [
        "config",
        "trainer",
        "tokens/s",
        "vs TRL",
        "tokens/CPU-s",
        "vs TRL",
        "peak RSS MiB",
        "vs TRL",
        "RSS at start MiB",
        "padding",
        "loss, step 1",
        f"loss, last 5 of {steps} steps",
        "held-out loss",
        "held-out accuracy",
    ]
    rows = []
    for config in CONFIGS:
        runs = {side: results.get((side, config), []) for side in ("ours", "trl")}
        if not runs["ours"] or not runs["trl"]:
            continue
        for side, name in (("ours", "posttrain"), ("trl", "TRL")):
            r, other = runs[side], runs["trl"]
            cells = []
            for key in ("tokens_per_s", "tokens_per_cpu_s", "peak_rss_mib"):
                mine = [x[key] for x in r]
                ratio = common.ratio_cell(mine, [x[key] for x in other], key != "peak_rss_mib")
                cells += [common.median_spread(mine), ratio if side == "ours" else "1.00x"]
            rows.append(
                [
                    config,
                    name,
                    *cells,
                    common.median_spread([x["rss_start_mib"] for x in r]),
                    f"{100 * statistics.median(x['padding_share'] for x in r):.1f}%",
                    common.mean_sd([x["losses"][0] for x in r]),
                    common.mean_sd([common.tail_mean(x["losses"]) for x in r]),
                    common.mean_sd([x["heldout_loss"] for x in r]),
                    common.mean_sd([x["heldout_accuracy"] for x in r]),
                ]
            )
    return common.markdown_table(headers, rows)


def curve_table(results: dict, steps: int) -> str:
    marks = sorted({1, 2, 5, *range(10, steps + 1, 10), steps})
    rows = []
    for config in CONFIGS:
        for side, name in (("ours", "posttrain"), ("trl", "TRL")):
            runs = results.get((side, config), [])
            if runs:
                cells = [
                    f"{statistics.median(r['losses'][m - 1] for r in runs):.4f}" for m in marks
                ]
                rows.append([f"{name}, {config}", *cells])
    return common.markdown_table(["run", *[f"step {m}" for m in marks]], rows)


def live_line(results: dict) -> str:
    """posttrain `full` against TRL's default for full fine-tuning (a live reference model)."""
    ours, live = results.get(("ours", "full"), []), results.get(("trl", "full_live"), [])
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
    ours, trl = pair["ours"], pair["trl"]
    diffs = [abs(a - b) for a, b in zip(ours["losses"], trl["losses"])]
    lr_diff = max(abs(a - b) for a, b in zip(ours["lrs"], trl["lrs"]))
    return (
        f"- {config}: step 1 loss {ours['losses'][0]:.6f} vs {trl['losses'][0]:.6f} (log 2 = "
        f"{math.log(2):.6f}); max |loss difference| over the {len(diffs)} steps "
        f"{max(diffs):.2e} (last: {ours['losses'][-1]:.4f} vs {trl['losses'][-1]:.4f}); "
        f"max |lr difference| {lr_diff:.1e}; held-out loss {ours['heldout_loss']:.4f} vs "
        f"{trl['heldout_loss']:.4f}; tokens credited over the timed steps {ours['tokens']} vs "
        f"{trl['tokens']}"
    )


def report(results, pairs, parity, shared, command, elapsed) -> str:
    s = shared
    threads = sorted({r["threads"] for runs in results.values() for r in runs})
    loads = [r["load_start"] for runs in results.values() for r in runs]
    policy = "PASSIVE" if s["omp_passive"] else "default (spin)"
    same_curves = "\n".join(parity_line(c, pair) for c, pair in pairs.items())
    return f"""Command: `{command}` ({elapsed / 60:.0f} min in all, on a shared machine).

Machine: {common.machine()}; {common.versions("torch", "transformers", "peft", "trl")};
{"/".join(map(str, threads))} torch threads, OMP_WAIT_POLICY={policy}, fp32, sdpa attention.
Load average at the start of the runs: {min(loads):.1f} to {max(loads):.1f} (2.0 = both
cores busy).

Model: Llama-shaped, random weights, hidden {s["hidden"]}, {s["layers"]} layers,
{s["heads"]} heads, MLP {s["intermediate"]}, vocab {s["vocab"]} (BPE trained here), untied
head, {s["params"] / 1e6:.1f}M parameters. Configurations: `lora` = LoRA r={s["lora_r"]},
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
    out = {}
    for side in sides:
        spec = dict(shared, config=config, seed=seed, out=str(work / f"{side}-{name}"), **extra)
        if side == "trl":
            spec["order"] = batch_order(lengths, spec)
        path = work / f"{side}-{name}.spec.json"
        path.write_text(json.dumps(spec))
        env = dict(common.omp_env(shared["threads"], shared["omp_passive"]), TQDM_DISABLE="1")
        result = common.run_worker(HERE, ["--worker", side, "--spec", str(path)], env)
        print(
            f"{side}-{name}: {result['tokens_per_s']:.0f} tok/s "
            f"({result['tokens_per_cpu_s']:.0f}/CPU-s), "
            f"peak RSS {result['peak_rss_mib']:.0f} MiB, loss step 1 {result['losses'][0]:.5f}, "
            f"last {common.tail_mean(result['losses']):.4f}, held-out {result['heldout_loss']:.4f}, "
            f"load {result['load_start']:.1f}->{result['load_end']:.1f}",
            file=sys.stderr,
            flush=True,
        )
        out[side] = result
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--config", choices=[*CONFIGS, "both"], default="both")
    parser.add_argument("--repeats", type=int, default=0, help="override the repeats")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument(
        "--omp-spin", action="store_true", help="keep OpenMP's default spin-waiting"
    )
    parser.add_argument(
        "--no-readme", action="store_true", help="do not write README.md (--config: never)"
    )
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
    configs = list(CONFIGS) if args.config == "both" else [args.config]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        work = Path(tmp)
        shared = prepare(work, setup)
        parity, grouping = check_parity(shared, work)
        print(json.dumps(parity), file=sys.stderr)
        if not (parity["identical_ids"] and parity["identical_trained_positions"]):
            print("error: the two sides do not train on the same tokens", file=sys.stderr)
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
        results: dict[tuple[str, str], list[dict]] = {}
        for repeat in range(setup.repeats):
            sides = ("ours", "trl") if repeat % 2 else ("trl", "ours")
            for config in configs:
                name, trl_lengths = f"{config}-{repeat}", grouping["trl"]  # grouped for TRL
                runs = run_pair(shared, work, name, config, repeat, trl_lengths, sides)
                if config == "full" and repeat == 0:  # TRL's default for full fine-tuning
                    live = run_pair(shared, work, f"live-{repeat}", "full_live", 0, trl_lengths)
                    runs["trl-live"] = live["trl"]
                for side, result in runs.items():
                    key = ("trl", "full_live") if side == "trl-live" else (side, config)
                    results.setdefault(key, []).append(result)
        flags = [
            f
            for f, on in (
                ("--quick", args.quick),
                (f"--config {args.config}", args.config != "both"),
                (f"--threads {args.threads}", args.threads),
                ("--omp-spin", args.omp_spin),
            )
            if on
        ]
        command = " ".join(["python benchmarks/dpo.py", *flags])
        text = report(results, pairs, parity, shared, command, time.perf_counter() - started)
    print(text)
    if not args.no_readme and not args.quick and args.config == "both":
        common.update_readme("DPO: posttrain vs TRL DPOTrainer (CPU)", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
