"""GRPO step time, rollout throughput and peak memory: posttrain vs TRL's `GRPOTrainer` + LoRA.

    python benchmarks/grpo.py           # the full run (~8 min); rewrites its README section
    python benchmarks/grpo.py --quick   # a smoke run (~2 min), writes nothing

What is the same on both sides:
- the model: the tiny world's shipped base (`posttrain/world/base`, a 1.1M-parameter Llama with
  a ChatML template), loaded in fp32 with sdpa attention; LoRA r 16, alpha 32, dropout 0 on every
  linear layer but the head (`all-linear`); AdamW (TRL: `optim="adamw_torch"`, the same
  non-fused torch AdamW posttrain uses; TRL's default on torch >= 2.8 is the fused one), constant
  lr, no warm-up, no weight decay, clipping at 1.0; fp32 (`bf16=False`), no gradient
  checkpointing (TRL's default is on), no vLLM;
- the prompts: the tiny world's arithmetic training prompts (`build_world_data()["prompts_train"]`,
  task "arithmetic"), each as one user message, rendered by the model's chat template with the
  generation prompt on both sides; TRL reads them in posttrain's prompt order
  (`shuffle_dataset=False` over the reordered dataset), so step k sees the same prompts on both
  sides. Before anything is timed the script checks that both tokenise the prompts to the same
  ids, stop at the same EOS ids, and serve the same prompts per step;
- the reward: one function, `answer_reward` below, passed to both (posttrain: `reward.fn:
  [grpo:answer_reward]`; TRL: `reward_funcs=[answer_reward]`): 1 when the row's answer appears in
  the completion as a whole word, else 0. (The base model answers "The answer is 6." rather than
  "6", so exact match would be 0 everywhere and every group would have zero variance.);
- sampling: G = 8 completions per prompt, temperature 1, no top-k / top-p, at most
  `max_new_tokens` new tokens, stop at EOS (`<|im_end|>` or `<|endoftext|>`);
- the objective: group advantages (r - mean) / (std + 1e-4) (posttrain `advantage=grpo`, TRL
  `scale_rewards="group"`), the clipped token-level loss with eps 0.2, summed over the step's
  completion tokens / their count (posttrain `loss_aggregation=token`, TRL `loss_type="dapo"`, its
  default), num_iterations 1, beta 0 (no reference) or beta 0.04 (k3 KL to the reference = the
  model with its adapter disabled, one extra no-grad forward per step on both sides).

How one optimizer step maps (both sample once, then do one forward/backward, then step):
- posttrain: `batch_size` = P prompts per micro-batch, `grad_accum` 1, so one sampler call of
  P x G rows and one micro-batch of P x G completions per step;
- TRL: `per_device_train_batch_size` counts completions, so it is P x G; `gradient_accumulation_
  steps` 1; `steps_per_generation` defaults to grad_accum (1) and `generation_batch_size` to
  per_device x steps_per_generation = P x G, so TRL also generates the P x G completions of a step
  in one `generate` call. Since generation is aligned with the optimizer step and num_iterations is
  1, TRL skips its "old log-probs" forward (ratio = 1 on both sides; posttrain takes the old
  log-probs from the sampler).

What is timed: each run is a fresh process. A hook at the end of every optimizer step
(posttrain: around `Loop.train_step`; TRL: `on_step_end`) takes the time; the span of steps
2..N (step 1 is warm-up) holds everything a step does (sampling, decoding, reward, advantages,
reference forward, policy forward/backward, clipping, optimizer) but not logging, saving, model
loading or imports. Inside the steps, wrappers time the phases the same way on both sides:
generation (posttrain `rollout.sampler.sample`; TRL `_generate_single_turn`, i.e. HF
`generate` plus its EOS masking), reward (posttrain `rewards.combine`; TRL `_calculate_rewards`)
and reference (no-grad log-prob forwards: posttrain `completion_logprobs` under no_grad, TRL
`_get_per_token_logps_and_entropies` under no_grad); the rest of the step is the policy update and
glue. The generation wrappers count completion tokens (EOS included, padding not).
- step throughput = completion tokens sampled in steps 2..N / wall time of steps 2..N; the
  headline, since a GRPO step's cost follows the tokens it samples and trains on; the same over
  the process's CPU time is also reported (moves less when the machine is shared);
- rollout throughput = the same tokens / the generation seconds inside those steps;
- completion lengths differ between runs (sampling is random and the two libraries draw
  differently), so throughput is per token and the mean completion length is reported.

Peak memory: the worker's VmHWM at the end of the last step (imports, data, model, training).
Reward curve: the mean reward of each step's completions, median over repeats, for sanity only.

Simplified on purpose: one model size (the tiny world's base; per-token overhead weighs more here
than on a large model), one prompts-per-step setting, LoRA only; the two sides cannot sample the
same completions, so there is no step-by-step loss parity check (the SFT and DPO benchmarks have
one).
"""

