"""Language-model losses from the final hidden states, without the (batch, seq, vocab) logits.

Most of the memory of an LM step at large vocabularies is the logits tensor and its
gradient. Here the model is run with `logits_to_keep=1`, a forward hook on the decoder
captures the final (post-norm) hidden states, the caller picks the positions it trains on,
and the output head is applied to those rows in chunks:

- `linear_cross_entropy` is a fused linear + cross-entropy (as in Liger-Kernel, Hsu et al.,
  2024; and "Cut Your Losses", Wijmans et al., 2024). For each chunk of C rows it computes
  the logits in fp32, their logsumexp, the loss, and right away the gradients with respect
  to the hidden rows and the head weight/bias: dL/dz = softmax(z) - onehot(target). Backward
  only scales the stored gradients by the incoming scalar. Peak extra memory: a few (C, V)
  fp32 buffers, plus (N, H) and, when the head trains, (V, H) gradient buffers.
- Heads that are not a plain `nn.Linear` (e.g. wrapped by peft) fall back to a per-chunk
  `torch.utils.checkpoint` of the head: the (C, V) logits are recomputed in backward.
- `token_logprobs` gives per-token log p(target) with gradient (for preference losses),
  with the same per-chunk checkpointing.

Family logit transforms are part of the head (`output_head`): Gemma-2/3 style
`final_logit_softcapping`, Cohere `logit_scale`, Granite/MiniCPM3 `logits_scaling`. Once
per model, `final_hidden` checks the head on the last position against the logits the model
itself returned, so a family doing something else fails loudly instead of training wrong.
A right-padded batch is run without its attention mask (`right_padded`): same real-token
outputs under causal attention, and the fast unmasked attention path.

Simplified on purpose: targets must already be valid token ids (the caller drops ignored
positions); prompt/prefix tuning cannot be used with packed rows (position_ids only);
models whose forward does not accept `logits_to_keep` are not supported.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from posttrain.errors import UserError
from posttrain.modeling.load import attention_of

IGNORE_INDEX = -100
# Models whose head already passed the check in `final_hidden`.
_CHECKED: weakref.WeakSet = weakref.WeakSet()


# ----------------------------------------------------------------------------- model side


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def final_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final (post-norm) hidden states aligned with `batch["input_ids"]`, (B, T, H)."""
    hidden, last_logits = forward_hidden(model, batch)
    if model not in _CHECKED:
        check_head(model, hidden[:, -1:], last_logits)
        _CHECKED.add(model)
    return hidden


