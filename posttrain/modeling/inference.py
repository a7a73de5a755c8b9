"""Load a model for inference (eval, demo, serving) from whatever a user points at.

`load_for_inference(path)` accepts a run directory (its `final/`), a full model folder, a
PEFT adapter folder (its base comes from `adapter_config.json`, the adapter is merged), or a
hub id. It returns `(model, tokenizer)` in eval mode with the KV cache on. Anything else is
one clear `UserError` naming the path.

Simplified on purpose: one device (CPU unless CUDA is there), fp32 on CPU and bf16 on CUDA.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.errors import UserError
from posttrain.modeling.load import (
    ensure_pad_token,
    merged_chain,
    model_folder,
    refuse_reward_model,
)


def resolve_model_path(path: str) -> str:
    """A run directory becomes its `final/`; local folders must hold a model or an adapter."""
    p = Path(path)
    if not p.exists():
        if p.is_absolute() or path.startswith(".") or path.count("/") != 1:
            raise UserError(f"{path}: no such model folder, run directory or hub id")
        return path  # a hub id: owner/name
    if (p / "config.yaml").is_file() and not (p / "final").is_dir():
        raise UserError(f"{path}: run has no final/ model yet (still training or interrupted)")
    if (p / "final").is_dir():
        p = p / "final"
    if not ((p / "config.json").is_file() or (p / "adapter_config.json").is_file()):
        raise UserError(f"{path}: not a model folder or a posttrain run (no config.json)")
    return str(p)


def adapter_base(where: str | Path) -> str | None:
    """The base model a peft adapter folder was trained on, or None for a full model folder."""
    return model_folder(str(where))[1]


def load_for_inference(path: str, trust_remote_code: bool = False):
    """(model, tokenizer) ready for generation; adapters are merged into their base."""
    where = resolve_model_path(path)
    refuse_reward_model(where)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)

        def load_full(name: str) -> torch.nn.Module:
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
            if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(len(tokenizer))
            return model

        model = merged_chain(where, load_full)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot load the model: {str(exc).splitlines()[0]}") from None
    ensure_pad_token(tokenizer)
    model.config.use_cache = True
    return model.to(device).eval(), tokenizer


def position_limit(config) -> int | None:
    """The most positions a model's config allows, where it says."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def context_length(model, tok) -> int:
    """The longest sequence the model takes (prompt + completion)."""
    limit = position_limit(model.config) or getattr(tok, "model_max_length", 0) or 0
    return limit if 0 < limit < 10**7 else 2048
