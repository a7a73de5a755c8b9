"""Mean residual-stream activations at the post-instruction positions, at every stream point.

Prompts go through the chat template with the generation prompt, as a chat user would send
them. The post-instruction positions are the template tokens after the user's message up to
the end of the generation prompt (ChatML: `<|im_end|>`, `\\n`, `<|im_start|>`, `assistant`,
`\\n`): `post_instruction_length(tok)` counts them, and the last `positions` tokens of every
prompt are read. Batches are left-padded (`evaluate.generate.encode_batches`), so those are
the last columns of every row.

Layer indexing: activation[l] for l < L is the residual stream entering block l, captured by a
forward pre-hook on the block (Arditi et al.'s resid_pre); activation[L] is the last block's
output, before the final norm (the stream the unembedding reads), captured by a forward hook.
With `output_hidden_states=True` the first L are `hidden_states[l]`: hidden_states[0] is the
embedding output (already scaled for Gemma, with position embeddings for GPT-2) and
hidden_states[i+1] is block i's output, while the last entry has the final norm applied in
some models, which is why we hook instead. The forward stops after the last block, so no
logits are computed. The final point matters in very shallow models (the tiny world's four
layers) where the last block itself reads the behaviour off the prompt and writes it.

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
    """Raised by the last block's forward hook: nothing after it is needed."""


def post_instruction_length(tok) -> int:
    """How many template tokens follow the user's message in a rendered prompt."""
    text = render(tok, [SENTINEL])[0]
    suffix = text[text.rindex(SENTINEL) + len(SENTINEL) :]
    return max(1, len(tok(suffix, add_special_tokens=False)["input_ids"]))


def _add_to(sums: torch.Tensor, layer: int, positions: int, x: torch.Tensor) -> None:
    sums[layer] += x[:, -positions:, :].double().sum(0).cpu()  # (B, T, d) -> (P, d)


def _input_hook(sums: torch.Tensor, layer: int, positions: int):
    def hook(module, args, kwargs):
        _add_to(sums, layer, positions, args[0] if args else kwargs["hidden_states"])

    return hook


def _output_hook(sums: torch.Tensor, layer: int, positions: int):
    def hook(module, args, output):
        _add_to(sums, layer, positions, output[0] if isinstance(output, tuple) else output)
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
    """(layers + 1, positions, hidden) fp32 means over `prompts` of the stream entering each
    block, then of the last block's output.

    `positions` defaults to `post_instruction_length(tok)`; position p of the result is the
    p-th of the last `positions` tokens (the last one is the token before the reply).
    """
    if not prompts:
        raise ValueError("mean_activations needs at least one prompt")
    layout = layout or discover(model)
    positions = positions or post_instruction_length(tok)
    n_layers = len(layout.blocks)
    sums = torch.zeros(n_layers + 1, positions, layout.hidden_size, dtype=torch.float64)
    handles = [
        block.register_forward_pre_hook(_input_hook(sums, i, positions), with_kwargs=True)
        for i, block in enumerate(layout.blocks)
    ]
    handles.append(layout.blocks[-1].register_forward_hook(_output_hook(sums, n_layers, positions)))
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
