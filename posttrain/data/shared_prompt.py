"""Pairs as one row each: the shared prompt once, then response A, then response B.

A preference pair (chosen, rejected; or KTO's labelled and mismatched completion) is two
sequences that begin with the same prompt. Run as two rows, the prompt goes through the model
twice. Here each pair becomes one row

    [prompt (k tokens) | rest of A | rest of B]      positions 0..k-1 | k.. | k..

with a (B, 1, L, L) boolean attention mask (True = may attend): causal, except that B's tokens
do not see A's. Every token of A and B then sees exactly what it sees in its own row, at the
same position, so the log-probs equal the two-row forward (tested to float tolerance on every
supported family) while the prompt's tokens are computed once: with prompts as long as the
two responses together, a third fewer tokens per pair.

k is the longest common prefix of the two sequences (0 when they differ from the first token:
then B sees none of A), cut so that nothing before its last position is trained (targets are pre-shifted: position t predicts token t+1). The prompt's last
position predicts the first token of both responses, so it is a target of both, with each
response's own token: `targets` is (B, 2, L), one row of targets per response.

Used where the attention takes a 4D mask (sdpa, eager); flash-attention and prompt/prefix
tuning (virtual tokens change the length) keep two rows (`train/dpo.py` decides). Simplified on
purpose: pairs only (K = 2), right padding at position 0; padded positions attend causally to
the row (their outputs are never read).
"""

from __future__ import annotations

import torch

IGNORE = -100


def shared_length(a: dict, b: dict) -> int:
    """k: tokens the two responses share at the front, up to the first trained position."""
    ids_a, ids_b = a["input_ids"], b["input_ids"]
    common = 0
    for x, y in zip(ids_a, ids_b):
        if x != y:
            break
        common += 1
    first_trained = min(next(t for t, v in enumerate(r["targets"]) if v != IGNORE) for r in (a, b))
    return min(common, first_trained + 1)


def row_length(example: dict) -> int:
    """The length of an example's one row: both responses, their shared front once."""
    a, b = example["responses"]
    return len(a["input_ids"]) + len(b["input_ids"]) - shared_length(a, b)


def pair_row(a: dict, b: dict) -> tuple[list[int], list[int], list[int], list[int], int]:
    """(ids, positions, targets of A, targets of B, k) of one pair's row."""
    k = shared_length(a, b)
    ids = a["input_ids"] + b["input_ids"][k:]
    positions = list(range(len(a["input_ids"]))) + list(range(k, len(b["input_ids"])))
    targets_a = list(a["targets"]) + [IGNORE] * (len(b["input_ids"]) - k)
    targets_b = [IGNORE] * len(a["input_ids"]) + list(b["targets"][k:])
    if k:
        targets_b[k - 1] = b["targets"][k - 1]  # the prompt's last position predicts both
    return ids, positions, targets_a, targets_b, k


def pair_mask(k: int, len_a: int, length: int, width: int) -> torch.Tensor:
    """(width, width) bool: causal over the row, B's tokens (from len_a on) blind to A's rest."""
    mask = torch.ones(width, width, dtype=torch.bool).tril()
    mask[len_a:length, k:len_a] = False
    return mask


def collate_shared(examples: list[dict], spec: list[list[int]], pad_id: int) -> dict:
    """One row per pair (see the module doc): input_ids, position_ids (B, L), attention_mask
    (B, 1, L, L), targets (B, 2, L); margin, label and ref_logps as `collate_ranked`; `tokens`
    counts the real tokens of both responses' full sequences (what two rows would hold)."""
    pairs = [examples[i] for group in spec for i in group]
    rows = [pair_row(*p["responses"]) for p in pairs]
    width = max(len(r[0]) for r in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    positions = torch.zeros((B, width), dtype=torch.long)
    targets = torch.full((B, 2, width), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, 1, width, width), dtype=torch.bool)
    for n, ((row_ids, pos, t_a, t_b, k), pair) in enumerate(zip(rows, pairs)):
        length, len_a = len(row_ids), len(pair["responses"][0]["input_ids"])
        ids[n, :length] = torch.tensor(row_ids)
        positions[n, :length] = torch.tensor(pos)
        targets[n, 0, :length], targets[n, 1, :length] = torch.tensor(t_a), torch.tensor(t_b)
        mask[n, 0] = pair_mask(k, len_a, length, width)
    batch = {"input_ids": ids, "position_ids": positions, "attention_mask": mask,
             "targets": targets, "k": torch.tensor(2)}  # fmt: skip
    batch["margin"] = torch.tensor([p["margin"] for p in pairs], dtype=torch.float32)
    batch["tokens"] = torch.tensor(sum(len(r["input_ids"]) for p in pairs for r in p["responses"]))
    if "label" in pairs[0]:
        batch["label"] = torch.tensor([p["label"] for p in pairs], dtype=torch.bool)
    if "ref_logps" in pairs[0]:
        batch["ref_logps"] = torch.tensor([p["ref_logps"] for p in pairs], dtype=torch.float32)
    return batch
