"""The GRPO benchmark's report (`grpo.py`): the main table, the reward curve, the text around."""

from __future__ import annotations

import statistics

import common
import versus_report

PHASES = ("generate", "reward", "reference")  # timed inside each step, on both sides


def main_table(results: dict, betas) -> str:
    headers = [
        "beta",
        "trainer",
        "s/step",
        *versus_report.versus_headers("step tokens/s", "tokens/CPU-s", "rollout tokens/s"),
        "generate / reward / reference / rest (s/step)",
        "peak RSS MiB",
        "RSS at start MiB",
        "completion tokens",
        "mean reward",
    ]
    keys = ("tokens_per_s", "tokens_per_cpu_s", "rollout_tokens_per_s")
    rows = []
    for beta, side, name, runs in versus_report.side_rows(results, betas):
        r = runs[side]
        split = " / ".join(
            f"{statistics.median(x[f'{p}_s'] for x in r):.2f}" for p in (*PHASES, "other")
        )
        rows.append([
            f"{beta:g}",
            name,
            common.median_spread([x["step_s"] for x in r], "{:.2f}"),
            *versus_report.versus_cells(runs, side, keys),
            split,
            common.median_spread([x["peak_rss_mib"] for x in r]),
            common.median_spread([x["rss_start_mib"] for x in r]),
            f"{statistics.median(x['completion_length'] for x in r):.1f}",
            f"{statistics.median(statistics.fmean(x['rewards']) for x in r):.3f}",
        ])  # fmt: skip
    return common.markdown_table(headers, rows)


def curve_table(results: dict, betas, steps: int) -> str:
    marks = sorted({1, 2, *range(4, steps + 1, 4), steps})
    rows = versus_report.curve_rows(results, sorted(set(betas)), lambda beta: f"beta {beta:g}")
    return versus_report.curve_table(rows, marks, "rewards", 3)


def report(results: dict, parity: dict, shared: dict, command: str, elapsed: float) -> str:
    s = shared
    P, G = s["prompts_per_step"], s["num_generations"]
    return f"""{versus_report.report_header(results, s, command, elapsed)}

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

{curve_table(results, s["betas"], s["steps"])}
"""
