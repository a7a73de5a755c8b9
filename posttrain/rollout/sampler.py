"""Batched sampling with a KV cache for online RL: completions, their sampling log-probs, masks.

`sample(model, prompt_ids, ...)` left-pads the prompts, runs one prefill forward and then one
forward per new token with a KV cache, in a plain loop we control, so that every number the
trainer needs comes out exact:

- `logprobs[b, t]` = log softmax(logits / temperature)[token]: the log-prob of the chosen token
  under the temperature-scaled distribution **before** top-k / top-p truncation, i.e. exactly
  what the trainer recomputes from a forward pass of the full sequence (so the PPO ratio starts
  at 1). With top-k / top-p on, the tokens are drawn from the truncated, renormalised
  distribution but the log-probs stay untruncated (as vLLM's and TRL's do). With temperature 0
  (greedy) the log-probs are those of the plain softmax (temperature 1).
- Stopping: a row finishes at its first EOS id (kept as the last completion token) or when the
  decoded completion first contains a stop string (the token that completes it is the last one
  kept; the text may run a few characters past the stop string). `ended` is False for rows cut
  at `max_new_tokens` (for the truncation penalty).
- Randomness comes only from `generator` (a `torch.Generator` on the model's device), so a run
  seeded or restored with `generator.set_state` reproduces its samples exactly. A token is
  drawn by inverse CDF (`inverse_cdf`): one uniform number per row, located in the row's
  cumulative probabilities. `torch.multinomial` draws an exponential per vocabulary entry:
  when this was introduced (commit c8de463), a decode step with it was no faster than
  transformers' `generate`, and with inverse CDF it was 1.3x faster (`python benchmarks/sampling.py`).

What makes it fast (`python benchmarks/grpo.py` measures it against TRL):
- the prefill runs each distinct prompt once and copies its cache rows to the repeats (GRPO's
  G completions per prompt);
- the KV cache is allocated once for prompt + `max_new_tokens` and written in place
  (`rollout/cache.py`), instead of `DynamicCache`'s `cat` per token, which copies the cache;
- LoRA layers decode with the merged weight W + s B A (`modeling/fused.merged_lora`, CPU only),
  one matmul per layer instead of three. The log-probs still match the trainer's recomputation
  (which takes the unmerged path) to float rounding, not bit for bit; the base weights are
  never touched.

Simplified on purpose: one batch at a time (the caller chunks), finished rows keep decoding pad
tokens until the whole batch is done, no repetition penalty / min-p / beam search, and models
that need more than `input_ids` / `attention_mask` / `position_ids` (peft prefix or prompt
tuning, multimodal) are not supported. Random draws depend on the batch composition, so
sampling (not greedy decoding) is reproducible for the same batch, not across re-batching.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.evaluate.generate import Prompt, cache_keyword, device_of, render
from posttrain.modeling.fused import merged_lora
from posttrain.rollout.cache import preallocated_cache


@dataclass
class Rollout:
    """One batch of sampled completions (B rows, P prompt positions, T completion positions)."""

    prompt_ids: Tensor  # (B, P) left-padded
    prompt_mask: Tensor  # (B, P) 1 on real prompt tokens
    completion_ids: Tensor  # (B, T) right-padded with the pad id
    completion_mask: Tensor  # (B, T) 1 on real completion tokens (the EOS included)
    logprobs: Tensor  # (B, T) float32 sampling log-probs of the chosen tokens, 0 on padding
    ended: Tensor  # (B,) bool: stopped at an EOS id or a stop string (False: cut at the limit)

    def completions(self, tokenizer, skip_special_tokens: bool = True) -> list[str]:
        """Decoded completion texts, one per row."""
        return [
            tokenizer.decode(ids[: int(n)], skip_special_tokens=skip_special_tokens)
            for ids, n in zip(self.completion_ids.tolist(), self.completion_mask.sum(1))
        ]


@contextmanager
def eval_no_grad(model) -> Iterator[None]:
    """Eval mode under no_grad (not inference_mode: the outputs feed autograd later)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def encode_prompts(tokenizer, prompts: Sequence[Prompt], chat: bool = True) -> list[list[int]]:
    """Token ids per prompt: chat-templated with the generation prompt, or raw text."""
    texts = render(tokenizer, prompts, chat)
    return [tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts]


