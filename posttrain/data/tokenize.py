"""Tokenize SFT rows into `{"input_ids", "targets"}` examples with pre-shifted targets.

`targets[i]` is the token the model must predict at position i (`input_ids[i+1]` when that
token is trained) or -100; the last position's target is always -100. Because targets are
shifted here, packed rows never ask an example to predict the next example's first token,
and the loss is a plain cross-entropy of `logits` against `targets`.

What is trained, per normalised format (see formats.py):

- text: every token; the tokenizer's own special tokens (BOS if it adds one) then EOS.
- prompt/completion strings: `tokenizer(prompt)` + `tokenizer(completion, no specials)` +
  EOS; the completion and EOS are trained. No chat template (as TRL's standard
  prompt-completion).
- messages: the chat template's rendering (plus BOS when the tokenizer adds one and the
  template does not write it); the assistant turns and their end-of-turn tokens are
  trained (chat.py).

EOS is found by position, never by id, so it is trained even when pad == eos.
Examples longer than `max_length` keep their start and are counted as `truncated`; those
left with no trained token are dropped and counted as `dropped_no_target` (not also as
truncated).

Simplified on purpose: everything is tokenized eagerly into Python lists (no caching on
disk, no multiprocessing); the tokenizer's batch call does the heavy lifting.
"""

from __future__ import annotations

from typing import Any

from posttrain.data.chat import (
    bos_to_prepend,
    ensure_chat_template,
    mask_from_offsets,
    render_spans,
    tokenize_pieces,
    with_bos,
)
from posttrain.data.formats import to_sft_example
from posttrain.data.load import Row
from posttrain.errors import UserError

IGNORE = -100
Encoded = tuple[list[int], list[int]]  # token ids, 0/1 "this token is trained"


def tokenize_sft(
    rows: list[Row], tokenizer: Any, max_length: int, fmt: str = "auto"
) -> tuple[list[dict], dict]:
    """Examples `{"input_ids", "targets"}` (lists of ints) for `rows`, and counting stats."""
    normal = [to_sft_example(where, row, fmt) for where, row in rows]
    encoded = encode_examples([where for where, _ in rows], normal, tokenizer)
    examples: list[dict] = []
    stats = {"examples": 0, "truncated": 0, "dropped_no_target": 0, "tokens": 0, "target_tokens": 0}
    for ids, mask in encoded:
        cut = len(ids) > max_length
        targets = shifted_targets(ids[:max_length], mask[:max_length])
        trained = sum(t != IGNORE for t in targets)
        if trained == 0:
            stats["dropped_no_target"] += 1
            continue
        examples.append({"input_ids": ids[:max_length], "targets": targets})
        stats["truncated"] += cut
        stats["tokens"] += len(targets)
        stats["target_tokens"] += trained
    stats["examples"] = len(examples)
    if rows and not examples:
        raise UserError(
            f"no example has a trained token within max_length={max_length} "
            "(prompts are longer than max_length?); raise max_length"
        )
    return examples, stats


def shifted_targets(ids: list[int], mask: list[int]) -> list[int]:
    """targets[i] = ids[i+1] where token i+1 is trained, else -100; the last is -100."""
    return [nxt if m else IGNORE for nxt, m in zip(ids[1:], mask[1:])] + [IGNORE]


def encode_examples(wheres: list[str], normal: list[dict], tokenizer: Any) -> list[Encoded]:
    """(ids, trained mask) per normalised example, batch-tokenizing each kind together."""
    kinds: dict[str, list[int]] = {"text": [], "prompt": [], "messages": []}
    for i, example in enumerate(normal):
        kinds[next(k for k in kinds if k in example)].append(i)
    out: list[Encoded] = [([], [])] * len(normal)
    if kinds["text"]:
        texts = [normal[i]["text"] for i in kinds["text"]]
        _place(out, kinds["text"], encode_texts(tokenizer, texts))
    if kinds["prompt"]:
        pairs = [(normal[i]["prompt"], normal[i]["completion"]) for i in kinds["prompt"]]
        _place(out, kinds["prompt"], encode_prompt_completions(tokenizer, pairs))
    if kinds["messages"]:
        idx = kinds["messages"]
        convs = [normal[i]["messages"] for i in idx]
        _place(out, idx, encode_conversations(tokenizer, [wheres[i] for i in idx], convs))
    return out


def _place(out: list[Encoded], indices: list[int], values: list[Encoded]) -> None:
    for i, value in zip(indices, values):
        out[i] = value


def encode_texts(tokenizer: Any, texts: list[str]) -> list[Encoded]:
    eos = eos_id(tokenizer)
    result = []
    for ids in tokenizer(texts)["input_ids"]:
        ids = list(ids)
        if not ids or ids[-1] != eos:
            ids.append(eos)
        result.append((ids, [1] * len(ids)))
    return result


def encode_prompt_completions(tokenizer: Any, pairs: list[tuple[str, str]]) -> list[Encoded]:
    eos = eos_id(tokenizer)
    prompts = tokenizer([p for p, _ in pairs])["input_ids"]
    completions = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"]
    result = []
    for p, c in zip(prompts, completions):
        ids = list(p) + list(c) + [eos]
        result.append((ids, [0] * len(p) + [1] * (len(c) + 1)))
    return result


def encode_conversations(
    tokenizer: Any, wheres: list[str], convs: list[list[dict]]
) -> list[Encoded]:
    ensure_chat_template(tokenizer)
    rendered = []
    for where, messages in zip(wheres, convs):
        try:
            rendered.append(render_spans(tokenizer, messages))
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    bos = bos_to_prepend(tokenizer)
    if not getattr(tokenizer, "is_fast", False):
        return [with_bos(*tokenize_pieces(tokenizer, text, spans), bos) for text, spans in rendered]
    texts = [text for text, _ in rendered]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [
        with_bos(list(ids), mask_from_offsets(offsets, spans), bos)
        for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered)
    ]


def eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        model = getattr(tokenizer, "name_or_path", "") or "this model"
        raise UserError(
            f"the tokenizer of {model} has no eos_token; text and prompt_completion data need one"
        )
    return int(eos)
