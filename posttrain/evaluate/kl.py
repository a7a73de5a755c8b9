"""KL divergence of a model to a reference model (same tokenizer) on prompts.

- `first_token_kl`: mean over prompts of KL(p_model || p_ref) between the two next-token
  distributions at the last prompt position (right after the assistant header). Cheap and
  what abliteration papers report on harmless prompts.
- `response_kl`: the model greedily answers each prompt; the mean per-token
  KL(p_model || p_ref) over the answer tokens (teacher-forced, both models), plus the mean
  summed KL per answer (the quantity RLHF's KL penalty bounds).

Both are exact sums over the vocabulary, not sampled estimates. Simplified on purpose:
greedy answers, one device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from posttrain.evaluate.generate import Prompt, device_of, eval_mode, generate_ids, last_logits


def kl_rows(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """(...,) KL(softmax(p) || softmax(q)) over the last dimension."""
    logp = torch.log_softmax(logits_p.float(), dim=-1)
    logq = torch.log_softmax(logits_q.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def first_token_kl(model, ref_model, tok, prompts: Sequence[Prompt], batch_size: int = 64) -> dict:
    """{"kl": mean first-token KL(model || ref), "n"}."""
    p = last_logits(model, tok, prompts, batch_size)
    q = last_logits(ref_model, tok, prompts, batch_size)
    if p.shape != q.shape:
        raise ValueError(f"the models' vocabularies differ: {tuple(p.shape)} vs {tuple(q.shape)}")
    kl = kl_rows(p, q) if len(p) else torch.zeros(0)
    return {"kl": float(kl.mean()) if len(kl) else 0.0, "n": len(kl)}


def _sequence_logits(model, batch: list[list[int]], pad: int) -> torch.Tensor:
    """(B, T, V) logits for right-padded sequences."""
    width = max(len(s) for s in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(batch):
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, : len(s)] = 1
    device = device_of(model)
    with eval_mode(model):
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return out.logits.float().cpu()


def response_kl(
    model,
    ref_model,
    tok,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 32,
    batch_size: int = 32,
) -> dict:
    """{"kl_per_token", "kl_per_response", "n", "n_tokens"} on the model's greedy answers."""
    pairs = generate_ids(model, tok, prompts, max_new_tokens, batch_size)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    total, per_response, n_tokens = 0.0, [], 0
    for start in range(0, len(pairs), batch_size):
        chunk = [(p, r) for p, r in pairs[start : start + batch_size]]
        seqs = [p + r for p, r in chunk]
        lp, lq = _sequence_logits(model, seqs, pad), _sequence_logits(ref_model, seqs, pad)
        for row, (p, r) in enumerate(chunk):
            span = slice(len(p) - 1, len(p) - 1 + len(r))  # positions that predict the answer
            kl = kl_rows(lp[row, span], lq[row, span])  # (len(r),)
            total += float(kl.sum())
            per_response.append(float(kl.sum()))
            n_tokens += len(r)
    return {
        "kl_per_token": total / n_tokens if n_tokens else 0.0,
        "kl_per_response": sum(per_response) / len(per_response) if per_response else 0.0,
        "n": len(per_response),
        "n_tokens": n_tokens,
    }
