"""Choose the refusal direction: candidates per (layer, position), scored as Arditi et al.

1. `compute_directions`: mean activations on the harmful and harmless training prompts
   (`activations.mean_activations`), difference of means per (layer, position)
   (`directions.difference_of_means`, optionally projected), plus each raw difference's norm
   (the activation-addition coefficient, as the paper adds the unnormalised difference).
2. `refusal_first_tokens`: the refusal first tokens are read off the model's own refusals:
   greedy replies to harmful prompts that contain a refusal marker, and their first tokens,
   most frequent first (never a hard-coded list; empty when the model never refuses).
3. `score_candidates`: for each candidate outside the last `floor(skip_last * blocks)` stream
   points (`candidate_layers`; the stream points are the L block inputs and the last block's
   output, so a model under 5 layers skips none) and with a non-zero difference: at layer 0 the post-instruction tokens are the same
   template tokens in both sets, so there is no direction), on validation prompts:
   - `ablated_refusal`: mean first-token refusal log-odds on harmful prompts with the
     direction ablated everywhere (lower is better);
   - `added_refusal`: the same on harmless prompts with the direction added at its layer
     (must be > 0: the direction has to induce refusal);
   - `kl`: mean first-token KL(ablated || original) on harmless prompts (must stay under
     `kl_limit`).
4. `select_candidate`: the lowest `ablated_refusal` among the candidates that pass both
   filters; when none passes, the lowest overall, flagged `passed=False`.

Simplified on purpose: one direction applied at every layer; the first-token refusal score
(`evaluate.refusal.log_odds`) instead of a judge; first-token KL only (`evaluate.kl.kl_rows`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from posttrain.evaluate.generate import Prompt, generate_ids, last_logits
from posttrain.evaluate.kl import kl_rows
from posttrain.evaluate.refusal import log_odds
from posttrain.evaluate.text import is_refusal
from posttrain.steer.activations import mean_activations
from posttrain.steer.directions import difference_of_means
from posttrain.steer.interventions import ablation_hooks, activation_addition
from posttrain.steer.residual import ResidualLayout, discover


@dataclass
class Candidate:
    """One (layer, position) direction and its validation scores."""

    layer: int
    position: int  # index into the post-instruction positions (-1 = last token)
    ablated_refusal: float  # harmful prompts, direction ablated: lower is better
    added_refusal: float  # harmless prompts, direction added: must be > 0
    kl: float  # harmless prompts, ablated vs original first-token KL
    passed: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def compute_directions(
    model: nn.Module,
    tok,
    harmful: Sequence[Prompt],
    harmless: Sequence[Prompt],
    projected: bool = False,
    positions: int | None = None,
    batch_size: int = 32,
    layout: ResidualLayout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit directions, raw difference norms): shapes (L, P, d) and (L, P)."""
    layout = layout or discover(model)
    mean_a = mean_activations(model, tok, harmful, positions, batch_size, layout)
    mean_b = mean_activations(model, tok, harmless, positions, batch_size, layout)
    return difference_of_means(mean_a, mean_b, projected), (mean_a - mean_b).norm(dim=-1)


def first_token_counts(replies: Sequence[list[int]], refused: Sequence[bool]) -> Counter:
    """How often each token id opens a refusing reply."""
    return Counter(ids[0] for ids, flag in zip(replies, refused) if flag and ids)


def refusal_first_tokens(
    model: nn.Module,
    tok,
    harmful: Sequence[Prompt],
    max_new_tokens: int = 16,
    min_share: float = 0.05,
    batch_size: int = 64,
) -> tuple[list[int], float]:
    """(first token ids of the model's refusals, most frequent first; refusal rate).

    Ids that open fewer than `min_share` of the refusals are dropped. The list is empty when
    the model refuses none of `harmful` (the caller decides whether that is an error).
    """
    pairs = generate_ids(model, tok, harmful, max_new_tokens, batch_size)
    replies = [new for _, new in pairs]
    refused = [is_refusal(tok.decode(ids, skip_special_tokens=True)) for ids in replies]
    rate = sum(refused) / max(len(refused), 1)
    counts = first_token_counts(replies, refused)
    total = sum(counts.values())
    return [t for t, c in counts.most_common() if c >= min_share * total], rate


def _mean_refusal(model, tok, prompts, refusal_ids, batch_size) -> float:
    return float(log_odds(last_logits(model, tok, prompts, batch_size), refusal_ids).mean())


def candidate_layers(n_points: int, n_blocks: int, skip_last: float = 0.2) -> list[int]:
    """Stream points to search: all but the last floor(skip_last * n_blocks) (at least one)."""
    return list(range(max(1, n_points - math.floor(skip_last * n_blocks))))


def score_candidates(
    model: nn.Module,
    tok,
    directions: torch.Tensor,
    norms: torch.Tensor,
    harmful_val: Sequence[Prompt],
    harmless_val: Sequence[Prompt],
    refusal_ids: Sequence[int],
    skip_last: float = 0.2,
    batch_size: int = 64,
    layout: ResidualLayout | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> list[Candidate]:
    """Validation scores of every candidate (see the module doc); `layers` / `positions`
    (negative indices) restrict the search, e.g. to a pinned one."""
    layout = layout or discover(model)
    n_points, n_positions = directions.shape[:2]
    if layers is None:
        layers = candidate_layers(n_points, len(layout.blocks), skip_last)
    positions = [p % n_positions for p in positions] if positions else range(n_positions)
    base = last_logits(model, tok, harmless_val, batch_size)
    out, floor = [], 1e-6 * float(norms.max())
    for layer in layers:
        for pos in positions:
            if float(norms[layer, pos]) <= floor:  # e.g. layer 0: same template tokens, no signal
                continue
            r = directions[layer, pos]
            with ablation_hooks(model, r, layout):
                ablated = _mean_refusal(model, tok, harmful_val, refusal_ids, batch_size)
                kl = float(kl_rows(last_logits(model, tok, harmless_val, batch_size), base).mean())
            coeff = float(norms[layer, pos])
            with activation_addition(model, r, coeff, layer, layout):
                added = _mean_refusal(model, tok, harmless_val, refusal_ids, batch_size)
            out.append(Candidate(layer, pos - n_positions, ablated, added, kl))
    return out


def select_candidate(candidates: Sequence[Candidate], kl_limit: float = 0.1) -> Candidate:
    """The passing candidate with the lowest ablated refusal (else the lowest, not passed)."""
    if not candidates:
        raise ValueError("no candidate directions to choose from")
    for c in candidates:
        c.passed = c.added_refusal > 0 and c.kl < kl_limit
    passing = [c for c in candidates if c.passed] or list(candidates)
    return min(passing, key=lambda c: c.ablated_refusal)
