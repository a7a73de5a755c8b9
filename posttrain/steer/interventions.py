"""Remove or add a direction r in the residual stream: hooks, weight edits, a LoRA adapter.

(a) `ablation_hooks(model, r)`: directional ablation at inference time, as Arditi et al.:
    x <- x - (x.r) r on every block's input and on every sublayer's (attention, MLP) output.
(b) `orthogonalize(model, r)`: the same edit baked into the weights that write to the stream
    (`residual.discover`): W <- (I - r r^T) W along each writer's hidden axis, biases too, so
    every write is orthogonal to r and (a) and (b) give the same logits. The lm_head is untied
    from the embedding first. `norm_preserving=True` then rescales each written vector (an
    embedding row, a weight column for Linear, a row for GPT-2's Conv1D, per expert) back to
    its original norm: still orthogonal to r, no longer equal to (a). Biases are projected,
    not rescaled.
(c) `activation_addition(model, r, coeff, layer)`: adds coeff * r to the input of block
    `layer` at every position, so the projection on r there shifts by exactly coeff (for unit r);
    `layer` = number of blocks adds it to the last block's output (the final stream point).
    `prompt_only=True` adds it only in forwards of more than one position, which in cached
    generation is the prompt (ActAdd's choice, Turner et al. 2023): the reply is then the
    model's own continuation. At the final stream point this matters: added to every
    generated position, the direction forces the behaviour's first token over and over.
(d) `save_as_lora(model, r, path)`: the edit of (b) is rank 1 per matrix, -r (r^T W), so it is
    a peft LoRA adapter with r=1, alpha=1: lora_B = -r (d, 1), lora_A = r^T W (1, k)
    (embeddings: lora_embedding_B = -r, lora_embedding_A = (W_E r)^T; peft applies Gemma's
    embed_scale to the adapter output itself). Bias edits use peft's `lora_bias` (a bias on
    lora_B = -r (r.b)); peft has no LoRA bias on embeddings, so when writers have biases
    (GPT-2) the embeddings travel as full edited copies in `modules_to_save`. Not expressible,
    `AdapterUnsupported` is raised and the caller saves the full model instead: the
    norm-preserving variant (not low-rank), fused MoE experts (3-D parameters), and tied
    embeddings (merging the adapter would edit the shared lm_head too).

All edits work in fp32 and cast back to the weight's dtype. Simplified on purpose: one
direction for every layer (Arditi's choice); no per-layer strength (see abliterate.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from posttrain.steer.residual import ResidualLayout, Writer, discover, untie_lm_head


class AdapterUnsupported(Exception):
    """The edit cannot be expressed as a LoRA adapter; save the full model instead."""


def unit(r: torch.Tensor) -> torch.Tensor:
    """r / |r| in fp32."""
    r = r.detach().float().flatten()
    return r / r.norm().clamp_min(1e-12)


def ablate(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x - (x.r) r along the last axis, for unit r; computed in fp32, returned in x's dtype."""
    xf = x.float()
    rf = r.to(xf.device)
    return (xf - (xf @ rf).unsqueeze(-1) * rf).to(x.dtype)


def _map_first(output, fn):
    """Apply fn to a module output, or to the first element of a tuple output."""
    if isinstance(output, tuple):
        return (fn(output[0]),) + tuple(output[1:])
    return fn(output)


def _block_input_hook(fn):
    """A forward pre-hook (with kwargs) that rewrites the block's hidden_states input."""

    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs

    return hook


