"""Choose what trains (`cfg.adapter`), count it, save it, and snapshot it for checkpoints.

Adapters from peft: `lora`, `rslora` (use_rslora), `dora` (use_dora), `qlora` (LoRA on a 4-bit
base prepared with `prepare_model_for_kbit_training`), `lokr`, `loha`, `ia3`, `prefix`,
`prompt` and `trainable_tokens`. Our own, without peft: `full` (everything), `top_layers`
(the last `cfg.top_layers` decoder blocks plus the final norm) and `bitfit` (bias terms only).
`cfg.lora.*` feeds the LoRA family; `cfg.adapter_args` is passed verbatim to the peft config.
Plain LoRA layers, RMSNorm and rotary embeddings then compute through `fused` (same
arithmetic, fewer passes).

Choices made on purpose:
- `lora.target_modules: [all-linear]` is passed to peft as its `"all-linear"` shorthand
  (every linear layer but the output head);
- the LoRA family (lora, rslora, dora, qlora) also trains the embedding rows (input and, when
  untied, output) of `cfg.new_tokens` via peft's `trainable_token_indices`: a new token must be
  readable and writable. `lora.dropout` is LoRA's input dropout and is not mapped onto
  LoKr/LoHa (`rank_dropout`, `module_dropout` go through `adapter_args`);
- `trainable_tokens` trains the rows of `cfg.new_tokens` (and of `adapter_args.token_indices`)
  in the input embedding and, for models with an untied head, in the output embedding too;
- `top_layers` keeps the final norm trainable: it is a handful of parameters and it directly
  rescales what the trained blocks write; embeddings and the head stay frozen;
- `ia3` needs `feedforward_modules`: peft's table for known families, otherwise we take the
  linear layers that map a wider input back to the hidden size (the MLP down-projections);
- `prefix` refuses `gradient_checkpointing` up front (peft does too: a checkpointed layer
  drops the prefix key/values when it recomputes).

`save_model` writes a peft adapter folder (`PeftModel.from_pretrained(base, path)`) or a full
model folder, plus the tokenizer. When the vocabulary was grown, the adapter also carries the
full embedding matrices; reload by resizing the base to `len(tokenizer)` first. QLoRA adapters
are saved like any other (merging into a de-quantized base is out of scope here).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import (
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    TrainableTokensConfig,
    get_peft_model,
    prepare_model_for_kbit_training,
)
from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
from torch import nn

from posttrain.config import ADAPTERS
from posttrain.errors import UserError
from posttrain.modeling.fused import fuse

LORA_FAMILY = ("lora", "rslora", "dora", "qlora")
NO_PEFT = ("full", "top_layers", "bitfit")
DEFAULT_VIRTUAL_TOKENS = 16


def apply_adapter(model: nn.Module, cfg: Any, tokenizer, task_type: str = "CAUSAL_LM") -> nn.Module:
    """Make only what `cfg.adapter` trains require grad; peft adapters return a PeftModel.

    `task_type="SEQ_CLS"` (reward models) makes peft train and save the score head too. The
    result computes through `fused` where that is exact (LoRA layers, RMSNorm, rotary).
    """
    model = attach_adapter(model, cfg, tokenizer, task_type)
    fuse(model)
    return model


def attach_adapter(model: nn.Module, cfg: Any, tokenizer, task_type: str) -> nn.Module:
    """`apply_adapter` without the fusing."""
    kind = cfg.adapter
    if kind not in ADAPTERS:
        raise UserError(f"adapter must be one of {', '.join(ADAPTERS)}, got {kind!r}")
    if kind in NO_PEFT:
        if cfg.adapter_args:
            raise UserError(f"adapter_args is not used by adapter={kind}; remove it")
        own = {"full": train_everything, "top_layers": train_top_layers, "bitfit": train_biases}
        own[kind](model, cfg)
        return model
    if kind == "prefix" and cfg.gradient_checkpointing:
        raise UserError(
            "gradient_checkpointing must be false with adapter=prefix (peft refuses it)"
        )
    if kind == "qlora":
        if not getattr(model, "is_loaded_in_4bit", False):
            raise UserError("adapter=qlora needs a base loaded in 4-bit (use load_model)")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = peft_config(model, cfg, tokenizer)
    config.task_type = task_type
    try:
        return get_peft_model(model, config)
    except (TypeError, ValueError) as exc:  # unsupported layer types, targets matching nothing
        name = type(model).__name__
        raise UserError(f"adapter={kind} cannot be applied to {name}: {one_line(exc)}") from None


# ----------------------------------------------------------------------------- peft configs


def peft_config(model: nn.Module, cfg: Any, tokenizer):
    """The peft config for `cfg.adapter`, with `cfg.adapter_args` on top."""
    kind, extra = cfg.adapter, dict(cfg.adapter_args)
    targets = target_modules(cfg.lora.target_modules)
    new_ids = new_token_ids(tokenizer, cfg.new_tokens)
    if kind in LORA_FAMILY:
        base: dict[str, Any] = dict(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=targets,
            use_rslora=kind == "rslora",
            use_dora=kind == "dora",
        )
        if new_ids:
            base["trainable_token_indices"] = {name: new_ids for name in embedding_names(model)}
        return build(LoraConfig, base, extra)
    if kind in ("lokr", "loha"):
        cls = LoKrConfig if kind == "lokr" else LoHaConfig
        return build(cls, dict(r=cfg.lora.r, alpha=cfg.lora.alpha, target_modules=targets), extra)
    if kind == "ia3":
        names = extra.pop("feedforward_modules", None) or feedforward_modules(model)
        return build(
            IA3Config,
            {"target_modules": targets, "feedforward_modules": suffix_regex(names)},
            extra,
        )
    if kind in ("prefix", "prompt"):
        cls = PrefixTuningConfig if kind == "prefix" else PromptTuningConfig
        return build(cls, {"num_virtual_tokens": DEFAULT_VIRTUAL_TOKENS}, extra)
    # trainable_tokens
    ids = sorted(set(new_ids) | set(extra.pop("token_indices", [])))
    if not ids:
        raise UserError(
            "new_tokens is empty: adapter=trainable_tokens trains the embeddings of new_tokens"
            " (or of adapter_args.token_indices)"
        )
    return build(
        TrainableTokensConfig,
        {"token_indices": ids, "target_modules": embedding_names(model)},
        extra,
    )


def build(cls: type, base: dict[str, Any], extra: dict[str, Any]):
    """`cls(task_type=CAUSAL_LM, **base, **extra)`, with bad `adapter_args` named for the user."""
    known = set(cls.__dataclass_fields__)
    for key in extra:
        if key not in known:
            raise UserError(f"adapter_args.{key} is not a field of peft's {cls.__name__}")
    try:
        return cls(task_type="CAUSAL_LM", **{**base, **extra})
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"adapter_args: peft's {cls.__name__} rejected them ({one_line(exc)})"
        ) from None


def target_modules(targets: list | str) -> list | str:
    """peft only recognises its `all-linear` shorthand as a plain string."""
    if isinstance(targets, str):
        return targets
    if len(targets) == 1 and str(targets[0]).lower() == "all-linear":
        return "all-linear"
    if not targets:
        raise UserError(
            "lora.target_modules is empty; use [all-linear] or names like [q_proj, v_proj]"
        )
    return list(targets)


def one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def new_token_ids(tokenizer, tokens: list) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(list(tokens)) if tokens else []
    return sorted({i for i in ids if i is not None and i != tokenizer.unk_token_id})


def embedding_names(model: nn.Module) -> list[str]:
    """Dotted names of the input embedding and, when it is a separate matrix, the output head."""
    names = {id(m): n for n, m in model.named_modules()}
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    result = [names[id(inp)]]
    if out is not None and out.weight is not inp.weight:
        result.append(names[id(out)])
    return result


def suffix_regex(names: list[str] | str) -> str:
    """A regex matching module names ending in one of `names`.

    peft 0.21 saves an `all-linear` IA3 config with full target names and suffix feedforward
    names, then refuses to load it ("feedforward_modules should be a subset of target_modules");
    a regex string skips that check and matches the same modules.
    """
    if isinstance(names, str):
        return names
    return r"(.*\.)?(" + "|".join(re.escape(n) for n in names) + ")"


def feedforward_modules(model: nn.Module) -> list[str]:
    """IA3's feedforward modules: peft's table for known families, else the MLP down-projections."""
    model_type = getattr(model.config, "model_type", "")
    if model_type in TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING:
        return list(TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type])
    hidden = model.get_input_embeddings().weight.shape[1]
    found = sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
         if isinstance(m, nn.Linear) and m.out_features == hidden and m.in_features > hidden}
    )  # fmt: skip
    if not found:
        raise UserError(
            f"adapter_args.feedforward_modules is needed for ia3 on model_type {model_type!r}"
            " (the names of the MLP output projections)"
        )
    return found


# ----------------------------------------------------------------------------- our adapters


def train_everything(model: nn.Module, cfg: Any) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


def train_biases(model: nn.Module, cfg: Any) -> None:
    """BitFit (Ben Zaken et al., 2021): only the bias terms train."""
    found = False
    for name, p in model.named_parameters():
        is_bias = name.endswith(".bias")
        p.requires_grad_(is_bias)
        found = found or is_bias
    if not found:
        name = type(model).__name__
        raise UserError(
            f"adapter=bitfit needs bias parameters and {name} has none; use lora or top_layers"
        )


def train_top_layers(model: nn.Module, cfg: Any) -> None:
    """Freeze everything but the last `cfg.top_layers` blocks and the final norm."""
    blocks = decoder_blocks(model)
    k = cfg.top_layers
    if k > len(blocks):
        raise UserError(f"top_layers is {k}, but the model has only {len(blocks)} blocks")
    for p in model.parameters():
        p.requires_grad_(False)
    for module in [*blocks[-k:], *final_norms(model)]:
        for p in module.parameters():
            p.requires_grad_(True)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks: the ModuleList of same-typed modules holding the most parameters."""
    best, best_size = None, 0
    for module in model.modules():
        same_typed = isinstance(module, nn.ModuleList) and len({type(m) for m in module}) == 1
        if same_typed:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = module, size
    if best is None:
        raise UserError(f"adapter=top_layers cannot find the blocks of {type(model).__name__}")
    return best


