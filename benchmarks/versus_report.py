"""The report side of the posttrain-vs-TRL benchmarks (sft, dpo, grpo, ppo): its first lines
(`report_header`), the main table's rows and ratio cells (`side_rows`, `versus_headers`,
`versus_cells`, `padding_cell`), speed and load lines (`speed_text`, `load_text`), the loss or
reward curves (`curve_rows`, `curve_table`) and the same-curve pairs' lines (`both`,
`loss_gap_text`, `lr_and_heldout_text`). The harness that runs them is versus.py.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import common
from versus import SIDES


def speed_text(result: dict) -> str:
    """`N tok/s (M/CPU-s), peak RSS R MiB` of a worker's result."""
    return (
        f"{result['tokens_per_s']:.0f} tok/s ({result['tokens_per_cpu_s']:.0f}/CPU-s), "
        f"peak RSS {result['peak_rss_mib']:.0f} MiB"
    )


def load_text(result: dict) -> str:
    """`load A->B`: the machine's load average when the worker's training began and ended."""
    return f"load {result['load_start']:.1f}->{result['load_end']:.1f}"


# ----------------------------------------------------------------------------- report


def report_header(results: dict, shared: dict, command: str, elapsed: float) -> str:
    """The first lines of a report: the command, the machine and versions, threads, OpenMP
    policy and the load average at the start of the runs."""
    threads = sorted({r["threads"] for runs in results.values() for r in runs})
    loads = [r["load_start"] for runs in results.values() for r in runs]
    policy = "PASSIVE" if shared["omp_passive"] else "default (spin)"
    return f"""Command: `{command}` ({elapsed / 60:.0f} min in all, on a shared machine).

Machine: {common.machine()}; {common.versions("torch", "transformers", "peft", "trl")};
{"/".join(map(str, threads))} torch threads, OMP_WAIT_POLICY={policy}, fp32, sdpa attention,
USE_HUB_KERNELS=NO on both sides (transformers' hub kernels off, as posttrain sets by default).
Load average at the start of the runs: {min(loads):.1f} to {max(loads):.1f} (2.0 = both
cores busy)."""


def side_rows(results: dict, settings: Iterable) -> Iterator[tuple[Any, str, str, dict]]:
    """(setting, side, the side's name, {side: runs}) per main-table row: for each setting in
    order where both sides have runs (`results` is keyed by (side, setting)), posttrain first."""
    for setting in settings:
        runs = {side: results.get((side, setting), []) for side, _ in SIDES}
        if runs["ours"] and runs["trl"]:
            for side, name in SIDES:
                yield setting, side, name, runs


def versus_headers(*names: str) -> list[str]:
    """The headers of `versus_cells`' columns: each name, then `vs TRL`."""
    return [header for name in names for header in (name, "vs TRL")]


def versus_cells(runs: dict[str, list[dict]], side: str, keys: Iterable[str]) -> list[str]:
    """Per key: the side's median (min-max) and its ratio to TRL's (TRL's own row: 1.00x);
    a lower `peak_rss_mib` is better, so its ratio is not in bold."""
    cells = []
    for key in keys:
        mine = [x[key] for x in runs[side]]
        ratio = common.ratio_cell(mine, [x[key] for x in runs["trl"]], key != "peak_rss_mib")
        cells += [common.median_spread(mine), ratio if side == "ours" else "1.00x"]
    return cells


def padding_cell(runs: list[dict]) -> str:
    """The median share of padded positions, in percent."""
    return f"{100 * statistics.median(x['padding_share'] for x in runs):.1f}%"


def curve_rows(
    results: dict, settings: Iterable, label: Callable[[Any], str]
) -> list[tuple[str, list[dict]]]:
    """(`NAME, label(setting)`, runs) for each setting in order and each side with runs,
    posttrain first."""
    return [
        (f"{name}, {label(setting)}", results[(side, setting)])
        for setting in settings
        for side, name in SIDES
        if results.get((side, setting))
    ]


def curve_table(rows: list[tuple[str, list[dict]]], marks: list[int], key: str, digits: int) -> str:
    """A row per (label, runs): the median over the runs of `run[key][step - 1]` per mark."""
    body = [
        [label, *[f"{statistics.median(r[key][m - 1] for r in runs):.{digits}f}" for m in marks]]
        for label, runs in rows
    ]
    return common.markdown_table(["run", *[f"step {m}" for m in marks]], body)


def both(pair: dict, key: str, index: int, digits: int = 4) -> str:
    """`OURS vs TRL`: `result[key][index]` of each side of a same-curve pair."""
    ours, trl = pair["ours"][key][index], pair["trl"][key][index]
    return f"{ours:.{digits}f} vs {trl:.{digits}f}"


def loss_gap_text(pair: dict) -> str:
    """`max |loss difference| over the N steps D` of a same-curve pair."""
    ours, trl = pair["ours"]["losses"], pair["trl"]["losses"]
    diffs = [abs(a - b) for a, b in zip(ours, trl)]
    return f"max |loss difference| over the {len(diffs)} steps {max(diffs):.2e}"


def lr_and_heldout_text(pair: dict) -> str:
    """`max |lr difference| D; held-out loss OURS vs TRL` of a same-curve pair."""
    ours, trl = pair["ours"], pair["trl"]
    lr_diff = max(abs(a - b) for a, b in zip(ours["lrs"], trl["lrs"]))
    held = f"{ours['heldout_loss']:.4f} vs {trl['heldout_loss']:.4f}"
    return f"max |lr difference| {lr_diff:.1e}; held-out loss {held}"