def left_pad(prompts: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    """(B, P) ids and mask, each prompt right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return ids, mask


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Logits with everything outside the top-k, then outside the top-p nucleus, set to -inf.

    top-p keeps the smallest set of most likely tokens whose probability reaches `top_p`
    (Holtzman et al., 2020), always at least one token. (B, V) -> (B, V).
    """
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the better tokens
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(
    logits: Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """(tokens (B,), their log-probs (B,)) from last-position logits (B, V); see module doc."""
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    scaled = logits / temperature
    probs = torch.softmax(filter_logits(scaled, top_k, top_p), dim=-1)
    uniforms = torch.rand(probs.shape[0], generator=generator, device=probs.device)
    tokens = inverse_cdf(probs, uniforms)
    return tokens, torch.log_softmax(scaled, -1).gather(-1, tokens[:, None])[:, 0]


def inverse_cdf(probs: Tensor, uniforms: Tensor) -> Tensor:
    """(B,) indices drawn from the rows of (B, V) `probs` (non-negative, any positive total)
    given one uniform number in [0, 1) per row: the first index whose cumulative mass exceeds
    u x the row's total. An index of zero probability is never drawn. Rows that are not
    finite (NaN or inf logits upstream) raise instead of drawing an arbitrary index."""
    cdf = probs.float().cumsum(-1)
    if not bool(torch.isfinite(cdf[:, -1]).all()):
        raise ValueError("sampling probabilities are not finite: the model produced NaN/inf logits")
    target = uniforms.to(cdf)[:, None] * cdf[:, -1:]
    picks = torch.searchsorted(cdf, target, right=True)[:, 0]
    return picks.clamp_(max=probs.shape[-1] - 1)


def hits_stop_string(tokenizer, ids: list[int], stop_strings: Sequence[str]) -> bool:
    """True when the text of the last few ids contains a stop string (checked every step, so a
    hit is always one the newest token completed)."""
    # A character is at most 4 byte-level tokens; the slack re-syncs a tail cut mid-character.
    window = 4 * max(len(s) for s in stop_strings) + 3
    tail = tokenizer.decode(ids[-window:], skip_special_tokens=False)
    return any(s in tail for s in stop_strings)


def sample(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    eos_token_ids: Sequence[int] = (),
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample one completion per prompt (token id lists) with a KV cache; see the module doc.

    `tokenizer` is needed only for `stop_strings`. Pass a seeded `generator` for reproducible
    samples (it must live on the model's device)."""
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or max_new_tokens < 1:
        raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 1")
    device = device_of(model)
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id)
    ids, mask = prompt_ids.to(device), prompt_mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    B = ids.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    ended = torch.zeros_like(done)
    tokens_out, logps_out, alive_out = [], [], []
    texts: list[list[int]] = [[] for _ in range(B)]
    cache = preallocated_cache(model.config, ids.shape[1] + max_new_tokens)
    kwargs = {cache_keyword(model): cache, "use_cache": True, "logits_to_keep": 1}
    with eval_no_grad(model), merged_lora(model):
        logits = prefill(model, cache, kwargs, ids, mask, positions)
        step_positions = positions[:, -1:]
        for _ in range(max_new_tokens):
            token, logp = next_tokens(logits, temperature, top_k, top_p, generator)
            alive = ~done
            token = torch.where(alive, token, torch.full_like(token, pad_token_id))
            tokens_out.append(token)
            logps_out.append(torch.where(alive, logp, torch.zeros_like(logp)))
            alive_out.append(alive)
            stopped = alive & torch.isin(token, eos)
            if stop_strings:
                stopped |= stop_string_rows(tokenizer, texts, token, alive, stop_strings)
            ended |= stopped
            done |= stopped
            if bool(done.all()) or len(tokens_out) == max_new_tokens:
                break
            step_positions = step_positions + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(input_ids=token[:, None], attention_mask=mask,
                        position_ids=step_positions, **kwargs)  # fmt: skip
            logits = out.logits[:, -1]
    completion_mask = torch.stack(alive_out, 1).long()
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=torch.stack(tokens_out, 1).cpu(),
        completion_mask=completion_mask.cpu(),
        logprobs=torch.stack(logps_out, 1).float().cpu(),
        ended=ended.cpu(),
    )


def prefill(model, cache, kwargs: dict, ids: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
    """Last-position logits (B, V) of the left-padded prompts, with their keys and values in
    `cache`. Each distinct prompt runs once and its cache rows are copied to its repeats (GRPO
    and RLOO sample G completions of every prompt, so this is G times less prefill)."""
    first: dict[tuple, int] = {}  # prompt -> its index among the distinct ones
    distinct: list[int] = []  # the row of each distinct prompt's first occurrence
    repeat: list[int] = []  # each row's distinct prompt
    for row, prompt in enumerate(ids.tolist()):
        index = first.setdefault(tuple(prompt), len(distinct))
        if index == len(distinct):
            distinct.append(row)
        repeat.append(index)
    keep = torch.tensor(distinct, device=ids.device)
    out = model(input_ids=ids[keep], attention_mask=mask[keep],
                position_ids=positions[keep], **kwargs)  # fmt: skip
    if len(distinct) == len(repeat):
        return out.logits[:, -1]
    rows = torch.tensor(repeat, device=ids.device)
    cache.batch_select_indices(rows)
    return out.logits[rows, -1]


def stop_string_rows(
    tokenizer, texts: list[list[int]], token: Tensor, alive: Tensor, stop_strings: Sequence[str]
) -> Tensor:
    """Append each live row's new token to its id list; True for rows that now hit a stop string."""
    hit = torch.zeros_like(alive)
    for row, (t, live) in enumerate(zip(token.tolist(), alive.tolist())):
        if live:
            texts[row].append(t)
            hit[row] = hits_stop_string(tokenizer, texts[row], stop_strings)
    return hit
