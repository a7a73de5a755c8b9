"""Batched greedy generation and last-position logits, through the chat template.

Prompts are user messages (strings) or message lists; with `chat=True` they go through the
tokenizer's chat template with the generation prompt, otherwise they are raw text to
continue. Batches are left-padded (so every row's next token sits at the last position),
sorted by length to waste little padding, and results come back in the input order.
Generation stops at eos, `<|im_end|>` or `<|endoftext|>`, whichever the tokenizer has.

Simplified on purpose: greedy only, HF `generate` with its KV cache, one device.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers import GenerationConfig

Prompt = str | list[dict]
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def render(tok, prompts: Sequence[Prompt], chat: bool = True) -> list[str]:
    """Prompt texts: chat-templated with the generation prompt, or raw when `chat=False`."""
    if not chat:
        return [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
    out = []
    for p in prompts:
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else p
        out.append(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return out


def stop_token_ids(tok) -> list[int]:
    """eos plus `<|im_end|>` / `<|endoftext|>` when the vocabulary has them."""
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    vocab = tok.get_vocab()
    ids += [vocab[t] for t in STOP_TOKENS if t in vocab and vocab[t] not in ids]
    return ids


def pad_id(tok) -> int:
    if tok.pad_token_id is not None:
        return tok.pad_token_id
    return tok.eos_token_id if tok.eos_token_id is not None else 0


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def cache_keyword(model) -> str:
    """The keyword a model's forward takes its KV cache by: `cache` in recent transformers 5
    releases (where `past_key_values` is deprecated, to be removed in 5.40), else
    `past_key_values`. A peft wrapper is looked through."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def returned_cache(output):
    """The KV cache a forward returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@contextmanager
def eval_mode(model):
    """Eval mode and no autograd inside; the model's training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def encode_batches(
    tok, texts: Sequence[str], batch_size: int, chat: bool
) -> Iterator[tuple[list[int], dict]]:
    """(indices, left-padded tensors with position_ids) for length-sorted batches of `texts`."""
    ids = [tok(t, add_special_tokens=not chat)["input_ids"] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(ids[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad_id(tok), dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
            mask[row, width - len(ids[i]) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        yield idx, {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}


def generate_ids(
    model,
    tok,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 32,
    batch_size: int = 64,
    chat: bool = True,
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, new ids up to and including the first stop token) per prompt, greedy."""
    stops = stop_token_ids(tok)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad_id(tok)
    )
    out: list = [None] * len(prompts)
    device = device_of(model)
    with eval_mode(model):
        for idx, batch in encode_batches(tok, render(tok, prompts, chat), batch_size, chat):
            mask = batch["attention_mask"]
            gen = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=mask.to(device),
                generation_config=config,
            ).cpu()
            width = batch["input_ids"].shape[1]
            for row, i in enumerate(idx):
                prompt_ids = batch["input_ids"][row, width - int(mask[row].sum()) :].tolist()
                out[i] = (prompt_ids, cut_at_stop(gen[row, width:].tolist(), stops))
    return out


def cut_at_stop(ids: list[int], stops: list[int]) -> list[int]:
    """Ids up to and including the first stop id (all of them when none occurs)."""
    for k, t in enumerate(ids):
        if t in stops:
            return ids[: k + 1]
    return ids


def generate(
    model,
    tok,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 32,
    batch_size: int = 64,
    chat: bool = True,
) -> list[str]:
    """Greedy replies (special tokens dropped) to `prompts`, in order."""
    pairs = generate_ids(model, tok, prompts, max_new_tokens, batch_size, chat)
    return [tok.decode(new, skip_special_tokens=True) for _, new in pairs]


def last_logits(
    model, tok, prompts: Sequence[Prompt], batch_size: int = 64, chat: bool = True
) -> torch.Tensor:
    """(N, V) float32 next-token logits at the last prompt position, in input order."""
    device, rows = device_of(model), [None] * len(prompts)
    with eval_mode(model):
        for idx, batch in encode_batches(tok, render(tok, prompts, chat), batch_size, chat):
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**batch, use_cache=False).logits[:, -1].float().cpu()  # (B, V)
            for row, i in enumerate(idx):
                rows[i] = logits[row]
    return torch.stack(rows) if rows else torch.empty(0)
