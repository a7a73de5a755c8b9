"""Preference data: rows with ranked responses to one prompt, tokenized per response.

Accepted rows:
- pairwise `{"prompt", "chosen", "rejected"}`; each side a string or a message list. When
  chosen and rejected are whole conversations, their shared leading messages are the prompt
  (plus `prompt` when given);
- ranked `{"prompt", "responses": [best, ..., worst]}` (K-wise reward models).

Every response becomes one sequence, prompt + response, encoded by the SFT machinery
(`tokenize.encode_examples`), so the response tokens (and the end-of-turn token) are the
"trained" ones. With a chat template, string prompts become a user turn and string responses
an assistant turn; without one, prompt and response are concatenated as text.

`tokenize_ranked` returns examples `{"responses": [{"input_ids", "targets"}, ...], "margin"}`
(best first; `margin` is the row's optional `margin` field, else 0) and counting stats. A row whose responses are all equal is dropped and counted, as is
a row where truncation to `max_length` leaves some response with no trained token.

Unpaired rows `{"prompt", "completion", "label"}` (KTO) go through `tokenize_unpaired`: each
example is the labelled completion plus a mismatched one, the previous row's completion after
this row's prompt, whose log-ratio estimates KL(policy || reference) (KTO's z0; TRL pairs rows
the same way within a batch). Pairwise rows are accepted there too, as two unpaired rows
(chosen desirable, rejected undesirable).

Simplified on purpose: every row of a file has the same number of responses.
"""

from __future__ import annotations

from typing import Any

from posttrain.data.formats import to_sft_example
from posttrain.data.tokenize import IGNORE, encode_examples, shifted_targets
from posttrain.errors import UserError

Row = tuple[str, dict]


def ranked_responses(where: str, row: dict) -> tuple[Any, list[Any]]:
    """(prompt, responses best first) of a pairwise or ranked row."""
    if "responses" in row:
        responses = row["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise UserError(f"{where}: `responses` must be a list of at least 2 (best first)")
        return row.get("prompt", ""), list(responses)
    for key in ("chosen", "rejected"):
        if key not in row:
            raise UserError(f"{where}: missing field {key!r} (expected prompt/chosen/rejected)")
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list) and "prompt" not in row:
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        return chosen[:shared], [chosen[shared:], rejected[shared:]]
    if "prompt" not in row:
        raise UserError(f"{where}: missing field 'prompt'")
    return row["prompt"], [chosen, rejected]


def as_sft_row(prompt: Any, response: Any, chat: bool) -> dict:
    """The prompt/completion row the SFT normaliser understands (chat turns when `chat`)."""
    if chat and isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}] if prompt else []
    if chat and isinstance(response, str):
        response = [{"role": "assistant", "content": response}]
    return {"prompt": prompt, "completion": response}


def encode_responses(items: list[tuple[str, Any, Any]], tokenizer: Any, max_length: int) -> list:
    """`{"input_ids", "targets", "truncated"}` (or None: nothing trained left) per
    (where, prompt, response)."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    normal = [to_sft_example(w, as_sft_row(p, r, chat)) for w, p, r in items]
    encoded = encode_examples([w for w, _, _ in items], normal, tokenizer)
    return [cut(e, max_length) for e in encoded]


def tokenize_ranked(rows: list[Row], tokenizer: Any, max_length: int) -> tuple[list[dict], dict]:
    """Examples `{"responses": [{"input_ids", "targets"}, ...]}` and stats (see module doc)."""
    stats = {"rows": len(rows), "examples": 0, "dropped_equal": 0, "dropped_no_target": 0}
    stats["truncated"] = 0
    groups, items, kept = [], [], []
    for where, row in rows:
        prompt, responses = ranked_responses(where, row)
        if all(r == responses[0] for r in responses[1:]):
            stats["dropped_equal"] += 1
            continue
        groups.append(len(responses))
        kept.append((where, row))
        items += [(where, prompt, response) for response in responses]
    if len(set(groups)) > 1:
        raise UserError("every row must have the same number of responses")
    encoded = iter(encode_responses(items, tokenizer, max_length))
    margins = [float(row.get("margin", 0.0)) for _, row in kept]
    examples = []
    for size, margin in zip(groups, margins):
        sides = [next(encoded) for _ in range(size)]
        if any(s is None for s in sides):
            stats["dropped_no_target"] += 1
            continue
        stats["truncated"] += sum(s.pop("truncated") for s in sides)
        examples.append({"responses": sides, "margin": margin})
    stats["examples"] = len(examples)
    if rows and not examples:
        raise UserError("no usable preference row (all dropped: equal responses or too long)")
    return examples, stats


def cut(encoded: tuple[list[int], list[int]], max_length: int) -> dict | None:
    """One response truncated to `max_length`, or None when no trained token is left."""
    ids, mask = encoded
    targets = shifted_targets(ids[:max_length], mask[:max_length])
    if all(t == IGNORE for t in targets):
        return None
    return {"input_ids": ids[:max_length], "targets": targets, "truncated": len(ids) > max_length}


def unpaired_rows(rows: list[Row]) -> list[tuple[str, Any, Any, bool]]:
    """(where, prompt, completion, desirable) per KTO row; a pair gives two rows."""
    out = []
    for where, row in rows:
        if "label" not in row and "chosen" in row:
            prompt, (chosen, rejected) = ranked_responses(where, row)
            out += [(where, prompt, chosen, True), (where, prompt, rejected, False)]
            continue
        for key in ("prompt", "completion", "label"):
            if key not in row:
                raise UserError(
                    f"{where}: missing field {key!r} (expected prompt/completion/label)"
                )
        if not isinstance(row["label"], bool):
            raise UserError(f"{where}: field 'label' must be true or false, got {row['label']!r}")
        out.append((where, row["prompt"], row["completion"], row["label"]))
    return out


def tokenize_unpaired(rows: list[Row], tokenizer: Any, max_length: int) -> tuple[list, dict]:
    """KTO examples `{"responses": [labelled, mismatched], "margin": 0, "label"}` and stats."""
    items = unpaired_rows(rows)
    stats = {"rows": len(rows), "examples": 0, "dropped_equal": 0, "dropped_no_target": 0}
    stats["truncated"] = 0
    if len(items) < 2:
        raise UserError("KTO needs at least 2 prompt/completion/label rows")
    mismatched = [items[i - 1][2] for i in range(len(items))]  # previous row's completion
    labelled = [(w, p, c) for w, p, c, _ in items]
    kl_side = [(w, p, m) for (w, p, _, _), m in zip(items, mismatched)]
    encoded = encode_responses(labelled + kl_side, tokenizer, max_length)
    examples = []
    for i, (_, _, _, label) in enumerate(items):
        sides = [encoded[i], encoded[len(items) + i]]
        if any(s is None for s in sides):
            stats["dropped_no_target"] += 1
            continue
        stats["truncated"] += int(sides[0]["truncated"])  # the mismatched side is not trained
        for side in sides:
            side.pop("truncated")
        examples.append({"responses": sides, "margin": 0.0, "label": label})
    stats["examples"] = len(examples)
    if not examples:
        raise UserError("no usable KTO row (all too long for max_length)")
    return examples, stats