def forward_hidden(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the full model (so peft's virtual tokens apply) with the head on the last position only."""
    inputs = model_inputs(model, batch)
    captured: list[torch.Tensor] = []

    def grab(module, args, output):
        captured.append(output[0] if isinstance(output, (tuple, dict)) else output)

    handle = base_model(model).get_decoder().register_forward_hook(grab)
    try:
        out = model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        handle.remove()
    if not captured:
        name = type(base_model(model)).__name__
        raise UserError(f"model: {name} does not run its get_decoder() module; it is not supported")
    length = batch["input_ids"].shape[1]
    return captured[-1][:, -length:], out.logits  # prompt tuning prepends virtual tokens


def model_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    inputs = {
        k: batch[k]
        for k in ("input_ids", "attention_mask", "position_ids")
        if batch.get(k) is not None
    }
    config = getattr(model, "active_peft_config", None)
    if config is not None and config.is_prompt_learning and "position_ids" in inputs:
        if "attention_mask" not in inputs:
            raise UserError(
                "packing: prompt and prefix tuning cannot keep packed examples apart; set packing=false"
            )
        del inputs["position_ids"]  # peft drops them (with a warning) for prompt tuning anyway
    elif "position_ids" not in inputs and right_padded(inputs.get("attention_mask")):
        del inputs["attention_mask"]
    mask = inputs.get("attention_mask")
    if mask is not None and mask.ndim == 4 and attention_of(model) == "eager":
        inputs["attention_mask"] = additive_mask(mask, next(model.parameters()).dtype)
    return inputs


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean 4D mask (True = may attend) as eager attention adds it to the scores."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def right_padded(mask: torch.Tensor | None) -> bool:
    """True when every row is real tokens then padding (ones, then zeros).

    Such a mask can be dropped: under causal attention no real token sees the padding after
    it, so the real positions come out the same, and attention takes its fast unmasked path
    (`is_causal`) instead of building a (B, 1, T, T) mask. Pad positions have no targets.
    A 4D mask (a custom pattern, e.g. `data.shared_prompt`) is never dropped.
    """
    if mask is None or mask.ndim != 2:
        return False
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


class OutputHead(nn.Module):
    """The LM head followed by the family's logit transform: softcap(scale * (x W^T + b))."""

    def __init__(self, linear: nn.Module, scale: float = 1.0, softcap: float | None = None):
        super().__init__()
        self.linear, self.scale, self.softcap = linear, scale, softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return transform_logits(self.linear(hidden), self.scale, self.softcap)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64, for tests)."""
    return x if x.dtype == torch.float64 else x.float()


def transform_logits(logits: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def output_head(model: nn.Module) -> OutputHead:
    """The (peft-aware) output head of `model`, with its family's logit transform."""
    base = base_model(model)
    config = base.config.get_text_config()
    # Cohere multiplies the logits by `logit_scale`; Granite divides them by `logits_scaling`
    # and MiniCPM3 divides the hidden states by it, which is the same for its bias-free head.
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    divide = getattr(config, "logits_scaling", None)
    if divide:
        scale /= float(divide)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma-2/3
    return OutputHead(base.get_output_embeddings(), scale, softcap)


def check_head(model: nn.Module, hidden_last: torch.Tensor, logits_last: torch.Tensor) -> None:
    """Raise if `output_head(model)` does not reproduce the model's own last-position logits."""
    head = output_head(model)
    if model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in head.modules()):
        return  # the head itself is random in training: nothing stable to compare
    with torch.no_grad():
        ours = head(hidden_last).float()
        theirs = logits_last.detach().reshape(ours.shape).float()
    tol = 1e-4 if logits_last.dtype in (torch.float32, torch.float64) else 2e-2
    diff = float((ours - theirs).abs().max()) if ours.numel() else 0.0
    if diff > tol * (1.0 + float(theirs.abs().max())):
        name = type(base_model(model)).__name__
        raise UserError(
            f"model: {name} computes its logits in a way posttrain.losses.lm does not reproduce "
            f"(max difference {diff:.3g}); please report it"
        )


# ----------------------------------------------------------------------------- losses


def lm_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 4096
) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over positions with `targets != -100`, and their count.

    `batch["targets"]` (B, T) is pre-shifted: targets[b, t] is the token to predict at position t.
    """
    hidden = final_hidden(model, batch)  # (B, T, H)
    targets = batch["targets"]  # (B, T)
    keep = targets != IGNORE_INDEX  # (B, T)
    rows, labels = hidden[keep], targets[keep]  # (N, H), (N,)
    return linear_cross_entropy(rows, output_head(model), labels, chunk_size), int(labels.numel())


def linear_cross_entropy(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_size: int = 4096
) -> torch.Tensor:
    """Sum over rows of -log softmax(head(hidden))[target], never holding more than (chunk, V) logits.

    hidden (N, H), targets (N,) valid ids; returns a float32 scalar.
    """
    parts = linear_parts(head)
    if parts is None:
        return chunked_sum(hidden, head, targets, chunk_size, chunk_cross_entropy)
    weight, bias, scale, softcap = parts
    trainable = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    if not (torch.is_grad_enabled() and trainable):
        with torch.no_grad():
            return chunked_sum(hidden, head, targets, chunk_size, chunk_cross_entropy)
    return FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, scale, softcap, chunk_size)


def token_logprobs(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_size: int = 4096
) -> torch.Tensor:
    """log p(target) per row, (N,) float32, with gradient; logits are recomputed per chunk in backward."""
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            pieces.append(checkpoint(chunk_logprobs, head, h, t, use_reentrant=False))
        else:
            pieces.append(chunk_logprobs(head, h, t))
    if not pieces:
        return upcast(hidden.new_zeros(0))
    return torch.cat(pieces)


def chunk_logprobs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = upcast(head(hidden))  # (C, V)
    return logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(-1)  # (C,)


def row_logprobs(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(target) per row, targets per row), both (R,) float32, from (R, T, H)
    hidden states and (R, T) targets (IGNORE_INDEX where nothing is predicted)."""
    keep = targets != IGNORE_INDEX
    logps = token_logprobs(hidden[keep], head, targets[keep])  # (N,)
    row = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)[keep]
    sums = torch.zeros(targets.shape[0], device=logps.device, dtype=logps.dtype)
    return sums.index_add(0, row, logps), keep.sum(1).to(logps.dtype)


