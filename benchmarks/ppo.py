"""PPO step throughput: posttrain `ppo` vs TRL 1.12's experimental `PPOTrainer` (CPU).

    python benchmarks/ppo.py            # prints the table (needs /tmp/trl112, see below)
    python benchmarks/ppo.py --quick    # fewer rollout batches

TRL 1.16 (our .venv) has no PPO trainer; its experimental `PPOTrainer` last shipped in trl
1.12.0, which runs beside transformers 5.23. So the TRL worker runs in a separate venv:

    python3 -m venv /tmp/trl112
    /tmp/trl112/bin/pip install "torch==2.13.0" "trl==1.12.0" "transformers==5.23.0" peft

(`--trl-python` points elsewhere.) Each trainer runs in a fresh process (`versus.run_sides`:
common.run_worker with a chosen interpreter).

What is the same on both sides: the policy (the tiny world's base, `posttrain/world/base`, a
1.1M-parameter Llama, fp32, sdpa, full fine-tuning); the reward model (a Llama sequence
classifier with one label, built from the same config with random weights, saved once and
loaded by both); the prompts (the tiny world's arithmetic training prompts, encoded once by
posttrain's chat-template encoder; TRL gets those ids); one completion per prompt, temperature
1, no top-k/top-p, at most `response_length` new tokens, stop at EOS; a rollout batch of
`batch_size x grad_accum` prompts, `ppo_epochs` passes, each pass one optimizer step over the
whole batch in `grad_accum` micro-batches (posttrain `num_minibatches=1`; TRL
`num_mini_batches=1`, whose `gradient_accumulation_steps` accumulate inside a minibatch);
k1 KL in the reward with a fixed beta (posttrain `target_kl=0`), GAE gamma 1 lambda 0.95,
whitened advantages, clip 0.2, value clip 0.2, vf_coef 0.1, AdamW (`adamw_torch`), constant lr.

What differs by design (and is part of what is measured): posttrain's value function is a
scalar head on the policy (one forward gives log-probs and values) with a frozen policy copy as
reference; TRL's is a separate value model (here a copy of the reward model, as TRL's examples
do) plus a separate reference copy. TRL samples the whole rollout batch in one `generate` call
(`local_rollout_forward_batch_size` 64), posttrain in calls of `batch_size` prompts. TRL
shuffles the prompts with its own sampler, so the two see different (same-pool) prompts.

What is timed: the wall time between the ends of consecutive rollout batches (posttrain: after
every `ppo_epochs`-th optimizer step; TRL: `on_step_end`, once per rollout batch); the first
rollout batch is warm-up. Completion tokens are counted where each side samples (EOS included,
padding not). Reported: seconds per rollout batch and completion tokens / s.

Simplified on purpose: one tiny model, one setting, few repeats, CPU only; no loss parity.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import common
import versus
import versus_report

HERE = Path(__file__).resolve()
BASE = HERE.parent.parent / "posttrain" / "world" / "base"
TRL_PYTHON = "/tmp/trl112/bin/python"


@dataclass
class Setup:
    batch_size: int = 4  # prompts per micro-batch
    grad_accum: int = 2  # micro-batches per optimizer step; rollout batch = batch_size x this
    ppo_epochs: int = 2
    response_length: int = 24
    rollouts: int = 6  # rollout batches per run; the first is warm-up
    lr: float = 3e-5
    beta: float = 0.05
    repeats: int = 2
    threads: int = 1


QUICK = Setup(rollouts=3, repeats=1)


# ----------------------------------------------------------------------------- preparation


def prepare(work: Path, setup: Setup) -> dict:
    """Prompts (text and posttrain's ids) and the reward model under `work`; the shared spec."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from posttrain.rollout.sampler import encode_prompts
    from posttrain.world.datasets import build_world_data

    tokenizer = AutoTokenizer.from_pretrained(BASE)
    rows = [
        {"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
        for r in build_world_data()["prompts_train"]
        if r["task"] == "arithmetic"
    ]
    ids = encode_prompts(tokenizer, [r["prompt"] for r in rows], chat=True)
    for row, row_ids in zip(rows, ids):
        row["input_ids"] = list(row_ids)
    common.write_jsonl(work / "prompts.jsonl", rows)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(BASE)
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    reward = AutoModelForSequenceClassification.from_config(config).float()
    reward.save_pretrained(work / "reward")
    tokenizer.save_pretrained(work / "reward")
    return {"model": str(BASE), "reward": str(work / "reward"), "train": str(work / "prompts.jsonl"),
            "prompts": len(rows), **asdict(setup)}  # fmt: skip


# ----------------------------------------------------------------------------- workers


class RolloutClock(common.SampleClock):
    """A SampleClock (sampled completion tokens) whose steps are rollout batches."""

    def result(self) -> dict:
        durations = [b[0] - a[0] for a, b in zip(self.steps, self.steps[1:])]
        return versus.worker_result(self, rollout_s=statistics.median(durations))


def worker_ours(spec: dict) -> dict:
    from posttrain.train import ppo

    clock = RolloutClock()
    common.patch_function("posttrain.rollout.sampler", "sample", clock.count_samples)
    common.time_train_steps(clock, every=spec["ppo_epochs"])
    ppo.ppo(
        versus.posttrain_config(
            spec,
            adapter="full",
            max_steps=spec["rollouts"] * spec["ppo_epochs"],
            batch_size=spec["batch_size"],
            grad_accum=spec["grad_accum"],
            num_minibatches=1,
            ppo_epochs=spec["ppo_epochs"],
            max_new_tokens=spec["response_length"],
            temperature=1.0,
            reward={"model": spec["reward"]},
            beta=spec["beta"],
            target_kl=0.0,
            kl_estimator="k1",
            kl_placement="reward",
            gamma=1.0,
            lam=0.95,
            clip_eps=0.2,
            cliprange_value=0.2,
            vf_coef=0.1,
            whiten_advantages=True,
            reward_norm=False,  # TRL's PPOTrainer does not rescale the rewards
            lr=spec["lr"],
            schedule="constant",
            warmup=0.0,
            save_every=0,
        )
    )
    return clock.result()


def worker_trl(spec: dict) -> dict:
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer

    clock = RolloutClock()
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"], padding_side="left")
    generation = ppo_trainer.batch_generation

    def counted_generation(model, queries, *args, **kwargs):
        query_responses, logits = generation(model, queries, *args, **kwargs)
        responses = query_responses[:, queries.shape[1] :]
        ended = ppo_trainer.truncate_response(tokenizer.eos_token_id, tokenizer.pad_token_id,
                                              responses)  # fmt: skip
        clock.sampled(int(ppo_trainer.first_true_indices(ended == tokenizer.pad_token_id).sum()),
                      responses.numel())  # fmt: skip
        return query_responses, logits

    ppo_trainer.batch_generation = counted_generation

    def load_scorer():
        return AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1,
                                                                  dtype="float32")  # fmt: skip

    rows = [{"input_ids": r["input_ids"]} for r in common.read_jsonl(spec["train"])]
    rollout = spec["batch_size"] * spec["grad_accum"]
    args = PPOConfig(
        **versus.trl_args(spec),
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["grad_accum"],
        num_mini_batches=1,
        num_ppo_epochs=spec["ppo_epochs"],
        total_episodes=spec["rollouts"] * rollout,
        response_length=spec["response_length"],
        stop_token="eos",
        temperature=1.0,
        missing_eos_penalty=None,
        kl_coef=spec["beta"],
        kl_estimator="k1",
        gamma=1.0,
        lam=0.95,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        whiten_rewards=False,
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        num_sample_generations=0,
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=versus.load_causal_lm(spec["model"]),
        ref_model=versus.load_causal_lm(spec["model"]),
        reward_model=load_scorer(),
        value_model=load_scorer(),
        train_dataset=datasets.Dataset.from_list(rows),
        callbacks=[versus.trl_clock(clock)],
    )
    trainer.train()
    return clock.result()


# ----------------------------------------------------------------------------- running


def trl_versions(python: str) -> str:
    code = "import common; print(common.versions('torch', 'transformers', 'trl'))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=HERE.parent)
    return out.stdout.strip() or out.stderr.strip()[-300:]


def table(results: dict[str, list[dict]]) -> str:
    headers = ["trainer", "s / rollout batch", *versus_report.versus_headers("completion tokens/s"),
               "tokens/CPU-s", "completion tokens / row", "peak RSS MiB"]  # fmt: skip
    rows = []
    for side, name in (("ours", "posttrain ppo"), ("trl", "TRL 1.12 PPOTrainer")):
        r = results[side]
        per_row = [x["tokens"] / (x["timed_steps"] * x["rollout_rows"]) for x in r]
        rows.append([
            name,
            common.median_spread([x["rollout_s"] for x in r], "{:.2f}"),
            *versus_report.versus_cells(results, side, ("tokens_per_s",)),
            common.median_spread([x["tokens_per_cpu_s"] for x in r]),
            f"{statistics.median(per_row):.1f}",
            common.median_spread([x["peak_rss_mib"] for x in r]),
        ])  # fmt: skip
    return common.markdown_table(headers, rows)


def describe(result: dict) -> str:
    """A worker's stderr progress line."""
    return f"{result['rollout_s']:.2f} s/rollout, {result['tokens_per_s']:.0f} tok/s"


def main(argv: list[str] | None = None) -> int:
    parser = versus.benchmark_parser(__doc__, "fewer rollout batches, 1 repeat")
    parser.add_argument("--trl-python", default=TRL_PYTHON, help="python of the trl 1.12 venv")
    args = versus.parse_args(parser, argv)
    if versus.run_as_worker(args, {"ours": worker_ours, "trl": worker_trl}):
        return 0
    if not Path(args.trl_python).exists():
        print(f"error: {args.trl_python} not found (see the docstring)", file=sys.stderr)
        return 2
    setup = QUICK if args.quick else Setup()
    started = time.perf_counter()
    results: dict[str, list[dict]] = {"ours": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        work = Path(tmp)
        shared = prepare(work, setup)
        env = dict(common.omp_env(setup.threads), TQDM_DISABLE="1")
        python = {"trl": args.trl_python}
        for repeat in range(setup.repeats):
            spec, sides = dict(shared, seed=repeat), versus.side_order(repeat)
            runs = versus.run_sides(
                HERE, work, str(repeat), sides, spec, env, describe, None, python
            )
            for side, r in runs.items():
                r["rollout_rows"] = setup.batch_size * setup.grad_accum
                results[side].append(r)
    s = setup
    print(f"""Machine: {common.machine()}; ours: {common.versions("torch", "transformers")};
TRL side: {trl_versions(args.trl_python)}; {s.threads} torch thread(s), fp32.
{shared["prompts"]} tiny-world arithmetic prompts; rollout batch {s.batch_size * s.grad_accum}
prompts ({s.batch_size} x grad_accum {s.grad_accum}), {s.ppo_epochs} PPO epochs, 1 minibatch,
response length {s.response_length}, {s.rollouts} rollout batches per run (first = warm-up),
{s.repeats} repeat(s), {(time.perf_counter() - started) / 60:.1f} min in all.

{table(results)}""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
