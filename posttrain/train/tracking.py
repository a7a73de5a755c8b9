"""Progress and metrics: a rich progress bar, `metrics.jsonl`, TensorBoard / W&B when asked.

`metrics.jsonl` gets one JSON object per logged step (always with `step`); on resume the
lines past the checkpoint are dropped so the file reads as one uninterrupted run.
Without a terminal (CI, pipes) a plain line per logged step replaces the bar.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from posttrain.io import append_jsonl, write_text_atomic


class Tracker:
    def __init__(self, out: Path, cfg: Any, total: int):
        self.path = out / "metrics.jsonl"
        self.cfg, self.total = cfg, total
        self.console = Console(stderr=True)
        self.live = self.console.is_terminal
        self.bar: Progress | None = None
        self.task = None
        self.writers: list[Any] = []
        self.started = time.perf_counter()
        self.last_text = ""

    def start(self, step: int, resumed: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep_until_step(self.path, step if resumed else 0)
        if resumed:
            self.console.print(f"resuming {self.path.parent} from step {step}")
        self.writers = open_writers(self.cfg, self.path.parent)
        if self.live:
            self.bar = Progress(
                TextColumn("[bold]step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[text]}"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=self.total, completed=step, text="")

    def progress(self, step: int, metrics: dict[str, float]) -> None:
        text = f"loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, text=text + self.last_text)

    def log(self, record: dict[str, float]) -> None:
        append_jsonl(self.path, record)
        if "tokens_per_s" in record:
            self.last_text = f"  {record['tokens_per_s']:.0f} tok/s"
        if not self.live:
            shown = " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step")
            print(f"step {record['step']}/{self.total} {shown}", file=sys.stderr, flush=True)
        for writer in self.writers:
            writer(record)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def keep_until_step(path: Path, step: int) -> None:
    """Drop metric lines logged after `step` (they belong to an interrupted run)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        if line.strip() and json.loads(line).get("step", 0) <= step:
            kept.append(line)
    write_text_atomic(path, "".join(k + "\n" for k in kept))


def open_writers(cfg: Any, out: Path) -> list[Any]:
    writers = []
    if "tensorboard" in cfg.report_to:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("warning: report_to=tensorboard needs `pip install tensorboard`", file=sys.stderr)
        else:
            tb = SummaryWriter(str(out / "tensorboard"))

            def write_tb(record: dict[str, float]) -> None:
                for k, v in record.items():
                    if k != "step":
                        tb.add_scalar(k, v, record["step"])
                tb.flush()

            writers.append(write_tb)
    if "wandb" in cfg.report_to:
        try:
            import wandb
        except ImportError:
            print("warning: report_to=wandb needs `pip install wandb`", file=sys.stderr)
        else:
            run = wandb.init(project="posttrain", name=out.name, config=_plain(cfg), resume="allow")
            writers.append(lambda record: run.log(record, step=int(record["step"])))
    return writers


def _plain(cfg: Any) -> dict:
    import dataclasses

    return dataclasses.asdict(cfg)
