"""`posttrain world data OUT_DIR [overwrite=true] [seed=N]` and `posttrain world pretrain ...`."""

from __future__ import annotations

from dataclasses import dataclass

from posttrain.config import help_text, opt, positional_config
from posttrain.errors import UserError

USAGE = (
    "usage: posttrain world data OUT_DIR [overwrite=true] [seed=N]\n"
    "       posttrain world pretrain [output_dir=DIR] [key=value ...]  (--help lists the keys)"
)


@dataclass
class DataConfig:
    """`posttrain world data`: where the task datasets go."""

    out_dir: str = opt("", "folder for the JSONL files (positional)")
    seed: int = opt(0, "item split and sampling seed")
    overwrite: bool = opt(False, "write into a non-empty folder")


def write_data(argv: list[str]) -> None:
    from posttrain.world.datasets import write_world_data

    if "-h" in argv or "--help" in argv:
        print(help_text(DataConfig, "world data OUT_DIR"))
        return
    cfg = positional_config(DataConfig, argv, key="out_dir")
    if not cfg.out_dir:
        raise UserError(f"world data needs OUT_DIR; {USAGE.splitlines()[0]}")
    paths = write_world_data(cfg.out_dir, seed=cfg.seed, overwrite=cfg.overwrite)
    print(f"wrote {len(paths)} files to {cfg.out_dir}")


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    if argv[0] == "data":
        write_data(argv[1:])
    elif argv[0] == "pretrain":
        from posttrain.world.pretrain import main as pretrain_main

        pretrain_main(argv[1:])
    else:
        raise UserError(f"unknown world command {argv[0]!r}\n{USAGE}")
