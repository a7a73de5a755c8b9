"""One row per preference pair (`data.shared_prompt`): the row layout by hand, and the same
sequence log-probs and gradients as a row per response on every family of tests/tiny.py,
eager and sdpa."""

from __future__ import annotations

import random

import pytest
import torch

from posttrain.data.shared_prompt import (
    IGNORE,
    collate_shared,
    pair_row,
    row_length,
    shared_length,
)
from posttrain.train.dpo import sequence_logps
from posttrain.train.reward import collate_ranked, count_rows, count_tokens
from tests.tiny import FAMILIES, tiny_model


def response(ids: list[int], prompt_len: int) -> dict:
    """A sequence whose tokens after the first `prompt_len` are trained (targets pre-shifted)."""
    targets = [IGNORE] * (prompt_len - 1) + ids[prompt_len:] + [IGNORE]
    return {"input_ids": ids, "targets": targets}


def test_row_layout_by_hand():
    a = response([5, 6, 7, 10, 11], 3)  # prompt 5 6 7, chosen 10 11
    b = response([5, 6, 7, 20], 3)  # the same prompt, rejected 20
    assert shared_length(a, b) == 3
    ids, positions, t_a, t_b, k = pair_row(a, b)
    assert (ids, positions, k) == ([5, 6, 7, 10, 11, 20], [0, 1, 2, 3, 4, 3], 3)
    assert t_a == [IGNORE, IGNORE, 10, 11, IGNORE, IGNORE]
    assert t_b == [IGNORE, IGNORE, 20, IGNORE, IGNORE, IGNORE]
    batch = collate_shared([{"responses": [a, b], "margin": 0.0}], [[0]], pad_id=0)
    mask = batch["attention_mask"][0, 0]
    assert not mask[5, 3:5].any() and mask[5, :3].all() and mask[5, 5]  # 20 sees the prompt only
    assert mask[4, :5].all() and not mask[4, 5]  # chosen is causal as usual
    assert count_rows(batch) == 1 and count_tokens(batch) == 9
    assert row_length({"responses": [a, b]}) == len(ids) == 6  # what batches are grouped by


def test_shared_length_stops_at_the_first_trained_token_and_may_be_zero():
    a, b = response([5, 6, 7, 10, 11], 3), response([5, 6, 7, 10, 12], 3)  # same first answer
    assert shared_length(a, b) == 3  # not 4: position 3 is trained in both
    assert shared_length(response([5, 6, 10], 2), response([9, 6, 20], 2)) == 0


def random_pairs(n: int, seed: int, vocab: int = 400) -> list[dict]:
    """Pairs with prompts and answers of random lengths; some answers share their first token,
    one pair shares nothing (different first token)."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 12))]
        chosen = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))]
        rejected = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))]
        if i % 3 == 1:
            rejected[0] = chosen[0]
        other = [rng.randrange(3, vocab)] + prompt[1:] if i == n - 1 else prompt
        a, b = response(prompt + chosen, len(prompt)), response(other + rejected, len(prompt))
        pairs.append({"responses": [a, b], "margin": 0.0})
    return pairs


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_same_logps_as_a_row_per_response(family, attention):
    model = tiny_model(family).eval()
    model.config._attn_implementation = attention
    pairs, spec = random_pairs(6, seed=1), [list(range(6))]
    with torch.no_grad():
        two_rows = sequence_logps(model, collate_ranked(pairs, spec, pad_id=0))
        one_row = sequence_logps(model, collate_shared(pairs, spec, pad_id=0))
    torch.testing.assert_close(one_row[0], two_rows[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_row[1], two_rows[1])  # trained tokens per response


def test_same_gradients_as_a_row_per_response():
    pairs, spec = random_pairs(4, seed=2), [list(range(4))]
    grads = []
    for collate in (collate_ranked, collate_shared):
        model = tiny_model("llama")
        sums, _ = sequence_logps(model, collate(pairs, spec, pad_id=0))
        (sums.view(-1, 2) @ torch.tensor([1.0, -1.0])).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
