"""Shared helpers for the benchmarks: step clocks and posttrain instrumentation, subprocess
workers, memory readings, markdown cells and tables, and the README. (What they train on is
built in fixtures.py; the harness of the posttrain-vs-TRL benchmarks, sft/dpo/grpo/ppo, is in
versus.py, its report in versus_report.py.)

Every benchmark compares posttrain with a peer on the same machine in the same run. Each
trainer runs in its own fresh Python process (`run_worker`) so that its peak resident memory
(`VmHWM` from /proc/self/status, read inside the worker) is its own, imports included, and no
allocator state carries over between runs. Runs of the two sides alternate and results are
summarised as medians with their min-max spread, since the machine may be shared.

Simplified on purpose: Linux only (/proc), CPU timings only.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

README = Path(__file__).with_name("README.md")


# ----------------------------------------------------------------------------- machine


def machine() -> str:
    """One line describing the CPU, cores, memory and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return (
        f"{cpu}, {cores} cores{mem}, Linux {platform.release()}, Python {platform.python_version()}"
    )


def versions(*names: str) -> str:
    """`name x.y.z` for each importable package."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in names:
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} (missing)")
    return ", ".join(out)


def proc_status_mib(key: str) -> float:
    """A memory line of /proc/self/status (VmHWM = peak RSS, VmRSS = current RSS) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


# ----------------------------------------------------------------------------- data


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- model


# ----------------------------------------------------------------------------- measuring


class StepClock:
    """Counts the tokens each forward pass of a model sees and times optimizer steps.

    `attach(model)` hooks the input embedding: every forward (with `grad_only`, every forward
    run with gradients enabled: the policy's, not no-grad reference forwards or a reference
    precomputation) adds `(input_ids != pad).sum()` to `real` and `input_ids.numel()` to
    `padded`. `begin()` marks the start of training (RSS there); `step_end()` is called after
    each optimizer step and stores the time and the token counters, plus the peak RSS so far
    (VmHWM) so that saving and evaluating after the last step do not count. With `job_tokens`
    set, the tokens a step is credited with are the ones the posttrain job reports for it
    (`time_train_steps` adds them), not the hook's count: DPO's one-row pairs hold a prompt
    once for what two rows would hold twice, and the work both sides are credited with must be
    the same.
    """

    def __init__(self, pad_id: int, grad_only: bool = False):
        self.pad_id = pad_id
        self.grad_only = grad_only
        self.real = self.padded = 0
        self.counting = True
        self.job_tokens: int | None = None  # set to 0 to credit the job's own token counts
        self.rss_start_mib = 0.0
        self.peak_rss_mib = 0.0
        self.load_start = 0.0  # 1-minute load average of the machine when training starts
        # (wall time, process CPU time, credited tokens, real tokens, padded tokens) per step
        self.steps: list[tuple[float, float, int, int, int]] = []

    def attach(self, model) -> None:
        import torch

        def count(module, args):
            if self.counting and (not self.grad_only or torch.is_grad_enabled()):
                ids = args[0]
                self.real += int((ids != self.pad_id).sum())
                self.padded += ids.numel()

        model.get_input_embeddings().register_forward_pre_hook(count)

    def begin(self) -> None:
        if not self.rss_start_mib:
            self.rss_start_mib = proc_status_mib("VmRSS")
            self.load_start = os.getloadavg()[0]

    def step_end(self) -> None:
        credited = self.real if self.job_tokens is None else self.job_tokens
        now = (time.perf_counter(), time.process_time(), credited, self.real, self.padded)
        self.steps.append(now)
        self.peak_rss_mib = proc_status_mib("VmHWM")

    def stop(self) -> None:
        self.counting = False

    def summary(self, skip: int = 1) -> dict[str, float]:
        """Throughput over steps skip+1..N (the first `skip` steps are warm-up).

        `tokens_per_s` is the headline (tokens / wall seconds of the span); `tokens_per_cpu_s`
        divides by the process's CPU time instead and `step_tokens_per_s` is the median over
        steps of each step's own rate: both move less when other jobs share the machine.
        """
        if len(self.steps) <= skip:
            raise RuntimeError(f"need more than {skip} steps, got {len(self.steps)}")
        (t0, c0, r0, h0, p0), (t1, c1, r1, h1, p1) = self.steps[skip - 1], self.steps[-1]
        seconds = t1 - t0
        rates = [
            (b[2] - a[2]) / (b[0] - a[0]) for a, b in zip(self.steps[skip - 1 :], self.steps[skip:])
        ]
        return {
            "timed_steps": len(self.steps) - skip,
            "seconds": seconds,
            "cpu_seconds": c1 - c0,
            "tokens": r1 - r0,
            "padded_tokens": p1 - p0,
            "tokens_per_s": (r1 - r0) / seconds,
            "tokens_per_cpu_s": (r1 - r0) / (c1 - c0),
            "step_tokens_per_s": statistics.median(rates),
            "padding_share": 1 - (h1 - h0) / max(p1 - p0, 1),
            "rss_start_mib": self.rss_start_mib,
            "peak_rss_mib": self.peak_rss_mib,
            "load_start": self.load_start,
            "load_end": os.getloadavg()[0],
        }