from __future__ import annotations

import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import common
import versus
import versus_report
from grpo_report import PHASES, report

HERE = Path(__file__).resolve()
BASE = HERE.parent.parent / "posttrain" / "world" / "base"
TITLE = "GRPO: posttrain vs TRL GRPOTrainer (CPU)"


@dataclass
class Setup(versus.SharedSetup):
    """Everything both trainers share."""

    task: str = "arithmetic"  # tiny-world task kind of the prompts
    prompts_per_step: int = 4  # P; each with num_generations completions
    num_generations: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    steps: int = 24
    lr: float = 5e-4
    betas: tuple = (0.0, 0.04)
    repeats: int = 3


QUICK = Setup(steps=4, repeats=1)


# ----------------------------------------------------------------------------- the reward


def completion_text(completion) -> str:
    """TRL hands conversational completions as [{"role": "assistant", "content": ...}]."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def answer_reward(prompts: list, completions: list, answer: list, **_) -> list[float]:
    """1.0 when the row's answer appears in the completion as a whole word, else 0.0."""
    out = []
    for completion, expected in zip(completions, answer):
        pattern = r"(?<!\w)" + re.escape(str(expected).lower()) + r"(?!\w)"
        out.append(float(re.search(pattern, completion_text(completion).lower()) is not None))
    return out


# ----------------------------------------------------------------------------- preparation