def chunk_cross_entropy(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    return F.cross_entropy(upcast(head(hidden)), targets, reduction="sum")


def chunked_sum(hidden, head, targets, chunk_size, fn) -> torch.Tensor:
    """sum_k fn(head, hidden_k, targets_k), each chunk checkpointed when gradients are needed."""
    total = upcast(hidden.sum() * 0.0)  # keeps the graph when N == 0
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(fn, head, h, t, use_reentrant=False)
        else:
            total = total + fn(head, h, t)
    return total


def linear_parts(head: nn.Module):
    """(weight, bias, scale, softcap) when `head` is a plain nn.Linear (optionally in an OutputHead)."""
    scale, softcap = 1.0, None
    if isinstance(head, OutputHead):
        head, scale, softcap = head.linear, head.scale, head.softcap
    if type(head) is not nn.Linear or type(head.weight) is not nn.Parameter:
        return None  # peft wrappers, quantized layers, DTensor shards: go through the module
    return head.weight, head.bias, scale, softcap


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on, else the wider of the two inputs."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Chunked linear + cross-entropy whose gradients are computed during the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, softcap, chunk_size):
        dtype = compute_dtype(hidden, weight)
        w = weight.to(dtype)  # (V, H)
        b = bias.to(dtype) if bias is not None else None  # (V,)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None  # (N, H), every row is written
        grad_w = upcast(torch.zeros_like(weight)) if need_w else None  # (V, H)
        grad_b = upcast(torch.zeros_like(bias)) if need_b else None  # (V,)
        loss = upcast(torch.zeros((), dtype=dtype, device=hidden.device))
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            h, t = hidden[start:end].to(dtype), targets[start:end]  # (C, H), (C,)
            rows = torch.arange(end - start, device=h.device)  # (C,)
            logits = transform_logits(upcast(F.linear(h, w, b)), scale, softcap)  # (C, V) fp32
            lse = logits.logsumexp(-1)  # (C,)
            loss += (lse - logits[rows, t]).sum()
            # logits = c tanh(s / c) with s = scale z: dlogits/dz = scale (1 - (logits / c)^2)
            slope = 1.0 - (logits / softcap).square_() if softcap else None  # (C, V)
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place: (C, V)
            grad[rows, t] -= 1.0  # dL/dlogits
            if slope is not None:
                grad.mul_(slope)
                del slope
            if scale != 1.0:
                grad.mul_(scale)
            grad = grad.to(dtype)  # dL/dz, (C, V)
            if grad_h is not None:
                grad_h[start:end] = grad @ w
            if grad_w is not None:
                grad_w += grad.T @ h
            if grad_b is not None:
                grad_b += grad.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_loss).to(w_dtype)
        if grad_b is not None:
            grad_b = (grad_b * grad_loss).to(b_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None
