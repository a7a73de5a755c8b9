"""Typed configs: dataclasses, YAML files plus dotted `key=value` overrides, validation.

Every command has one dataclass. Fields are declared with `opt(default, doc)` so that
`posttrain <command> --help` can list each key with its doc and default. Nested sections
are dataclasses too (`lora.r=16`). Unknown keys fail with a "did you mean" suggestion;
values are coerced to the field's type and errors name the key.

Simplified on purpose: no config inheritance, no interpolation, no environment lookups.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from posttrain.errors import UserError

T = TypeVar("T")

ADAPTERS = (
    "full",
    "lora",
    "rslora",
    "dora",
    "lokr",
    "loha",
    "ia3",
    "prefix",
    "prompt",
    "trainable_tokens",
    "top_layers",
    "bitfit",
    "qlora",
)


def opt(default: Any, doc: str) -> Any:
    """A config field with a default and a one-line doc (lists/dicts are copied per instance)."""
    if isinstance(default, (list, dict)) or is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


# ----------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    train: str = opt("", "training data: a .jsonl/.json/.csv/.parquet file or a HF dataset name")
    eval: str = opt("", "evaluation data (same forms); empty = no eval")
    format: str = opt("auto", "row format: auto, text, prompt_completion, alpaca, messages")
    split: str = opt("train", "split to use when `train` is a HF dataset name")
    eval_split: str = opt("test", "split to use when `eval` is a HF dataset name")


@dataclass
class LoraConfig:
    r: int = opt(16, "adapter rank (lora, rslora, dora, qlora, lokr, loha)")
    alpha: float = opt(
        32.0, "scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) for rslora)"
    )
    dropout: float = opt(0.0, "dropout on the adapter input")
    target_modules: list = opt(
        ["all-linear"],
        "modules to adapt, passed to peft ('all-linear' = every linear layer but the head)",
    )


@dataclass
class TrainConfig:
    """Keys shared by every training command (same name, same meaning)."""

    model: str = opt("", "base model: a local folder or a hub id")
    data: DataConfig = opt(DataConfig(), "data sources")
    output_dir: str = opt("runs/latest", "run directory (re-running on it resumes)")
    adapter: str = opt("lora", "what to train: " + ", ".join(ADAPTERS))
    lora: LoraConfig = opt(LoraConfig(), "LoRA-family settings")
    adapter_args: dict = opt(
        {}, "extra keyword arguments for the peft config (e.g. num_virtual_tokens)"
    )
    top_layers: int = opt(2, "blocks trained when adapter=top_layers (the last K)")
    new_tokens: list = opt(
        [], "tokens added to the tokenizer; adapter=trainable_tokens trains their embeddings"
    )
    chat_template: str = opt("", "'chatml' to use ChatML when the tokenizer has no chat template")
    max_steps: int = opt(0, "optimizer steps; 0 = derive from epochs")
    epochs: float = opt(1.0, "passes over the training data (used when max_steps=0)")
    batch_size: int = opt(8, "sequences (or packed rows) per micro-batch per device")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(2e-4, "peak learning rate")
    schedule: str = opt("cosine", "learning-rate schedule: cosine, linear, constant")
    warmup: float = opt(0.03, "warm-up: a fraction of the steps if < 1, else a step count")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float = opt(1.0, "gradient clipping norm; 0 = off")
    max_length: int = opt(1024, "tokens per example (longer ones are truncated and counted)")
    packing: bool = opt(
        False, "pack examples into rows of max_length (they cannot attend to each other)"
    )
    seed: int = opt(42, "random seed (data order, dropout, init)")
    log_every: int = opt(10, "steps between metric lines")
    eval_every: int = opt(0, "steps between evaluations; 0 = only at the end")
    save_every: int = opt(0, "steps between checkpoints; 0 = only at the end")
    keep_checkpoints: int = opt(2, "newest checkpoints kept")
    report_to: list = opt([], "extra loggers: tensorboard, wandb")
    dtype: str = opt(
        "auto", "weights dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16"
    )
    attn_implementation: str = opt("auto", "attention: auto, sdpa, eager, flash_attention_2")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    fsdp: bool = opt(False, "shard the model with FSDP2 (fully_shard) under torchrun")
    offline: bool = opt(False, "never reach a hub (local_files_only)")
    trust_remote_code: bool = opt(False, "allow code from the model repo to run")
    revision: str = opt("", "hub revision (branch, tag or commit)")

    def validate(self) -> None:
        """Raise UserError naming the first bad key."""
        check(bool(self.model), "model", "is required (a local folder or hub id)")
        check(bool(self.data.train), "data.train", "is required (a data file or dataset name)")
        check(
            self.adapter in ADAPTERS,
            "adapter",
            f"must be one of {', '.join(ADAPTERS)}, got {self.adapter!r}",
        )
        check(self.lora.r > 0, "lora.r", f"must be > 0, got {self.lora.r}")
        check(self.lora.alpha > 0, "lora.alpha", f"must be > 0, got {self.lora.alpha}")
        check(
            0 <= self.lora.dropout < 1,
            "lora.dropout",
            f"must be in [0, 1), got {self.lora.dropout}",
        )
        check(self.top_layers > 0, "top_layers", f"must be > 0, got {self.top_layers}")
        check(self.max_steps >= 0, "max_steps", f"must be >= 0, got {self.max_steps}")
        check(self.max_steps > 0 or self.epochs > 0, "epochs", "must be > 0 when max_steps=0")
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        check(self.grad_accum > 0, "grad_accum", f"must be > 0, got {self.grad_accum}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        schedules = ("cosine", "linear", "constant")
        check(
            self.schedule in schedules,
            "schedule",
            f"must be one of {', '.join(schedules)}, got {self.schedule!r}",
        )
        check(self.warmup >= 0, "warmup", f"must be >= 0, got {self.warmup}")
        check(self.max_length > 1, "max_length", f"must be > 1, got {self.max_length}")
        check(self.log_every > 0, "log_every", f"must be > 0, got {self.log_every}")
        check(
            self.keep_checkpoints > 0,
            "keep_checkpoints",
            f"must be > 0, got {self.keep_checkpoints}",
        )
        dtypes = ("auto", "float32", "bfloat16", "float16")
        check(
            self.dtype in dtypes, "dtype", f"must be one of {', '.join(dtypes)}, got {self.dtype!r}"
        )
        for name in self.report_to:
            check(
                name in ("tensorboard", "wandb"),
                "report_to",
                f"knows tensorboard and wandb, got {name!r}",
            )
        check(
            self.chat_template in ("", "chatml"),
            "chat_template",
            f"must be '' or 'chatml', got {self.chat_template!r}",
        )


def check(ok: bool, key: str, message: str) -> None:
    """Raise a UserError `key message` unless ok."""
    if not ok:
        raise UserError(f"{key} {message}")


# ----------------------------------------------------------------------------- building


def load_config(cls: type[T], path: str | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from an optional YAML file and `key=value` overrides, then validate it."""
    raw: dict[str, Any] = {}
    if path:
        raw = read_yaml(path)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like key=value")
        set_dotted(raw, key.strip(), parse_value(value))
    return build_config(cls, raw)


