"""Load the tokenizer and the base causal LM named by `cfg.model` (a local folder or a hub id).

`load_tokenizer` gives every tokenizer a pad token (the eos token when it has none; a new
`<|pad|>` token only when it has neither) and adds `cfg.new_tokens` as regular added tokens.
`load_model` picks the dtype and attention implementation, quantizes to 4-bit NF4 for
`adapter=qlora`, grows the embeddings to the tokenizer, turns on activation checkpointing when
`gradient_checkpointing` is set and turns off the KV cache (training needs no cache).

`cfg.model` may also be a posttrain run directory or a peft adapter folder (e.g. the SFT run
a DPO or reward run starts from): the tokenizer comes from that folder and the adapter is
merged into its base (`adapter_config.json` names it) before the new adapter is applied, so
"the reference" of a later adapter run is the merged model.

Simplified on purpose:
- chat templates are not touched here (`posttrain.data.chat` owns them);
- new embedding rows (input and output) start at the mean of the existing rows, with no
  noise, so a reload or a resumed run rebuilds exactly the same frozen rows;
- the model is loaded on the CPU and the caller moves it; only QLoRA, whose weights are
  quantized as they are placed, loads straight onto the current CUDA device when there is one.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.utils import is_flash_attn_2_available

from posttrain.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PAD_TOKEN = "<|pad|>"
BNB_HELP = "adapter=qlora needs bitsandbytes: pip install bitsandbytes"


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` = bfloat16 on CUDA, float32 on CPU; otherwise the named dtype."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name not in DTYPES:
        raise UserError(f"dtype must be one of auto, {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def resolve_attention(name: str, dtype: torch.dtype) -> str:
    """`auto` = flash_attention_2 on CUDA in half precision when flash_attn is installed, else sdpa."""
    if name != "auto":
        return name
    half = dtype in (torch.bfloat16, torch.float16)
    if torch.cuda.is_available() and half and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


def hub_kwargs(cfg: Any) -> dict[str, Any]:
    """The arguments every `from_pretrained` call shares."""
    kwargs: dict[str, Any] = {
        "local_files_only": cfg.offline,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    return kwargs


def cannot_load(name: str, exc: Exception) -> UserError:
    """A one-line UserError for a model or tokenizer that could not be found or read."""
    looks_local = name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()
    if looks_local and not Path(name).expanduser().exists():
        reason = "no such folder"
    else:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
    return UserError(f"model: cannot load {name!r} ({reason})")


def model_error(cfg: Any, attention: str, exc: Exception) -> Exception:
    """Name the key behind a failed model load; unknown import errors stay ours."""
    text = str(exc)
    if "bitsandbytes" in text:
        return UserError(BNB_HELP)
    if "attn_implementation" in text or "FlashAttention" in text:
        reason = " ".join(text.split())[:200]
        return UserError(f"attn_implementation: {attention!r} cannot be used here ({reason})")
    if isinstance(exc, ImportError):
        return exc
    return cannot_load(cfg.model, exc)


# ----------------------------------------------------------------------------- tokenizer


def model_folder(name: str) -> tuple[str, str | None]:
    """(folder or hub id to load, the adapter's base or None): a run dir becomes its final/.

    A local folder comes back absolute, so adapters trained on it record a base that loads from
    any working directory."""
    path = Path(name).expanduser()
    if (path / "final").is_dir():
        path = path / "final"
    if not path.is_dir():
        return name, None  # a hub id, or a missing folder that from_pretrained reports
    path = path.resolve()
    config = path / "adapter_config.json"
    return str(path), json.loads(config.read_text())[
        "base_model_name_or_path"
    ] if config.is_file() else None


def sequence_classifier(where: str) -> bool | None:
    """True for a local reward model folder (a ...ForSequenceClassification model or a SEQ_CLS
    adapter), False for another local model folder, None for anything else (a hub id)."""
    folder = Path(where)
    if (folder / "adapter_config.json").is_file():
        return (
            json.loads((folder / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS"
        )
    if (folder / "config.json").is_file():
        names = json.loads((folder / "config.json").read_text()).get("architectures") or []
        return any(name.endswith("ForSequenceClassification") for name in names)
    return None


def refuse_reward_model(where: str) -> None:
    """Loaded as a causal LM, a reward model would generate through a random output head."""
    if sequence_classifier(where):
        raise UserError(f"{where} is a reward model (a sequence classifier), not a causal LM; "
                        "use the model it was trained from (score with `posttrain reward score`)")  # fmt: skip


def merged_chain(where: str, load_full, depth: int = 0) -> torch.nn.Module:
    """The model at `where`: `load_full(where)` for a full model, else its adapter merged into
    its base, loaded the same way (so SFT -> DPO -> ... chains of adapter runs load).

    The merged model remembers `where` as its name, so an adapter trained on it records it as
    its base. The adapter is loaded without its task type, so a causal-LM adapter also merges
    into a sequence-classification model of the same base (a reward model from an SFT run).
    """
    where, base = model_folder(where)
    if base is None:
        return load_full(where)
    if depth > 8:
        raise UserError(f"model: {where}: more than 8 adapters chained (a cycle?)")
    model = merged_chain(base, load_full, depth + 1)
    config = PeftConfig.from_pretrained(where)
    config.task_type = None
    model = PeftModel.from_pretrained(model, where, config=config).merge_and_unload()
    model.config._name_or_path = where
    model.name_or_path = where
    return model


def load_tokenizer(cfg: Any):
    """The tokenizer of `cfg.model`, with a pad token and `cfg.new_tokens` added."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_folder(cfg.model)[0], **hub_kwargs(cfg))
    except (OSError, ValueError) as exc:
        raise cannot_load(cfg.model, exc) from None
    ensure_pad_token(tokenizer)
    add_new_tokens(tokenizer, cfg.new_tokens)
    return tokenizer


def ensure_pad_token(tokenizer) -> None:
    """Pad with eos when there is no pad token (padding is always masked out of the loss)."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})


def add_new_tokens(tokenizer, tokens: list) -> int:
    """Add `tokens` as regular added tokens; returns how many were new to the vocabulary."""
    for token in tokens:
        if not isinstance(token, str) or not token:
            raise UserError(f"new_tokens must be a list of non-empty strings, got {token!r}")
    return tokenizer.add_tokens(list(tokens)) if tokens else 0


# ----------------------------------------------------------------------------- model


def load_model(cfg: Any, tokenizer, auto_class=AutoModelForCausalLM) -> torch.nn.Module:
    """The base model of `cfg.model`, ready for `apply_adapter` (see the module docstring).

    `auto_class` is `AutoModelForCausalLM`, or `AutoModelForSequenceClassification` for reward
    models (then with one label and the tokenizer's pad id, which locates each row's last token).
    """
    dtype = resolve_dtype(cfg.dtype)
    kwargs = hub_kwargs(cfg)
    if cfg.offline:  # transformers 5.23 does not pass local_files_only on to its adapter lookup
        kwargs["adapter_kwargs"] = {"local_files_only": True}
    kwargs["dtype"] = dtype
    kwargs["attn_implementation"] = resolve_attention(cfg.attn_implementation, dtype)
    if cfg.adapter == "qlora":
        kwargs["quantization_config"] = nf4_config(dtype)
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    where, base = model_folder(cfg.model)
    if auto_class is AutoModelForCausalLM:
        refuse_reward_model(where)
    if base and cfg.adapter == "qlora":
        raise UserError(f"model: {where} is an adapter; merge it into a full model for QLoRA")
    if auto_class is not AutoModelForCausalLM:
        kwargs.update(num_labels=1, pad_token_id=tokenizer.pad_token_id)

    def load_full(name: str) -> torch.nn.Module:
        try:
            model = auto_class.from_pretrained(name, **kwargs)
        except (OSError, ValueError, ImportError) as exc:
            raise model_error(cfg, kwargs["attn_implementation"], exc) from None
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            resize_embeddings(model, len(tokenizer))
        return model

    model = merged_chain(where, load_full)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.config.use_cache = False
    return model


def nf4_config(dtype: torch.dtype) -> BitsAndBytesConfig:
    """4-bit NF4 with double quantization, computing in the model dtype (QLoRA's recipe)."""
    check_bitsandbytes()
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def check_bitsandbytes() -> None:
    """Raise a UserError saying how to install bitsandbytes when it is missing or cannot run here."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(BNB_HELP)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(torch.ones(64, device=device), quant_type="nf4")
    except Exception as exc:  # a broken install fails in many ways (missing libs, CUDA mismatch)
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"{BNB_HELP}; it is installed but fails on {device}: {reason}") from None


def resize_embeddings(model: torch.nn.Module, rows: int) -> None:
    """Grow the input/output embeddings to `rows`; new rows are the mean of the old ones."""
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(rows, mean_resizing=False)
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    layers = [inp] if out is None or out.weight is inp.weight else [inp, out]  # tied: one matrix
    with torch.no_grad():
        for layer in layers:
            weight = layer.weight
            weight[old:] = weight[:old].float().mean(0, keepdim=True).to(weight.dtype)
            bias = getattr(layer, "bias", None)
            if bias is not None and bias.shape[0] == rows:
                bias[old:] = bias[:old].float().mean().to(bias.dtype)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing; inputs require grad so frozen bases still backprop."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not getattr(model, "_require_grads_hooks", None):
        model.enable_input_require_grads()


def attention_of(model) -> str:
    """The attention implementation a loaded model runs ("sdpa", "eager", "flash_attention_2")."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) or ""
