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

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import common

HERE = Path(__file__).resolve()
BASE = HERE.parent.parent / "posttrain" / "world" / "base"
PHASES = ("generate", "reward", "reference")
TITLE = "GRPO: posttrain vs TRL GRPOTrainer (CPU)"


@dataclass
class Setup:
    """Everything both trainers share."""

    task: str = "arithmetic"  # tiny-world task kind of the prompts
    prompts_per_step: int = 4  # P; each with num_generations completions
    num_generations: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    steps: int = 24
    lr: float = 5e-4
    lora_r: int = 16
    lora_alpha: float = 32.0
    betas: tuple = (0.0, 0.04)
    repeats: int = 3
    threads: int = 0  # torch threads in the workers; 0 = torch's default (one per core)
    omp_passive: bool = True  # OMP_WAIT_POLICY=PASSIVE in the workers (see common.omp_env)


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


class PhaseClock(common.StepClock):
    """common.StepClock with completion tokens instead of embedding-hook tokens (`real` =
    completion tokens sampled, `padded` = completion slots of the sampled batches), plus
    seconds per phase (generate, reward, reference) snapshotted at each step's end."""

    def __init__(self, rows_per_step: int):
        super().__init__(pad_id=-1)
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

    def sampled(self, tokens: int, slots: int) -> None:
        self.real += tokens
        self.padded += slots

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


def finish(clock: PhaseClock, rewards: list[float], losses: list[float]) -> dict:
    import torch

    return {
        **clock.summary(skip=1),
        "rewards": rewards,
        "losses": losses,
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------- workers


def patch_function(module: str, name: str, wrap) -> None:
    """Replace `module.name` with `wrap(original)` in every loaded posttrain module that imported
    it (`from module import name`), so the wrapper holds wherever the trainer calls it from."""
    import importlib

    original = getattr(importlib.import_module(module), name)
    wrapped = wrap(original)
    patched = 0
    for loaded in list(sys.modules.values()):
        if getattr(loaded, "__name__", "").startswith("posttrain") and (
            getattr(loaded, name, None) is original
        ):
            setattr(loaded, name, wrapped)
            patched += 1
    if not patched:
        raise RuntimeError(f"{module}.{name} is not used by any loaded posttrain module")


def worker_ours(spec: dict) -> dict:
    from posttrain.train import grpo, loop

    clock = PhaseClock(spec["prompts_per_step"] * spec["num_generations"])

    def counted(sample):
        def counted_sample(*args, **kwargs):
            r = sample(*args, **kwargs)
            clock.sampled(int(r.completion_mask.sum()), r.completion_mask.numel())
            return r

        return clock.timed("generate", counted_sample)

    patch_function("posttrain.rollout.sampler", "sample", counted)
    patch_function("posttrain.rollout.rewards", "combine", lambda f: clock.timed("reward", f))
    patch_function(
        grpo.completion_logprobs.__module__,
        "completion_logprobs",
        lambda f: clock.timed("reference", f, no_grad_now),
    )
    step = loop.Loop.train_step

    def timed_step(self):
        clock.begin()
        out = step(self)
        clock.step_end()
        return out

    loop.Loop.train_step = timed_step
    out = Path(spec["out"])
    grpo.grpo(
        {
            "model": spec["model"],
            "data": {"train": spec["train"]},
            "output_dir": str(out),
            "adapter": "lora",
            "lora": {"r": spec["lora_r"], "alpha": spec["lora_alpha"], "dropout": 0.0},
            "max_steps": spec["steps"],
            "batch_size": spec["prompts_per_step"],
            "grad_accum": 1,
            "num_generations": spec["num_generations"],
            "max_new_tokens": spec["max_new_tokens"],
            "temperature": spec["temperature"],
            "reward": {"fn": ["grpo:answer_reward"]},
            "advantage": "grpo",
            "loss_aggregation": "token",
            "beta": spec["beta"],
            "clip_eps": 0.2,
            "num_iterations": 1,
            "lr": spec["lr"],
            "schedule": "constant",
            "warmup": 0.0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "seed": spec["seed"],
            "log_every": 1,
            "save_every": 0,
            "dtype": "float32",
            "attn_implementation": "sdpa",
        }
    )
    logs = [r for r in common.read_jsonl(out / "metrics.jsonl") if "loss" in r]
    return finish(clock, [r["reward_mean"] for r in logs], [r["loss"] for r in logs])


def trl_config(spec: dict):
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=spec["out"],
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
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_vllm=False,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=spec["seed"],
    )


