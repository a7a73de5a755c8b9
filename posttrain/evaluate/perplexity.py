"""Held-out perplexity: exp of the mean next-token negative log-likelihood over texts.

Each text is tokenized (with the tokenizer's default special tokens), cut into windows of
`max_length` tokens that are scored independently, and every predicted token counts once,
so long texts weigh more than short ones. A model with uniform logits scores exactly the
vocabulary size.

Simplified on purpose: non-overlapping windows (no sliding stride), so the first tokens of
each window are predicted with little context.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from posttrain.evaluate.generate import device_of, eval_mode


def windows(tok, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token windows of at most `max_length` (windows shorter than 2 tokens are dropped)."""
    out = []
    for text in texts:
        ids = tok(text)["input_ids"]
        out += [ids[i : i + max_length] for i in range(0, len(ids), max_length)]
    return [w for w in out if len(w) >= 2]


def perplexity(
    model, tok, texts: Sequence[str], max_length: int = 512, batch_size: int = 8
) -> dict:
    """{"perplexity", "nll" (mean per token, nats), "n_tokens" (tokens predicted)}."""
    chunks = sorted(windows(tok, texts, max_length), key=len, reverse=True)
    device, total, count = device_of(model), 0.0, 0
    with eval_mode(model):
        for start in range(0, len(chunks), batch_size):
            batch = chunks[start : start + batch_size]
            width = max(len(c) for c in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for row, c in enumerate(batch):
                ids[row, : len(c)] = torch.tensor(c)
                labels[row, : len(c)] = torch.tensor(c)
            mask = (labels != -100).long()
            logits = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
            ).logits
            nll = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1),  # (B*(T-1), V)
                labels[:, 1:].to(device).flatten(),
                ignore_index=-100,
                reduction="sum",
            )
            total += float(nll)
            count += int((labels[:, 1:] != -100).sum())
    nll = total / count if count else float("nan")
    return {"perplexity": math.exp(nll) if count else float("nan"), "nll": nll, "n_tokens": count}
