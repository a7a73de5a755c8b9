"""What every training command does around its method: check the run directory, load the
model and adapter, write the effective config, run the loop, write `final/`.

Order matters for "nothing half-written by a failed start": config, data and model are all
loaded and checked before anything is created in `output_dir`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from pathlib import Path

import torch
import yaml

from posttrain.config import TrainConfig, dump_yaml
from posttrain.errors import UserError
from posttrain.io import write_text_atomic
from posttrain.modeling.adapters import apply_adapter, trainable_summary
from posttrain.modeling.load import load_model
from posttrain.train import checkpoint, dist
from posttrain.train.loop import Job, Loop

# Keys that change what is logged, evaluated or kept, or which engine samples (online RL), never
# what is trained or how: a resume may change them.
RESUME_MAY_CHANGE = frozenset(
    ("output_dir", "log_every", "eval_every", "save_every", "keep_checkpoints", "report_to",
     "offline", "data.eval", "data.eval_split", "gradient_checkpointing", "engine",
     "vllm_gpu_memory")
)  # fmt: skip


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse a non-empty folder that is not one of our runs (we would mix files into it), and a
    run with checkpoints started under other settings (resuming would silently mix the two)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.yaml").is_file():
        raise UserError(f"output_dir {out} is not empty and is not a posttrain run; choose another")
    if checkpoint.latest(out) is not None and (out / "config.yaml").is_file():
        check_same_settings(cfg, out / "config.yaml")


def check_same_settings(cfg: TrainConfig, saved: Path) -> None:
    """Refuse, naming the first key, when the run's config.yaml differs from `cfg` outside
    RESUME_MAY_CHANGE; keys the saved file lacks (an older posttrain) are not compared."""
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{saved}: not valid YAML ({str(exc).splitlines()[0]}); "
                        "restore it or choose another output_dir") from None  # fmt: skip
    if not isinstance(old, dict):
        raise UserError(f"{saved}: not a mapping of settings; restore it or choose another "
                        "output_dir")  # fmt: skip
    first = next(differences(cfg, old, yaml.safe_load(dump_yaml(cfg))), None)
    if first:
        key, was, now = first
        raise UserError(
            f"output_dir {saved.parent} was started with {key}={was!r}, not {now!r}; "
            "re-run with its settings to resume, or choose another output_dir"
        )


def differences(cfg, old: dict, new: dict, prefix: str = ""):
    """(dotted key, saved value, new value) for each differing field; sections (nested config
    dataclasses) are compared field by field, any other value (a dict knob too) as a whole."""
    for f in fields(cfg):
        key = prefix + f.name
        if f.name not in old or key in RESUME_MAY_CHANGE:
            continue
        if is_dataclass(getattr(cfg, f.name)) and isinstance(old[f.name] or {}, dict):
            yield from differences(getattr(cfg, f.name), old[f.name] or {}, new[f.name], key + ".")
        elif old[f.name] != new[f.name]:
            yield key, old[f.name], new[f.name]


def begin_run(cfg: TrainConfig):
    """Common opening of every training command: check output_dir, init ranks, seed, tokenizer.

    Returns (device, tokenizer); the tokenizer has a pad token and `cfg.chat_template` applied.
    """
    from posttrain.data.chat import ensure_chat_template
    from posttrain.modeling.load import load_tokenizer
    from posttrain.train.loop import seed_everything

    check_output_dir(cfg)
    device = dist.init()
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    if cfg.chat_template:
        ensure_chat_template(tokenizer, cfg.chat_template)
    return device, tokenizer


def load_splits(cfg: TrainConfig, load: Callable) -> tuple[list, list]:
    """(train, eval) examples via `load(source, split, label)`; eval is [] without data.eval."""
    train = load(cfg.data.train, cfg.data.split, "train")
    evals = load(cfg.data.eval, cfg.data.eval_split, "eval") if cfg.data.eval else []
    return train, evals


def load_trainable_model(cfg: TrainConfig, tokenizer, device: torch.device) -> torch.nn.Module:
    """Base model + adapter, on `device`, with the trainable share printed."""
    model = load_model(cfg, tokenizer)
    if not getattr(model, "is_loaded_in_4bit", False):
        model.to(device)
    model = apply_adapter(model, cfg, tokenizer)
    if dist.is_main():
        print(trainable_summary(model), file=sys.stderr)
    return model


def run_job(job: Job, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Write the config, train (resuming if a checkpoint exists), write `final/`."""
    out = Path(cfg.output_dir)
    loop = Loop(job, cfg, device)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", dump_yaml(cfg))
    dist.barrier()
    metrics = loop.run()
    loop.finish()
    if dist.is_main():
        print(f"done: {out / 'final'}", file=sys.stderr)
    return metrics
