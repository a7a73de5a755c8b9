"""plan_batches (length grouping, best-fit packing) and collate, incl. packed-loss equivalence."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from posttrain.data.batching import collate, pack_rows, plan_batches
from tests.tiny import tiny_model


def lengths_of(rows, lengths):
    return [sum(lengths[i] for i in row) for row in rows]


def flat_indices(plan):
    return sorted(i for batch in plan for row in batch for i in row)


# ----------------------------------------------------------------------------- packing


def test_best_fit_decreasing_hand_case():
    lengths = [3, 5, 2, 1, 4, 3, 2]  # 20 tokens: two rows of 10 is optimal
    rows = pack_rows(lengths, list(range(len(lengths))), capacity=10)
    assert [sorted(lengths[i] for i in row) for row in rows] == [[1, 4, 5], [2, 2, 3, 3]]


def test_best_fit_picks_the_tightest_row():
    # after 6 and 5 the rows have 4 and 5 free; the 4 must go where it fills the row exactly
    lengths = [6, 5, 4, 4, 1]
    rows = pack_rows(lengths, list(range(5)), capacity=10)
    assert rows == [[0, 2], [1, 3, 4]]


def test_oversized_example_gets_its_own_row():
    rows = pack_rows([12, 3, 3], [0, 1, 2], capacity=10)
    assert sorted(map(sorted, rows)) == [[0], [1, 2]]


def test_packing_fills_rows_and_covers_every_example_once():
    rng = random.Random(0)
    lengths = [rng.randint(2, 300) for _ in range(20000)]
    plan = plan_batches(lengths, batch_size=4, max_length=512, packing=True, seed=1, epoch=0)
    assert flat_indices(plan) == list(range(len(lengths)))
    rows = [row for batch in plan for row in batch]
    assert max(lengths_of(rows, lengths)) <= 512
    assert len(rows) <= 1.02 * sum(lengths) / 512 + 1  # near the lower bound
    assert all(len(batch) == 4 for batch in plan[:-1])


# ----------------------------------------------------------------------------- plans


@pytest.mark.parametrize("packing", [False, True])
def test_plans_are_deterministic_per_seed_and_epoch(packing):
    rng = random.Random(0)
    lengths = [rng.randint(2, 100) for _ in range(1000)]

    def plan(seed, epoch):
        return plan_batches(lengths, 8, 256, packing, seed, epoch)

    assert plan(3, 0) == plan(3, 0)
    assert plan(3, 0) != plan(3, 1)
    assert plan(3, 1) != plan(4, 0)
    for epoch in range(3):
        assert flat_indices(plan(3, epoch)) == list(range(1000))


def test_unpacked_rows_hold_one_example_and_batches_are_full():
    plan = plan_batches([5] * 1001, 8, 64, packing=False, seed=0, epoch=0)
    assert all(len(row) == 1 for batch in plan for row in batch)
    assert sorted(len(batch) for batch in plan)[1:] == [8] * 125  # one short batch only


def test_length_grouping_reduces_padding():
    rng = random.Random(0)
    lengths = [rng.randint(2, 500) for _ in range(4000)]

    def padding(plan):
        total = 0
        for batch in plan:
            sizes = [sum(lengths[i] for i in row) for row in batch]
            total += len(sizes) * max(sizes) - sum(sizes)
        return total

    grouped = plan_batches(lengths, 8, 512, packing=False, seed=0, epoch=0)
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    shuffled = [[[i] for i in order[j : j + 8]] for j in range(0, len(order), 8)]
    assert padding(grouped) < 0.1 * padding(shuffled)


# ----------------------------------------------------------------------------- collate


def example(ids: list[int]) -> dict:
    return {"input_ids": ids, "targets": ids[1:] + [-100]}


def test_collate_unpacked_pads_and_masks():
    examples = [example([5, 6, 7]), example([8, 9])]
    out = collate(examples, [[0], [1]], pad_id=0)
    assert set(out) == {"input_ids", "targets", "attention_mask"}
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert out["targets"].tolist() == [[6, 7, -100], [9, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["input_ids"].dtype == torch.long


def test_collate_packed_restarts_positions():
    examples = [example([5, 6, 7]), example([8, 9]), example([1, 2, 3, 4, 5, 6])]
    out = collate(examples, [[0, 1], [2]], pad_id=0)
    assert set(out) == {"input_ids", "targets", "position_ids"}
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0], [1, 2, 3, 4, 5, 6]]
    assert out["targets"].tolist() == [[6, 7, -100, 9, -100, -100], [2, 3, 4, 5, 6, -100]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    flat = collate(examples, [[0, 1], [2]], pad_id=0, flat=True)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 5]]


# ----------------------------------------------------------------------------- packed losses


def summed_losses(model, batch, rows, examples) -> list[float]:
    """Summed CE of each example, computed inside the (packed) batch."""
    inputs = {k: v for k, v in batch.items() if k != "targets"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.float()  # (B, T, V)
    ce = F.cross_entropy(logits.transpose(1, 2), batch["targets"], reduction="none")  # (B, T)
    losses = []
    for b, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(examples[i]["input_ids"])
            losses.append(ce[b, at : at + n].sum().item())
            at += n
    return losses


@pytest.mark.parametrize(
    ("family", "attn"),
    [
        ("llama", "sdpa"),
        ("qwen2", "sdpa"),
        ("gemma", "sdpa"),
        ("gpt2", "sdpa"),
        ("mistral", "sdpa"),
        ("qwen3", "sdpa"),
        ("llama", "eager"),
        ("gpt2", "eager"),
    ],
)
def test_packed_loss_equals_loss_alone(family, attn):
    model = tiny_model(family, vocab_size=120).eval()
    model.set_attn_implementation(attn)
    gen = torch.Generator().manual_seed(0)
    sizes = [7, 3, 12, 5, 1, 9, 4, 2]
    examples = []
    for n in sizes:
        ids = torch.randint(3, 120, (n,), generator=gen).tolist()
        targets = ids[1:] + [-100]
        targets[0] = -100  # some untrained positions, as a prompt would have
        examples.append({"input_ids": ids, "targets": targets})
    plan = plan_batches(sizes, batch_size=3, max_length=16, packing=True, seed=0, epoch=0)
    assert any(len(row) > 1 for batch in plan for row in batch)
    alone = {}
    for i in range(len(examples)):
        single = collate(examples, [[i]], pad_id=0)
        alone[i] = summed_losses(model, single, [[i]], examples)[0]
    for flat in (False, True):
        for rows in plan:
            batch = collate(examples, rows, pad_id=0, flat=flat)
            assert "attention_mask" not in batch
            packed_rows = [[i for row in rows for i in row]] if flat else rows
            got = summed_losses(model, batch, packed_rows, examples)
            want = [alone[i] for row in packed_rows for i in row]
            assert got == pytest.approx(want, abs=1e-5)
