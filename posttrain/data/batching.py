"""Plan batches (length grouping or best-fit packing) and collate them into tensors.

`plan_batches` returns, for one epoch, a list of batches; a batch is a list of rows; a row is
a list of example indices (one without packing, several with packing). Plans depend only on
(seed, epoch), so a resumed run replays the same order.

- Without packing: length-grouped batching. Shuffle, cut into mega-chunks of 50 batches,
  sort each chunk by length (longest first), cut into batches, shuffle the batch order. A
  batch then holds examples of similar length, so padding is small, and order stays random.
- With packing: best-fit decreasing into rows of `max_length` tokens (each example goes
  into the open row with the least room that still fits it, found by bisection over the
  sorted distinct free capacities, of which there are at most max_length), then the rows
  are shuffled and grouped `batch_size` per batch. Ties in length are broken randomly per
  epoch, so row contents vary across epochs.

`collate` right-pads to the longest row. Unpacked batches get an `attention_mask`. Batches
where a row holds several examples get `position_ids` that restart at 0 for every example
(and for the padding) and NO attention mask: transformers (>= 5) then detects the packed
sequences from the position ids (`masking_utils.find_packed_sequence_indices`) and builds a
block-diagonal causal mask for sdpa and eager (tested on llama, qwen2, qwen3, mistral, gemma,
gpt2: each example's loss equals its loss alone), and absolute position embeddings (GPT-2)
see the same positions as an example alone. Targets are pre-shifted (tokenize.py), so no
example predicts its neighbour's first token.

Two caveats for callers, both checked against transformers 5.23:
- Call the model with `use_cache=False`. With the config default `use_cache=True` the model
  builds a `DynamicCache`, and `masking_utils` skips packed-sequence detection whenever a
  cache is present: examples in a row then silently attend to each other.
- flash-attention detects packing from `position_ids` only for batch size 1
  (`_is_packed_sequence` requires it); with more rows and no mask it would run plain causal
  attention across examples. Use `collate(..., flat=True)`, which concatenates the batch into
  one padding-free row, for flash-attention.

Simplified on purpose: one example never spans two rows (examples are truncated to
`max_length` beforehand); the last batch of an epoch may be smaller.
"""

from __future__ import annotations

import bisect
import random

import torch

IGNORE = -100
CHUNK_BATCHES = 50


def plan_batches(
    lengths: list[int], batch_size: int, max_length: int, packing: bool, seed: int, epoch: int
) -> list[list[list[int]]]:
    """Batches of rows of example indices for one epoch; deterministic in (seed, epoch)."""
    rng = random.Random(f"{seed}:{epoch}")  # a string seed: (1, 0) and (0, 1) differ
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if packing:
        rows = pack_rows(lengths, order, max_length)
        rng.shuffle(rows)
        return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    batches = []
    chunk = CHUNK_BATCHES * batch_size
    for start in range(0, len(order), chunk):
        mega = sorted(order[start : start + chunk], key=lambda i: -lengths[i])
        batches += [
            [[i] for i in mega[j : j + batch_size]] for j in range(0, len(mega), batch_size)
        ]
    rng.shuffle(batches)
    return batches


def pack_rows(lengths: list[int], order: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: rows of example indices whose lengths sum to <= capacity.

    `order` breaks ties between equal lengths (the sort is stable). An example longer than
    the capacity gets a row of its own.
    """
    rows: list[list[int]] = []
    free: list[int] = []  # sorted distinct free capacities of open rows
    open_rows: dict[int, list[int]] = {}  # free capacity -> row numbers
    for i in sorted(order, key=lambda i: -lengths[i]):
        need = lengths[i]
        k = bisect.bisect_left(free, need)
        if k < len(free):
            room = free[k]
            row = open_rows[room].pop()
            if not open_rows[room]:
                del open_rows[room]
                free.pop(k)
            rows[row].append(i)
            left = room - need
        else:
            row = len(rows)
            rows.append([i])
            left = capacity - need
        if left > 0:
            if left not in open_rows:
                bisect.insort(free, left)
                open_rows[left] = []
            open_rows[left].append(row)
    return rows


def collate(
    examples: list[dict], batch: list[list[int]], pad_id: int, flat: bool = False
) -> dict[str, torch.Tensor]:
    """Tensors for one batch: input_ids, targets and attention_mask or position_ids, (B, T).

    `flat=True` concatenates every example of the batch into one row without padding (B = 1)
    with restarting position_ids: the form flash-attention needs to keep examples apart.
    """
    if flat:
        batch = [[i for row in batch for i in row]]
    packed = flat or any(len(row) > 1 for row in batch)
    width = max(sum(len(examples[i]["input_ids"]) for i in row) for row in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    targets = torch.full((len(batch), width), IGNORE, dtype=torch.long)  # (B, T)
    positions = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    for b, row in enumerate(batch):
        at = 0
        for i in row:
            n = len(examples[i]["input_ids"])
            ids[b, at : at + n] = torch.tensor(examples[i]["input_ids"])
            targets[b, at : at + n] = torch.tensor(examples[i]["targets"])
            positions[b, at : at + n] = torch.arange(n)
            at += n
        mask[b, :at] = 1
        positions[b, at:] = torch.arange(width - at)  # padding: its own restarting sequence
    if packed:
        return {"input_ids": ids, "targets": targets, "position_ids": positions}
    return {"input_ids": ids, "targets": targets, "attention_mask": mask}