class SampleClock(StepClock):
    """A StepClock whose tokens are sampled completion tokens (`real`: EOS included, padding
    not; `padded`: the completion slots of the sampled batches) instead of embedding-hook ones."""

    def __init__(self) -> None:
        super().__init__(pad_id=-1)

    def sampled(self, tokens: int, slots: int) -> None:
        self.real += tokens
        self.padded += slots

    def count_samples(self, sample):
        """posttrain's `rollout.sampler.sample` wrapped to count the completions it returns."""

        def counted_sample(*args, **kwargs):
            r = sample(*args, **kwargs)
            self.sampled(int(r.completion_mask.sum()), r.completion_mask.numel())
            return r

        return counted_sample


def patch_function(module: str, name: str, wrap) -> None:
    """Replace `module.name` with `wrap(original)` in every loaded posttrain module that holds
    it (`from module import name`), so the wrapper holds wherever the trainer calls it from.
    Raises when no loaded posttrain module imported it (`module` itself and the packages above
    it, which may re-export it, do not count)."""
    import importlib

    original = getattr(importlib.import_module(module), name)
    wrapped = wrap(original)
    users = 0
    for loaded in list(sys.modules.values()):
        loaded_name = getattr(loaded, "__name__", "")
        if loaded_name.startswith("posttrain") and getattr(loaded, name, None) is original:
            setattr(loaded, name, wrapped)
            users += not f"{module}.".startswith(f"{loaded_name}.")
    if not users:
        raise RuntimeError(f"{module}.{name} is not used by any loaded posttrain module")


def time_train_steps(clock: StepClock, every: int = 1) -> None:
    """Time posttrain's `Loop.train_step`: `clock.begin()` before the first, `clock.step_end()`
    after every `every`-th (PPO: the last optimizer step of a rollout batch); with
    `clock.job_tokens` set, each step's own token count is added to it first."""
    from posttrain.train import loop

    step, count = loop.Loop.train_step, [0]

    def timed_step(self):
        clock.begin()
        out = step(self)
        if clock.job_tokens is not None:
            clock.job_tokens += int(out["tokens"])
        count[0] += 1
        if count[0] % every == 0:
            clock.step_end()
        return out

    loop.Loop.train_step = timed_step


def time_posttrain_steps(method, clock: StepClock) -> list:
    """Instrument a posttrain method module (`posttrain.train.sft`, `.dpo`, ...) for timing:
    its loaded model gets `clock`'s token hook, and every `Loop.train_step` is timed. Returns
    the list the loaded model is appended to (for a held-out evaluation after training)."""
    models = []
    load = method.load_trainable_model

    def load_and_hook(cfg, tokenizer, device):
        model = load(cfg, tokenizer, device)
        clock.attach(model)
        models.append(model)
        return model

    method.load_trainable_model = load_and_hook
    time_train_steps(clock)
    return models