@contextmanager
def ablation_hooks(
    model: nn.Module, r: torch.Tensor, layout: ResidualLayout | None = None
) -> Iterator[None]:
    """Inside the block, `model` runs with direction r removed from its residual stream."""
    layout = layout or discover(model)
    r = unit(r)
    fn = lambda x: ablate(x, r)  # noqa: E731
    handles = []
    for block, sublayers in zip(layout.blocks, layout.sublayers):
        handles.append(block.register_forward_pre_hook(_block_input_hook(fn), with_kwargs=True))
        for sub in sublayers:
            handles.append(sub.register_forward_hook(lambda m, a, out: _map_first(out, fn)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def activation_addition(
    model: nn.Module,
    r: torch.Tensor,
    coeff: float,
    layer: int,
    layout: ResidualLayout | None = None,
    prompt_only: bool = False,
) -> Iterator[None]:
    """Inside the block, coeff * unit(r) is added to block `layer`'s input at every position
    (to the last block's output when `layer` == the number of blocks); with `prompt_only`,
    only in forwards over more than one position (the prompt of a cached generation)."""
    layout = layout or discover(model)
    shift = coeff * unit(r)

    def add(x: torch.Tensor) -> torch.Tensor:
        if prompt_only and x.shape[-2] == 1:
            return x
        return (x.float() + shift.to(x.device)).to(x.dtype)

    if not 0 <= layer <= len(layout.blocks):
        raise ValueError(f"layer {layer} out of range 0..{len(layout.blocks)}")
    if layer == len(layout.blocks):
        handle = layout.blocks[-1].register_forward_hook(lambda m, a, out: _map_first(out, add))
    else:
        handle = layout.blocks[layer].register_forward_pre_hook(
            _block_input_hook(add), with_kwargs=True
        )
    try:
        yield
    finally:
        handle.remove()


def orthogonalize_matrix(w: torch.Tensor, r: torch.Tensor, out_dim: int) -> torch.Tensor:
    """W with the component along r removed from axis `out_dim` (fp32): (I - r r^T) W."""
    moved = w.float().movedim(out_dim, -1)  # (..., d)
    return ablate(moved, r).movedim(-1, out_dim)


def keep_norms(new: torch.Tensor, old: torch.Tensor, out_dim: int) -> torch.Tensor:
    """`new` with each vector along `out_dim` rescaled to the norm it had in `old`."""
    old_n = old.float().norm(dim=out_dim, keepdim=True)
    new_n = new.norm(dim=out_dim, keepdim=True).clamp_min(1e-12)
    return new * (old_n / new_n)


@torch.no_grad()
def orthogonalize_writer(writer: Writer, r: torch.Tensor, norm_preserving: bool = False) -> None:
    """Edit one writer's weight (and bias) in place so what it writes is orthogonal to r."""
    w = writer.weight
    new = orthogonalize_matrix(w, r, writer.out_dim)
    if norm_preserving:
        new = keep_norms(new, w, writer.out_dim)
    w.copy_(new.to(w.dtype))
    bias = writer.bias_tensor
    if bias is not None:
        bias.copy_(ablate(bias.float(), r).to(bias.dtype))


def orthogonalize(
    model: nn.Module,
    r: torch.Tensor,
    norm_preserving: bool = False,
    layout: ResidualLayout | None = None,
) -> ResidualLayout:
    """Bake the ablation of r into every residual writer of `model`, in place."""
    layout = layout or discover(model)
    if layout.sandwich_norm:
        warnings.warn(
            "sublayer outputs are normalised before the residual add: "
            "weight orthogonalisation only approximates the ablation",
            stacklevel=2,
        )
    untie_lm_head(model)
    r = unit(r)
    for writer in layout.all_writers():
        orthogonalize_writer(writer, r, norm_preserving)
    return layout


def residual_out_matrix(writer: Writer) -> torch.Tensor:
    """The writer's weight as (d, k): column j is the vector it writes for input unit j."""
    w = writer.weight.detach().float()
    return w.T if writer.kind in ("embedding", "conv1d") else w


def lora_factors(writer: Writer, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (d, 1), A (1, k)) with B @ A = -r r^T W: the edit of `orthogonalize` as rank 1."""
    r = unit(r)
    w = residual_out_matrix(writer)  # (d, k)
    return -r.unsqueeze(1), (r @ w).unsqueeze(0)


def check_adapter_expressible(model: nn.Module, layout: ResidualLayout) -> None:
    """Raise AdapterUnsupported for the edits a LoRA adapter cannot carry."""
    if any(w.kind == "experts" for w in layout.all_writers()):
        raise AdapterUnsupported("fused MoE experts are 3-D parameters, not LoRA targets")
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight.data_ptr() == emb.weight.data_ptr():
        raise AdapterUnsupported("the lm_head is tied to the embedding; merging would edit both")


def lora_config(layout: ResidualLayout):
    """The peft LoraConfig for the edit: r=1, alpha=1, no dropout, exact module names."""
    from peft import LoraConfig

    writers = layout.all_writers()
    with_bias = any(w.bias for w in writers)
    lora_targets = [w.name for w in writers if not (with_bias and w.kind == "embedding")]
    copies = [w.name for w in writers if with_bias and w.kind == "embedding"]
    return LoraConfig(
        r=1,
        lora_alpha=1,
        lora_dropout=0.0,
        target_modules=lora_targets,
        modules_to_save=copies or None,
        lora_bias=with_bias,
        fan_in_fan_out=any(w.kind == "conv1d" for w in writers),
        init_lora_weights=True,
    )


@torch.no_grad()
def _fill_adapter(peft_model, layout: ResidualLayout, r: torch.Tensor) -> None:
    """Write the rank-1 factors (and bias edits / edited copies) into the injected layers."""
    inner = peft_model.base_model.model
    for writer in layout.all_writers():
        layer = inner.get_submodule(writer.name)
        b, a = lora_factors(writer, r)
        if hasattr(layer, "modules_to_save"):  # a full edited copy (embeddings with biases)
            copy = Writer(writer.name, layer.modules_to_save["default"], writer.kind, out_dim=1)
            orthogonalize_writer(copy, r)
        elif writer.kind == "embedding":
            layer.lora_embedding_A["default"].copy_(a)
            layer.lora_embedding_B["default"].copy_(b)
        else:
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
            if layer.lora_B["default"].bias is not None:
                bias = writer.bias_tensor
                edit = -unit(r) * (unit(r) @ bias.float()) if bias is not None else 0.0
                layer.lora_B["default"].bias.copy_(torch.zeros_like(b[:, 0]) + edit)


def save_as_lora(
    model: nn.Module, r: torch.Tensor, path: str | Path, layout: ResidualLayout | None = None
) -> Path:
    """Write the orthogonalisation of r as a peft adapter folder at `path`; model is unchanged.

    Raises AdapterUnsupported when some writer cannot be expressed (see the module doc).
    """
    from peft import get_peft_model

    layout = layout or discover(model)
    check_adapter_expressible(model, layout)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    originals = {w.name: w.module for w in layout.all_writers()}
    peft_model = get_peft_model(model, lora_config(layout))
    try:
        _fill_adapter(peft_model, layout, r)
        with warnings.catch_warnings():  # peft mistakes lora_B's 1-D bias for a sharded tensor
            warnings.filterwarnings("ignore", message=".*invalid shape.*")
            peft_model.save_pretrained(str(path))
    finally:
        peft_model.unload()  # puts the edited modules_to_save copies in place: undo that
        for name, module in originals.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module)
        for name, p in model.named_parameters():
            p.requires_grad_(trainable.get(name, p.requires_grad))
    return Path(path)