def positional_config(cls: type[T], argv: list[str], key: str = "model") -> T:
    """`ARG key=value ...` -> a validated `cls`; the one argument without '=' sets `key`."""
    positional = [a for a in argv if "=" not in a]
    if len(positional) > 1:
        raise UserError(
            f"unexpected argument {positional[1]!r}; expected {key.upper()} key=value ..."
        )
    overrides = [a for a in argv if "=" in a] + [f"{key}={p}" for p in positional]
    return load_config(cls, None, overrides)


def build_config(cls: type[T], raw: dict[str, Any] | T) -> T:
    """A validated `cls` from a dict (or an instance, which is re-validated)."""
    cfg = raw if isinstance(raw, cls) else from_dict(cls, raw, prefix="")
    validate = getattr(cfg, "validate", None)
    if validate:
        validate()
    return cfg


def read_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise UserError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the config must be a mapping of keys to values")
    return data


def parse_value(text: str) -> Any:
    """Parse an override value as YAML (`3`, `true`, `[a, b]`), falling back to the raw string."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"{key}: {part} is not a section")
    node[parts[-1]] = value


def from_dict(cls: type[T], raw: dict[str, Any], prefix: str) -> T:
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    known = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            raise UserError(unknown_key_message(prefix + str(key), list(known), prefix))
        kwargs[key] = coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def unknown_key_message(key: str, known: list[str], prefix: str) -> str:
    name = key[len(prefix) :]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"; did you mean {prefix}{close[0]}?" if close else ""
    return f"unknown key {key}{hint}"


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert `value` to the annotated type or raise a UserError naming `key`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else coerce(value, args[0], key)
    if is_dataclass(hint):
        return from_dict(hint, value, prefix=key + ".")
    target = origin or hint
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"{key} must be true or false, got {value!r}")
    if target in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UserError(f"{key} must be a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"{key} must be a number, got {value!r}") from None
        if target is int:
            if number != int(number):
                raise UserError(f"{key} must be a whole number, got {value!r}")
            return int(number)
        return number
    if target is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"{key} must be a string, got {value!r}")
        return "" if value is None else str(value)
    if target is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"{key} must be a list, got {value!r}")
        return value
    if target is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a mapping, got {value!r}")
        return value
    return value


# ----------------------------------------------------------------------------- output


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def help_text(cls: type, command: str) -> str:
    """Every key of `cls` (flattened) with its default and doc, for `--help`."""
    lines = [f"usage: posttrain {command} [CONFIG.yaml] [key=value ...]", "", "keys:"]
    for key, default, doc in iter_keys(cls):
        lines.append(f"  {key} = {default!r}")
        lines.append(f"      {doc}")
    return "\n".join(lines)


def iter_keys(cls: type, prefix: str = ""):
    """(dotted key, default, doc) for every leaf field of `cls`."""
    for f in fields(cls):
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = None
        if is_dataclass(default):
            yield from iter_keys(type(default), prefix + f.name + ".")
        else:
            yield prefix + f.name, default, f.metadata.get("doc", "")