def pad_batch(chunk: list[dict], pad_id: int):
    """(input_ids, targets, attention_mask) tensors of `chunk` ({input_ids, targets}), right-
    padded to its longest sequence (targets -100 and mask 0 on the padding)."""
    import torch

    width = max(len(e["input_ids"]) for e in chunk)
    ids = torch.full((len(chunk), width), pad_id)
    targets = torch.full((len(chunk), width), -100)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for i, e in enumerate(chunk):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        targets[i, :n] = torch.tensor(e["targets"])
        mask[i, :n] = 1
    return ids, targets, mask


def heldout_loss(model, examples: list[dict], pad_id: int, batch_size: int = 8) -> float:
    """Mean cross-entropy over the trained tokens of `examples` ({input_ids, targets}, targets
    pre-shifted, -100 = not trained), with the model's own full logits, in eval mode."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            ids, targets, mask = pad_batch(examples[start : start + batch_size], pad_id)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
            total += float(loss)
            count += int((targets != -100).sum())
    return total / max(count, 1)


def omp_env(threads: int = 0, passive: bool = True) -> dict[str, str]:
    """OpenMP settings for a worker: `threads` > 0 sets torch's intra-op threads; `passive`
    makes idle OpenMP threads sleep instead of spinning.

    Why passive: on a small machine shared with other jobs, OpenMP's default spin-waiting makes
    every parallel region wait for a thread the kernel has descheduled; we measured 10x and
    worse slowdowns of the same run at a load average of ~2.5 on 2 cores, which then measure
    the neighbours rather than the trainer. Both sides always get the same settings.
    """
    env = {"OMP_WAIT_POLICY": "PASSIVE"} if passive else {}
    if threads > 0:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_worker(
    script: Path,
    args: list[str],
    env: dict[str, str] | None = None,
    timeout: float = 3600,
    python: str = sys.executable,
) -> dict[str, Any]:
    """Run `python script args... --result FILE` in a fresh process (with `env` added to the
    environment; `python`: another interpreter, e.g. a peer's own venv); return the JSON it
    wrote."""
    result = Path(args[args.index("--spec") + 1]).with_suffix(".result.json")
    result.unlink(missing_ok=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONHASHSEED="0",
               USE_HUB_KERNELS="NO", **(env or {}))  # fmt: skip
    cmd = [python, str(script), *args, "--result", str(result)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0 or not result.exists():
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"worker {' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return json.loads(result.read_text())


# ----------------------------------------------------------------------------- reporting


def tail_mean(values: list[float], k: int = 5) -> float:
    """Mean of the last `k` values (the loss at the end of a run)."""
    return statistics.fmean(values[-k:])


def mean_sd(values: list[float]) -> str:
    """`mean ± sd` over repeats (just the value for one)."""
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def ratio_cell(ours: list[float], theirs: list[float], higher_is_better: bool = True) -> str:
    """Ratio of medians (ours / peer), bold when higher is better, and the per-repeat ratios
    (runs of one repeat ran back to back)."""
    ratio = statistics.median(ours) / statistics.median(theirs)
    cell = f"**{ratio:.2f}x**" if higher_is_better else f"{ratio:.2f}x"
    if len(ours) == 1:
        return cell
    return cell + " (" + ", ".join(f"{o / t:.2f}" for o, t in zip(ours, theirs)) + ")"


def lora_config(spec: dict):
    """The peft LoRA config both sides use: r/alpha from the spec, no dropout, all linear."""
    from peft import LoraConfig

    return LoraConfig(
        r=spec["lora_r"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def median_spread(values: list[float], fmt: str = "{:.0f}") -> str:
    """`median (min-max)`, or just the value when there is one."""
    if len(values) == 1:
        return fmt.format(values[0])
    med = statistics.median(values)
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def update_readme(section: str, body: str, path: Path = README) -> None:
    """Replace the `## section` of the benchmarks README (or append it), keeping the others."""
    text = path.read_text() if path.exists() else ""
    header = f"## {section}"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == header), None)
    block = [header, "", *body.strip().splitlines(), ""]
    if start is None:
        lines = [*lines, "", *block] if lines else block
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        lines = lines[:start] + block + lines[end:]
    path.write_text("\n".join(lines).rstrip() + "\n")
