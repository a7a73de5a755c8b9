"""Mean residual-stream activations at the post-instruction positions, at every layer.

Prompts go through the chat template with the generation prompt, as a chat user would send
them. The post-instruction positions are the template tokens after the user's message up to
the end of the generation prompt (ChatML: `<|im_end|>`, `\\n`, `<|im_start|>`, `assistant`,
`\\n`): `post_instruction_length(tok)` counts them, and the last `positions` tokens of every
prompt are read. Batches are left-padded (`evaluate.generate.encode_batches`), so those are
the last columns of every row.

Layer indexing: activation[l] is the residual stream entering block l, captured by a forward
pre-hook on the block (Arditi et al.'s resid_pre). With `output_hidden_states=True` the same
tensor is `hidden_states[l]`: hidden_states[0] is the embedding output (already scaled for
Gemma, with position embeddings for GPT-2) and hidden_states[i+1] is block i's output, while
the last entry has the final norm applied in some models. We hook instead and never read that
last entry. The forward stops at the last block's input, so no logits are computed.

Memory: only running fp64 sums of shape (layers, positions, hidden) are kept, never the
activations of all prompts. Simplified on purpose: the same number of positions for every
prompt, counted on one rendered template.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from posttrain.evaluate.generate import Prompt, device_of, encode_batches, eval_mode, render
from posttrain.steer.residual import ResidualLayout, discover

SENTINEL = "XYZZY"


class _StopForward(Exception):
    """Raised by the last block's pre-hook: nothing after it is needed."""


def post_instruction_length(tok) -> int:
    """How many template tokens follow the user's message in a rendered prompt."""
    text = render(tok, [SENTINEL])[0]
    suffix = text[text.rindex(SENTINEL) + len(SENTINEL) :]
    return max(1, len(tok(suffix, add_special_tokens=False)["input_ids"]))


def _capture_hook(sums: torch.Tensor, layer: int, positions: int, stop: bool):
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]  # (B, T, d)
        sums[layer] += x[:, -positions:, :].double().sum(0).cpu()  # (P, d)
        if stop:
            raise _StopForward

    return hook


def mean_activations(
    model: nn.Module,
    tok,
    prompts: Sequence[Prompt],
    positions: int | None = None,
    batch_size: int = 32,
    layout: ResidualLayout | None = None,
) -> torch.Tensor:
    """(layers, positions, hidden) fp32 mean over `prompts` of the stream entering each block.

    `positions` defaults to `post_instruction_length(tok)`; position p of the result is the
    p-th of the last `positions` tokens (the last one is the token before the reply).
    """
    if not prompts:
        raise ValueError("mean_activations needs at least one prompt")
    layout = layout or discover(model)
    positions = positions or post_instruction_length(tok)
    n_layers = len(layout.blocks)
    sums = torch.zeros(n_layers, positions, layout.hidden_size, dtype=torch.float64)
    handles = [
        block.register_forward_pre_hook(
            _capture_hook(sums, i, positions, stop=i == n_layers - 1), with_kwargs=True
        )
        for i, block in enumerate(layout.blocks)
    ]
    device = device_of(model)
    try:
        with eval_mode(model):
            for _, batch in encode_batches(tok, render(tok, prompts), batch_size, chat=True):
                if not bool(batch["attention_mask"][:, -positions:].all()):
                    raise ValueError(f"a prompt has fewer than {positions} tokens")
                with contextlib.suppress(_StopForward):
                    model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return (sums / len(prompts)).float()
