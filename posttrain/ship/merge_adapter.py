"""`posttrain merge adapter=RUN_OR_ADAPTER output_dir=DIR`: fold a peft adapter into its base.

The base comes from the adapter's `adapter_config.json` (`base_model_name_or_path`) and is
loaded unquantised in fp32; peft's `merge_and_unload` folds the adapter (W + scale * B A for
the LoRA family, DoRA's magnitude, IA3's scaling, trainable tokens); the result is cast to
`dtype` (float32, bfloat16 or float16; never 4-bit) and saved as a full model in shards with
the run's tokenizer and chat template. For a QLoRA run this folds the adapter into the
original full-precision weights, not into their NF4 round trip that training saw: the
standard choice (peft, Unsloth, LLaMA-Factory), which keeps the base's precision.

Simplified on purpose: prompt-learning adapters (prefix, prompt tuning) have no weights to
fold into and are refused; a base stored already quantised is refused too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import PeftConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.errors import UserError
from posttrain.io import atomic_dir
from posttrain.modeling.inference import adapter_base, resolve_model_path
from posttrain.modeling.load import merged_chain

FOLD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FOLD_KEYS = ("adapter", "output_dir", "dtype", "max_shard_size")


def fold_adapter(
    adapter: str, output_dir: str, dtype: str = "float32", max_shard_size: str | int = "2GB"
) -> Path:
    """Fold the adapter at `adapter` (adapter folder or run directory) into its base model."""
    if dtype not in FOLD_DTYPES:
        raise UserError(
            f"dtype must be one of {', '.join(FOLD_DTYPES)} (never 4-bit), got {dtype!r}"
        )
    where = resolve_model_path(adapter)
    base = adapter_base(where)
    if base is None:
        raise UserError(f"{adapter}: not a peft adapter (no adapter_config.json)")
    if PeftConfig.from_pretrained(where).is_prompt_learning:
        raise UserError(f"{adapter}: prompt-learning adapters (prefix, prompt) cannot be folded")
    tokenizer = AutoTokenizer.from_pretrained(where if has_tokenizer(where) else base)

    def load_full(name: str) -> torch.nn.Module:
        model = load_base(name)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        return model

    model = merged_chain(where, load_full).to(FOLD_DTYPES[dtype])  # a chain of adapters too
    with atomic_dir(output_dir) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
    print(f"folded {adapter} into {base} ({dtype}): {output_dir}", file=sys.stderr)
    return Path(output_dir)


def has_tokenizer(folder: str) -> bool:
    return any(Path(folder, f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def load_base(base: str) -> torch.nn.Module:
    """The base in fp32 and unquantised (a QLoRA run's base is quantised only at load time)."""
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise UserError(f"{base}: cannot load the base model: {str(exc).splitlines()[0]}") from None
    if getattr(model.config, "quantization_config", None):
        raise UserError(
            f"{base}: the base is stored quantised; folding needs full-precision weights"
        )
    return model


def fold_main(config: str | None, overrides: dict) -> None:
    """CLI: `posttrain merge adapter=PATH output_dir=DIR [dtype=...] [max_shard_size=...]`."""
    if config is not None:
        raise UserError("give either a merge CONFIG.yaml or adapter=PATH, not both")
    for key in overrides:
        if key not in FOLD_KEYS:
            raise UserError(f"unknown key {key!r} for merge adapter=; keys: {', '.join(FOLD_KEYS)}")
    if not overrides.get("output_dir"):
        raise UserError("output_dir= is required for merge adapter=")
    fold_adapter(
        str(overrides["adapter"]),
        str(overrides["output_dir"]),
        str(overrides.get("dtype", "float32")),
        overrides.get("max_shard_size", "2GB"),
    )