def trl_trainer(spec: dict, model, tokenizer, rows: list[dict], callbacks: list):
    import datasets
    from peft import LoraConfig
    from trl import GRPOTrainer

    lora = LoraConfig(
        r=spec["lora_r"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return GRPOTrainer(
        model=model,
        reward_funcs=[answer_reward],
        args=trl_config(spec),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=callbacks,
    )


def worker_trl(spec: dict) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    clock = PhaseClock(spec["prompts_per_step"] * spec["num_generations"])

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
    rows = common.read_jsonl(spec["train"])
    rows = [rows[i] for i in prompt_order(len(rows), spec)]
    trainer = trl_trainer(spec, model, tokenizer, rows, [Clock()])
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
    logs = [r for r in trainer.state.log_history if "reward" in r]
    return finish(clock, [r["reward"] for r in logs], [r["loss"] for r in logs])


# ----------------------------------------------------------------------------- report


def main_table(results: dict, betas) -> str:
    headers = [
        "beta",
        "trainer",
        "s/step",
        "step tokens/s",
        "vs TRL",
        "tokens/CPU-s",
        "vs TRL",
        "rollout tokens/s",
        "vs TRL",
        "generate / reward / reference / rest (s/step)",
        "peak RSS MiB",
        "RSS at start MiB",
        "completion tokens",
        "mean reward",
    ]
    rows = []
    for beta in betas:
        runs = {side: results.get((side, beta), []) for side in ("ours", "trl")}
        if not runs["ours"] or not runs["trl"]:
            continue
        for side, name in (("ours", "posttrain"), ("trl", "TRL")):
            r = runs[side]
            cells = [common.median_spread([x["step_s"] for x in r], "{:.2f}")]
            for key in ("tokens_per_s", "tokens_per_cpu_s", "rollout_tokens_per_s"):
                mine = [x[key] for x in r]
                other = [x[key] for x in runs["trl"]]
                cells += [
                    common.median_spread(mine),
                    common.ratio_cell(mine, other) if side == "ours" else "1.00x",
                ]
            split = " / ".join(
                f"{statistics.median(x[f'{p}_s'] for x in r):.2f}" for p in (*PHASES, "other")
            )
            rows.append(
                [
                    f"{beta:g}",
                    name,
                    *cells,
                    split,
                    common.median_spread([x["peak_rss_mib"] for x in r]),
                    common.median_spread([x["rss_start_mib"] for x in r]),
                    f"{statistics.median(x['completion_length'] for x in r):.1f}",
                    f"{statistics.median(statistics.fmean(x['rewards']) for x in r):.3f}",
                ]
            )
    return common.markdown_table(headers, rows)


def curve_table(results: dict, steps: int) -> str:
    marks = sorted({1, 2, *range(4, steps + 1, 4), steps})
    rows = []
    for (side, beta), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        name = "posttrain" if side == "ours" else "TRL"
        cells = [f"{statistics.median(r['rewards'][m - 1] for r in runs):.3f}" for m in marks]
        rows.append([f"{name}, beta {beta:g}", *cells])
    return common.markdown_table(["run", *[f"step {m}" for m in marks]], rows)


def report(results: dict, parity: dict, shared: dict, command: str, elapsed: float) -> str:
    s = shared
    threads = sorted({r["threads"] for runs in results.values() for r in runs})
    loads = [r["load_start"] for runs in results.values() for r in runs]
    policy = "PASSIVE" if s["omp_passive"] else "default (spin)"
    P, G = s["prompts_per_step"], s["num_generations"]
    return f"""Command: `{command}` ({elapsed / 60:.0f} min in all, on a shared machine).

Machine: {common.machine()}; {common.versions("torch", "transformers", "peft", "trl")};
{"/".join(map(str, threads))} torch threads, OMP_WAIT_POLICY={policy}, fp32, sdpa attention.
Load average at the start of the runs: {min(loads):.1f} to {max(loads):.1f} (2.0 = both
cores busy).

Model: the tiny world's base (`posttrain/world/base`, Llama, 1.1M parameters, vocab 2048),
LoRA r={s["lora_r"]}, alpha={s["lora_alpha"]:g}, dropout 0, every linear layer but the head.
Prompts: the {parity["prompts"]} tiny-world {s["task"]} training prompts (one user message each,
{parity["prompt_tokens_mean"]:.1f} tokens on average with the chat template), in the same order on
both sides; reward 1 when the answer appears in the completion as a word. Same prompt ids:
{parity["identical_prompt_ids"]}; same EOS ids: {parity["eos_ours"] == parity["eos_trl"]}
({parity["eos_ours"]}); same prompts per step: {parity["same_prompts_per_step"]}.
Each of {s["steps"]} steps: {P} prompts x G={G} completions sampled in one batch (temperature
{s["temperature"]:g}, at most {s["max_new_tokens"]} new tokens), one forward/backward over the
{P * G} completions, one AdamW step (lr {s["lr"]:g} constant, clipping 1.0). Group-std
advantages, token-level (DAPO) loss, clip 0.2, num_iterations 1; beta 0 has no reference, beta
0.04 adds the k3 KL to the adapter-disabled model. posttrain: `batch_size={P} grad_accum=1`;
TRL: `per_device_train_batch_size={P * G}` (completions) `gradient_accumulation_steps=1`
(`generation_batch_size` {P * G}, `steps_per_generation` 1), `loss_type="dapo"`,
`optim="adamw_torch"`. {s["repeats"]} repeats per row, the sides alternating; repeat i uses seed i.

{main_table(results, s["betas"])}

- s/step: median wall time of steps 2..{s["steps"]}. step tokens/s: completion tokens sampled in
  steps 2..{s["steps"]} / their wall time (the headline); tokens/CPU-s: the same tokens / the
  worker's CPU time; rollout tokens/s: the same tokens / the generation time inside those steps.
  Median over repeats (min-max); "vs TRL": ratio of the medians (per-repeat ratios).
- generate / reward / reference / rest: mean seconds per step in sampling, the reward function
  (with each library's glue), no-grad reference log-prob forwards, and everything else (policy
  forward/backward, optimizer, decoding, advantages).
- completion tokens: mean completion length (EOS included); mean reward: over all steps.
- Peak RSS: VmHWM of the worker at the end of the last step; RSS at start: when step 1 begins.

Reward per step (mean over the step's {P * G} completions, median over repeats; sanity only,
{s["steps"]} steps are too few to read a learning curve from):

{curve_table(results, s["steps"])}
"""


# ----------------------------------------------------------------------------- main


def run_pair(shared: dict, work: Path, name: str, beta: float, seed: int, sides) -> dict:
    """Run both trainers (in the order `sides`) on one setting; returns {side: result}."""
    out = {}
    for side in sides:
        spec = dict(shared, beta=beta, seed=seed, out=str(work / f"{side}-{name}"))
        path = work / f"{side}-{name}.spec.json"
        path.write_text(json.dumps(spec))
        env = dict(common.omp_env(shared["threads"], shared["omp_passive"]), TQDM_DISABLE="1")
        result = common.run_worker(HERE, ["--worker", side, "--spec", str(path)], env)
        print(
            f"{side}-{name}: {result['step_s']:.2f} s/step, {result['tokens_per_s']:.0f} tok/s "
            f"({result['tokens_per_cpu_s']:.0f}/CPU-s), rollout "
            f"{result['rollout_tokens_per_s']:.0f} tok/s, peak RSS "
            f"{result['peak_rss_mib']:.0f} MiB, length {result['completion_length']:.1f}, reward "
            f"{statistics.fmean(result['rewards']):.3f}, load "
            f"{result['load_start']:.1f}->{result['load_end']:.1f}",
            file=sys.stderr,
            flush=True,
        )
        out[side] = result
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run")
    parser.add_argument("--beta", type=float, action="append", help="only these betas")
    parser.add_argument("--repeats", type=int, default=0, help="override the repeats")
    parser.add_argument("--steps", type=int, default=0, help="override the steps")
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
    setup.repeats = args.repeats or setup.repeats
    setup.steps = args.steps or setup.steps
    setup.betas = tuple(args.beta) if args.beta else setup.betas
    setup.threads, setup.omp_passive = args.threads, not args.omp_spin
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as tmp:
        work = Path(tmp)
        shared = prepare(work, setup)
        parity = check_parity(shared, work)
        print(json.dumps(parity), file=sys.stderr)
        same = parity["eos_ours"] == parity["eos_trl"]
        if not (parity["identical_prompt_ids"] and same and parity["same_prompts_per_step"]):
            print("error: the two sides do not sample from the same prompts", file=sys.stderr)
            return 1
        results: dict[tuple[str, float], list[dict]] = {}
        for repeat in range(setup.repeats):
            sides = ("ours", "trl") if repeat % 2 else ("trl", "ours")
            for beta in setup.betas:
                runs = run_pair(shared, work, f"beta{beta:g}-{repeat}", beta, repeat, sides)
                for side, result in runs.items():
                    results.setdefault((side, beta), []).append(result)
        flags = [
            f
            for f, on in (
                ("--quick", args.quick),
                (" ".join(f"--beta {b:g}" for b in args.beta or []), args.beta),
                (f"--repeats {args.repeats}", args.repeats),
                (f"--steps {args.steps}", args.steps),
                (f"--threads {args.threads}", args.threads),
                ("--omp-spin", args.omp_spin),
            )
            if on
        ]
        command = " ".join(["python benchmarks/grpo.py", *flags])
        text = report(results, parity, shared, command, time.perf_counter() - started)
    print(text)
    if not (args.no_readme or args.quick):
        title = TITLE if not args.threads else f"{TITLE[:-1]}, {args.threads} threads)"
        common.update_readme(title, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