def prepare(work: Path, setup: Setup) -> dict:
    """The prompts file under `work`; returns the shared part of a worker spec."""
    from posttrain.world.datasets import build_world_data

    rows = [
        {"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
        for r in build_world_data()["prompts_train"]
        if r["task"] == setup.task
    ]
    common.write_jsonl(work / "prompts.jsonl", rows)
    return {"model": str(BASE), "train": str(work / "prompts.jsonl"), **asdict(setup)}


def prompt_order(n_prompts: int, spec: dict) -> list[int]:
    """Prompt indices in the order posttrain's rollout plan takes them (epochs 0, 1, ...)."""
    from posttrain.train.grpo import plan_rollouts

    plan_cfg = SimpleNamespace(
        seed=spec["seed"], batch_size=spec["prompts_per_step"], grad_accum=1, num_iterations=1
    )
    order: list[int] = []
    epoch = 0
    while len(order) < spec["steps"] * spec["prompts_per_step"]:
        order += [i for s in plan_rollouts(n_prompts, plan_cfg, 1, epoch) for i in s.indices]
        epoch += 1
    return order


def check_parity(shared: dict, work: Path) -> dict:
    """Both sides' prompt ids, EOS ids and per-step prompts must agree before timing."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.evaluate.generate import stop_token_ids
    from posttrain.rollout.sampler import encode_prompts

    rows = common.read_jsonl(shared["train"])
    tokenizer = AutoTokenizer.from_pretrained(shared["model"])
    ours = encode_prompts(tokenizer, [r["prompt"] for r in rows], chat=True)
    spec = dict(shared, seed=0, beta=0.0, out=str(work / "parity"))
    order = prompt_order(len(rows), spec)
    datasets.disable_progress_bars()
    model = AutoModelForCausalLM.from_pretrained(shared["model"], dtype="float32")
    trainer = trl_trainer(spec, model, tokenizer, [rows[i] for i in order], [])
    theirs, _, _ = trainer._tokenize_prompts([r["prompt"] for r in rows])
    P, G = shared["prompts_per_step"], shared["num_generations"]
    served = []  # whether TRL's first steps get posttrain's prompts, each G times
    for step, batch in zip(range(3), trainer.get_train_dataloader()):
        expected = [row_key(rows[order[step * P + j // G]]) for j in range(P * G)]
        served.append(expected == [row_key(x) for x in batch])
    return {
        "prompts": len(rows),
        "prompt_tokens_mean": statistics.fmean(len(ids) for ids in ours),
        "identical_prompt_ids": [list(ids) for ids in theirs] == ours,
        "eos_ours": stop_token_ids(tokenizer),
        "eos_trl": list(trainer.eos_token_ids),
        "same_prompts_per_step": all(served),
    }


def row_key(row: dict) -> tuple[str, str]:
    """What identifies a prompt row (the same text may appear in more than one row)."""
    return row["prompt"][0]["content"], row["answer"]


# ----------------------------------------------------------------------------- measuring


class PhaseClock(common.SampleClock):
    """common.SampleClock (completion tokens instead of embedding-hook tokens) plus seconds per
    phase (generate, reward, reference) snapshotted at each step's end."""

    def __init__(self, rows_per_step: int):
        super().__init__()
        self.rows_per_step = rows_per_step  # completions sampled per step
        self.phases = dict.fromkeys(PHASES, 0.0)
        self.phase_steps: list[dict[str, float]] = []

    def timed(self, phase: str, fn, when=lambda: True):
        """`fn` wrapped so that its calls (those where `when()` holds) add to `phase`."""

        def wrapper(*args, **kwargs):
            if not when():
                return fn(*args, **kwargs)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.phases[phase] += time.perf_counter() - start
            return out

        return wrapper

    def step_end(self) -> None:
        super().step_end()
        self.phase_steps.append(dict(self.phases))

    def summary(self, skip: int = 1) -> dict[str, float]:
        out = super().summary(skip)
        first, last = self.phase_steps[skip - 1], self.phase_steps[-1]
        steps = out["timed_steps"]
        durations = [b[0] - a[0] for a, b in zip(self.steps[skip - 1 :], self.steps[skip:])]
        out["step_s"] = statistics.median(durations)
        for phase in PHASES:
            out[f"{phase}_s"] = (last[phase] - first[phase]) / steps
        out["other_s"] = out["seconds"] / steps - sum(out[f"{p}_s"] for p in PHASES)
        out["rollout_tokens_per_s"] = out["tokens"] / max(
            last["generate"] - first["generate"], 1e-9
        )
        out["completion_length"] = out["tokens"] / (steps * self.rows_per_step)
        return out


def no_grad_now() -> bool:
    import torch

    return not torch.is_grad_enabled()


def finish(clock: PhaseClock, logs: list[dict], reward_key: str) -> dict:
    """The worker's result: timings, phases, memory, and per-step reward and loss."""
    return versus.worker_result(clock, logs, {"rewards": reward_key, "losses": "loss"})


# ----------------------------------------------------------------------------- workers


def worker_ours(spec: dict) -> dict:
    from posttrain.train import grpo

    clock = PhaseClock(spec["prompts_per_step"] * spec["num_generations"])

    def counted(sample):
        return clock.timed("generate", clock.count_samples(sample))

    common.patch_function("posttrain.rollout.sampler", "sample", counted)
    common.patch_function(
        "posttrain.rollout.rewards", "combine", lambda f: clock.timed("reward", f)
    )
    common.patch_function(
        grpo.completion_logprobs.__module__,
        "completion_logprobs",
        lambda f: clock.timed("reference", f, no_grad_now),
    )
    common.time_train_steps(clock)
    grpo.grpo(
        versus.posttrain_config(
            spec,
            adapter="lora",
            lora=versus.posttrain_lora(spec),
            max_steps=spec["steps"],
            batch_size=spec["prompts_per_step"],
            grad_accum=1,
            num_generations=spec["num_generations"],
            max_new_tokens=spec["max_new_tokens"],
            temperature=spec["temperature"],
            reward={"fn": ["grpo:answer_reward"]},
            advantage="grpo",
            loss_aggregation="token",
            beta=spec["beta"],
            clip_eps=0.2,
            num_iterations=1,
            lr=spec["lr"],
            schedule="constant",
            warmup=0.0,
            save_every=0,
        )
    )
    return finish(clock, versus.posttrain_logs(spec["out"]), "reward_mean")


def trl_config(spec: dict):
    from trl import GRPOConfig

    return GRPOConfig(
        **versus.trl_args(spec),
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["prompts_per_step"] * spec["num_generations"],
        gradient_accumulation_steps=1,
        num_generations=spec["num_generations"],
        max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"],
        top_p=1.0,
        top_k=0,
        beta=spec["beta"],
        num_iterations=1,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        mask_truncated_completions=False,
        shuffle_dataset=False,  # the dataset comes in posttrain's prompt order
        learning_rate=spec["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch",
        use_vllm=False,
    )


def trl_trainer(spec: dict, model, tokenizer, rows: list[dict], callbacks: list):
    from trl import GRPOTrainer

    lora = common.lora_config(spec)
    return versus.trl_trainer(
        GRPOTrainer,
        model,
        trl_config(spec),
        rows,
        tokenizer,
        lora,
        reward_funcs=[answer_reward],
        callbacks=callbacks,
    )


def worker_trl(spec: dict) -> dict:
    clock = PhaseClock(spec["prompts_per_step"] * spec["num_generations"])
    tokenizer, model = versus.trl_inputs(spec)
    rows = common.read_jsonl(spec["train"])
    rows = [rows[i] for i in prompt_order(len(rows), spec)]
    trainer = trl_trainer(spec, model, tokenizer, rows, [versus.trl_clock(clock)])
    generate = trainer._generate_single_turn

    def counted_generate(*args, **kwargs):
        completion_ids, logprobs = generate(*args, **kwargs)
        lengths = [len(ids) for ids in completion_ids]
        clock.sampled(sum(lengths), len(lengths) * max(lengths))
        return completion_ids, logprobs

    trainer._generate_single_turn = clock.timed("generate", counted_generate)
    trainer._calculate_rewards = clock.timed("reward", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = clock.timed(
        "reference", trainer._get_per_token_logps_and_entropies, no_grad_now
    )
    trainer.train()
    return finish(clock, versus.logged(trainer.state.log_history, "reward"), "reward")


# ----------------------------------------------------------------------------- main


def run_pair(shared: dict, work: Path, name: str, beta: float, seed: int, sides) -> dict:
    """Run both trainers (in the order `sides`) on one setting; returns {side: result}."""
    spec = dict(shared, beta=beta, seed=seed)
    env = versus.worker_env(shared, TQDM_DISABLE="1")
    return versus.run_sides(HERE, work, name, sides, spec, env, describe)


def describe(result: dict) -> str:
    """A worker's stderr progress line."""
    return (
        f"{result['step_s']:.2f} s/step, {result['tokens_per_s']:.0f} tok/s "
        f"({result['tokens_per_cpu_s']:.0f}/CPU-s), rollout "
        f"{result['rollout_tokens_per_s']:.0f} tok/s, peak RSS "
        f"{result['peak_rss_mib']:.0f} MiB, length {result['completion_length']:.1f}, reward "
        f"{statistics.fmean(result['rewards']):.3f}, {versus_report.load_text(result)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = versus.benchmark_parser(__doc__)
    parser.add_argument("--beta", type=float, action="append", help="only these betas")
    versus.add_run_options(parser, steps=True)
    args = versus.parse_args(parser, argv)
    if versus.run_as_worker(args, {"ours": worker_ours, "trl": worker_trl}):
        return 0

    setup = versus.apply_run_options(QUICK if args.quick else Setup(), args)
    setup.steps = args.steps or setup.steps
    setup.betas = tuple(args.beta) if args.beta else setup.betas
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        work = Path(tmp)
        shared = prepare(work, setup)
        parity = check_parity(shared, work)
        same_eos = parity["eos_ours"] == parity["eos_trl"]
        checks = [parity["identical_prompt_ids"], same_eos, parity["same_prompts_per_step"]]
        if not versus.parity_holds(parity, checks, "sample from the same prompts"):
            return 1

        def run(repeat: int, beta: float, sides) -> dict:
            return run_pair(shared, work, f"beta{beta:g}-{repeat}", beta, repeat, sides)

        results = versus.run_repeats(setup.repeats, setup.betas, run)
        command = versus.command_line(
            "grpo.py",
            args,
            (" ".join(f"--beta {b:g}" for b in args.beta or []), args.beta),
            (f"--repeats {args.repeats}", args.repeats),
            (f"--steps {args.steps}", args.steps),
        )
        text = report(results, parity, shared, command, time.perf_counter() - started)
    print(text)
    if not (args.no_readme or args.quick):
        title = TITLE if not args.threads else f"{TITLE[:-1]}, {args.threads} threads)"
        common.update_readme(title, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
