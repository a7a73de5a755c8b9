"""Fewer passes over memory for training: LoRA linear layers, RMSNorm and rotary embeddings.

    fuse(model) -> dict      # what was fused: {"lora": n, "rms_norm": n, "rope": [families]}

Each piece does the same arithmetic as the code it stands in for, with the elementwise work
folded into fewer kernels; on a CPU those elementwise passes cost as much as the matmuls of
a small model. Each one steps aside (calls the original) for inputs it does not cover.

- **LoRA** (peft's `lora.Linear` over a plain `nn.Linear`): peft computes
  `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate ops, with two extra passes over
  the (tokens, out) output forward and two over the gradients backward. `LoraLinear` folds
  the scaling and the additions into BLAS calls:

      forward   y = x W^T + b;  h = x A^T;  y += s h B^T                 (addmm, in place)
      backward  dB = s g^T h;  gh = s g B;  dA = gh^T x;  dx = g W + gh A

  Taken with one active adapter, not merged or disabled, no dropout, no DoRA or other
  variant, a frozen base, one dtype and no autocast; otherwise peft's forward runs (QLoRA's
  4-bit base, bf16 autocast on CUDA, the disabled adapter serving as the reference model).
- **RMSNorm** of the Llama, Mistral, Qwen2 and Qwen3 models (`weight * x / rms(x)`): one
  autograd node whose backward is the closed form
  `dx = (g w - x̂ mean(g w x̂)) / rms`, instead of autograd through six ops. fp32 only (the
  originals upcast lower precisions to fp32 first).
- **Rotary embeddings** of the same families: `q cos + rotate_half(q) sin` is two halves,
  `q1 c - q2 s` and `q2 c + q1 s` (their cos/sin repeat the frequencies in both halves), written
  straight into the output with no `cat` or negation; the backward is the inverse rotation.
  The modeling module's `apply_rotary_pos_emb` is replaced process-wide, so other models of
  those families loaded later use it too (same values to rounding).

- **Sampling** (`merged_lora(model)`, entered by the rollout sampler): inside the block, no-grad
  forwards of those LoRA layers on the CPU take one matmul with W + s B A, made on entry and
  freed on exit, instead of three. The rotary stand-in steps aside whenever grad is off (its
  autograd node costs more than it saves there).

Saved models and adapters are unchanged: only the compute differs. `fuse` is called on
models loaded for training (`train/run.py`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


# ----------------------------------------------------------------------------- LoRA


class LoraLinear(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T with W and b frozen; gradients for x, A and B."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        rows = x.reshape(-1, x.shape[-1])
        h = rows @ lora_a.t()
        y = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
        y.addmm_(h, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(rows, h, weight, lora_a, lora_b)
        ctx.scaling, ctx.in_shape = scaling, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        rows, h, weight, lora_a, lora_b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_b = (g.t() @ h).mul_(ctx.scaling)
        gh = (g @ lora_b).mul_(ctx.scaling)
        grad_a = gh.t() @ rows
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(gh, lora_a).view(ctx.in_shape)
        return grad_x, None, None, grad_a, grad_b, None


class FusedLoraLinear(PeftLoraLinear):
    """peft's `lora.Linear` whose forward takes `LoraLinear` whenever that is exact."""

    merged_for: tuple[str, torch.Tensor] | None = None  # (adapter, W + s B A) inside merged_lora

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged_for is not None and self.merged_still_applies(x, args, kwargs):
            return nn.functional.linear(x, self.merged_for[1], self.base_layer.bias)
        adapter = self.plain_adapter(x, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        return LoraLinear.apply(
            x,
            base.weight,
            base.bias,
            self.lora_A[adapter].weight,
            self.lora_B[adapter].weight,
            self.scaling[adapter],
        )

    def plain_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The one active adapter when the fused path computes exactly what peft would."""
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        if len(self.active_adapters) != 1 or torch.is_autocast_enabled(x.device.type):
            return None
        adapter = self.active_adapters[0]
        if adapter not in self.lora_A or adapter in self.lora_variant:
            return None
        if not isinstance(self.lora_dropout[adapter], nn.Identity):
            return None
        base = self.base_layer
        frozen = [base.weight] + ([] if base.bias is None else [base.bias])
        if any(p.requires_grad for p in frozen):
            return None
        tensors = [x, *frozen, self.lora_A[adapter].weight, self.lora_B[adapter].weight]
        return adapter if len({t.dtype for t in tensors}) == 1 else None

    def merged_still_applies(self, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        """Inside `merged_lora`: what `plain_adapter` checks that a call or the caller can change
        (`merged_weight` checked the rest on entry; the full check costs as much as the matmul)."""
        adapter, weight = self.merged_for
        if args or kwargs or torch.is_grad_enabled() or self.disable_adapters or self.merged:
            return False
        return (
            self.active_adapters == [adapter]
            and x.dtype == weight.dtype
            and (not torch.is_autocast_enabled(x.device.type))
        )

    def merged_weight(self) -> tuple[str, torch.Tensor] | None:
        """(adapter, W + s B A) for the one plain active adapter of a CPU layer, else None."""
        weight = self.base_layer.weight
        adapter = self.plain_adapter(weight, (), {})
        if adapter is None or weight.device.type != "cpu":
            return None
        with torch.no_grad():
            lora_b, lora_a = self.lora_B[adapter].weight, self.lora_A[adapter].weight
            return adapter, torch.addmm(weight, lora_b, lora_a, alpha=self.scaling[adapter])


@contextmanager
def merged_lora(model: nn.Module) -> Iterator[int]:
    """Within the block, no-grad forwards of fused LoRA layers on the CPU use W + s B A.

    For sampling: a decode step's matmuls are small, so on a CPU the two extra LoRA matmuls and
    their dispatch cost about as much as the base one. The merged copies are made on entry (one
    (out, r) x (r, in) product per layer), freed on exit, and never written into the base
    weights (which stay exact for the reference model and for checkpoints); they cost one more
    copy of the adapted weights meanwhile, which is why CUDA layers are left out. Yields the
    number of layers merged."""
    layers = [m for m in model.modules() if isinstance(m, FusedLoraLinear)]
    try:
        for layer in layers:
            layer.merged_for = layer.merged_weight()
        yield sum(layer.merged_for is not None for layer in layers)
    finally:
        for layer in layers:
            layer.merged_for = None


def fuse_lora(model: nn.Module) -> int:
    """Give every peft LoRA linear layer over a plain `nn.Linear` the fused forward."""
    count = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear and type(module.base_layer) is nn.Linear:
            module.__class__ = FusedLoraLinear
            count += 1
    return count


# ----------------------------------------------------------------------------- RMSNorm


class RMSNorm(torch.autograd.Function):
    """y = w x / sqrt(mean(x^2) + eps) over the last dimension."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        normed = x * rstd
        ctx.save_for_backward(normed, rstd, weight)
        return weight * normed

    @staticmethod
    def backward(ctx, grad):
        normed, rstd, weight = ctx.saved_tensors
        grad_normed = grad * weight
        dot = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = grad_normed.sub_(normed * dot).mul_(rstd)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * normed).reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_w, None


def rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """The fused RMSNorm for fp32 inputs; the module's own forward otherwise."""
    weight = self.weight
    if hidden_states.dtype != torch.float32 or weight.dtype != torch.float32:
        return super(type(self), self).forward(hidden_states)
    return RMSNorm.apply(hidden_states, weight, self.variance_epsilon)


@functools.cache
def fused_norm_class(cls: type) -> type:
    return type(f"Fused{cls.__name__}", (cls,), {"forward": rms_norm_forward})


def fuse_rms_norms(model: nn.Module) -> int:
    """Swap in the fused forward on the RMSNorm layers of the families it matches."""
    count = 0
    for module in model.modules():
        cls = type(module)
        if cls.__name__.endswith("RMSNorm") and family_of(cls) in FAMILIES:
            module.__class__ = fused_norm_class(cls)
            count += 1
    return count


# ----------------------------------------------------------------------------- rotary


class Rotary(torch.autograd.Function):
    """(q1, q2) -> (q1 c - q2 s, q2 c + q1 s) for the two halves of the last dimension."""

    @staticmethod
    def forward(ctx, x, cos_half, sin_half):
        ctx.save_for_backward(cos_half, sin_half)
        return rotate(x, cos_half, sin_half, 1.0)

    @staticmethod
    def backward(ctx, grad):
        cos_half, sin_half = ctx.saved_tensors
        return rotate(grad, cos_half, sin_half, -1.0), None, None


def rotate(x: torch.Tensor, cos_half, sin_half, sign: float) -> torch.Tensor:
    """Rotate by +angle (sign 1) or -angle (sign -1), written into one new tensor."""
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.empty_like(x)
    out1, out2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos_half, out=out1).addcmul_(x2, sin_half, value=-sign)
    torch.mul(x2, cos_half, out=out2).addcmul_(x1, sin_half, value=sign)
    return out


def fused_rotary(original):
    """`apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)` through `Rotary` where it applies."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, **kwargs):
        dim = q.shape[-1]
        if not torch.is_grad_enabled():  # sampling: the autograd node would cost more than it saves
            return original(q, k, cos, sin, unsqueeze_dim, **kwargs)
        if kwargs or cos.requires_grad or sin.requires_grad or cos.shape[-1] != dim or dim % 2:
            return original(q, k, cos, sin, unsqueeze_dim, **kwargs)
        if not (q.dtype == k.dtype == cos.dtype == sin.dtype):
            return original(q, k, cos, sin, unsqueeze_dim)
        cos_half = cos[..., : dim // 2].unsqueeze(unsqueeze_dim)
        sin_half = sin[..., : dim // 2].unsqueeze(unsqueeze_dim)
        return Rotary.apply(q, cos_half, sin_half), Rotary.apply(k, cos_half, sin_half)

    apply_rotary_pos_emb.fused = True
    return apply_rotary_pos_emb


def fuse_rotary(model: nn.Module) -> list[str]:
    """Replace `apply_rotary_pos_emb` in the modeling modules of the model's families."""
    done = []
    for module in model.modules():
        family = family_of(type(module))
        code = sys.modules.get(type(module).__module__)
        if family not in FAMILIES or family in done or code is None:
            continue
        original = getattr(code, "apply_rotary_pos_emb", None)
        if original is not None and not getattr(original, "fused", False):
            code.apply_rotary_pos_emb = fused_rotary(original)
        done.append(family)
    return done


# ----------------------------------------------------------------------------- all


def family_of(cls: type) -> str:
    """ "llama" for transformers.models.llama.modeling_llama classes; "" for anything else."""
    parts = cls.__module__.split(".")
    ours = len(parts) == 4 and parts[:2] == ["transformers", "models"]
    return parts[2] if ours and parts[3] == f"modeling_{parts[2]}" else ""


def fuse(model: nn.Module) -> dict:
    """Fuse what can be fused in a model about to be trained; returns what was done."""
    return {"lora": fuse_lora(model), "rms_norm": fuse_rms_norms(model), "rope": fuse_rotary(model)}
