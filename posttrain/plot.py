"""`posttrain plot RUN_DIR [out=PNG]`: loss, learning rate and throughput curves of a run.

Reads `metrics.jsonl` and draws one panel per curve (eval metrics over the training ones).
"""

from __future__ import annotations

from pathlib import Path

from posttrain.errors import UserError
from posttrain.io import read_jsonl

PANELS = (("loss", "eval_loss"), ("lr",), ("tokens_per_s",))


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the curves of `run_dir` to `out` (default RUN_DIR/curves.png); return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (is it a posttrain run directory?)")
    records = read_jsonl(metrics_path)
    panels = [p for p in PANELS if any(k in r for r in records for k in p)]
    if not panels:
        raise UserError(f"{metrics_path}: no loss, lr or tokens_per_s records to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, keys in zip(axes[0], panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), label=key, marker="o" if len(points) < 20 else None)
        ax.set_xlabel("step")
        ax.set_title(keys[0])
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: posttrain plot RUN_DIR [out=PNG]")
        return
    out = None
    for arg in argv[1:]:
        key, _, value = arg.partition("=")
        if key != "out":
            raise UserError(f"unknown argument {arg!r}; expected out=PNG")
        out = value
    print(plot_run(argv[0], out))