def final_norms(model: nn.Module) -> list[nn.Module]:
    """Norm layers sitting directly in the decoder (after the blocks), e.g. `model.norm`, `ln_f`."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return [m for _, m in decoder.named_children() if "norm" in type(m).__name__.lower()]


# ----------------------------------------------------------------------------- reporting


def trainable_summary(model: nn.Module) -> str:
    """'trainable params: 1,234 of 5,678 (21.7%)' (4-bit weights counted unpacked)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2 * getattr(getattr(p, "quant_storage", None), "itemsize", 1)
        total += n
        trainable += n if p.requires_grad else 0
    share = 100.0 * trainable / max(total, 1)
    return f"trainable params: {trainable:,} of {total:,} ({share:.1f}%)"


# ----------------------------------------------------------------------------- saving

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>")


def save_model(model: nn.Module, tokenizer, path: str | Path) -> None:
    """Write an adapter folder (peft) or a full model folder, with the tokenizer beside it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        model.save_pretrained(path, save_embedding_layers=embeddings_resized(model))
    else:
        add_stop_tokens(model, tokenizer)
        with cache_enabled(model):
            model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def add_stop_tokens(model: nn.Module, tokenizer) -> None:
    """Make `generate` stop at the tokenizer's eos and end-of-turn tokens (e.g. `<|im_end|>`)."""
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    have = gen.eos_token_id
    ids = [] if have is None else [have] if isinstance(have, int) else list(have)
    vocab = tokenizer.get_vocab()
    extra = [tokenizer.eos_token_id] + [vocab.get(t) for t in END_OF_TURN]
    ids += [i for i in extra if i is not None and i not in ids]
    if ids:
        gen.eos_token_id = ids[0] if len(ids) == 1 else ids


@contextlib.contextmanager
def cache_enabled(model: nn.Module) -> Iterator[None]:
    """Save the config with `use_cache=True` (we turn it off for training; generation wants it)."""
    before = getattr(model.config, "use_cache", None)
    if before is not None:
        model.config.use_cache = True
    try:
        yield
    finally:
        if before is not None:
            model.config.use_cache = before


def embeddings_resized(model: PeftModel) -> bool:
    """Whether the vocabulary grew since the base was saved (then the adapter carries embeddings)."""
    base = model.get_base_model()
    rows = base.get_input_embeddings().weight.shape[0]
    source = getattr(base, "name_or_path", "") or ""
    try:
        original = type(base.config).from_pretrained(source, local_files_only=True)
    except Exception:  # no readable base config (built from a config?): keep the rows, to be safe
        return True
    return rows != original.get_text_config().vocab_size


# ----------------------------------------------------------------------------- checkpoints


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (detached; the checkpoint writer copies them)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a `trainable_state` back; names must match exactly (same model, same adapter)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        first = (missing or unexpected)[0]
        what = "lacks" if missing else "has an unknown parameter"
        raise UserError(
            f"checkpoint does not match the model: it {what} {first} (adapter changed?)"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(device=p.device, dtype=p.dtype))
