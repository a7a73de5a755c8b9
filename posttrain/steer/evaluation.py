"""What an abliteration did and what it cost: refusals, induced refusals, KL, task accuracy.

`measure(model, tok, sets, ...)` gives one flat dict of numbers for the model as it runs now
(the caller runs it before the edit, then after it: with the ablation hooks on, or on the
edited weights):
- `refusal_rate_harmful` / `refusal_score_harmful`: marker-phrase refusal rate of greedy replies
  (`evaluate.refusal.refusal_rate`) and mean first-token refusal log-odds on held-out harmful
  prompts;
- `refusal_rate_harmless`: the same marker rate on held-out harmless prompts;
- `kl_harmless`: mean first-token KL(model || original) on harmless prompts, against logits
  taken before the edit (`evaluate.kl.kl_rows`, what `first_token_kl` computes, without a
  second copy of the model);
- with the tiny world's data: `accuracy` and `perplexity` (`evaluate.suite.evaluate_world`).

`induced_refusals` adds the direction to the original model over the prompt (activation
addition at its layer, `prompt_only`) and reports the marker rate on harmless prompts, at the
raw difference-of-means norm (Arditi et al.'s coefficient: `induced_refusal_harmless`) and at
twice it (`induced_refusal_harmless_2x`): how strongly the direction drives the behaviour, not
only whether the mean shift suffices. `plot_scores` draws the per-layer candidate scores.

Simplified on purpose: greedy replies, first-token KL only, `limit` rows of the world tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from posttrain.evaluate.generate import Prompt, last_logits
from posttrain.evaluate.kl import kl_rows
from posttrain.evaluate.refusal import refusal_rate, refusal_scores
from posttrain.steer.abliterate import Candidate
from posttrain.steer.interventions import activation_addition


def measure(
    model,
    tok,
    harmful: Sequence[Prompt],
    harmless: Sequence[Prompt],
    refusal_ids: Sequence[int],
    base_logits: torch.Tensor | None = None,
    world_data: str | Path | None = None,
    world_limit: int | None = None,
    batch_size: int = 64,
) -> dict:
    """The numbers of the module doc for `model` as it runs now."""
    out = {
        "refusal_rate_harmful": refusal_rate(model, tok, harmful, batch_size=batch_size)[
            "refusal_rate"
        ],
        "refusal_score_harmful": float(
            refusal_scores(model, tok, harmful, refusal_ids, batch_size).mean()
        ),
        "refusal_rate_harmless": refusal_rate(model, tok, harmless, batch_size=batch_size)[
            "refusal_rate"
        ],
    }
    if base_logits is not None:
        logits = last_logits(model, tok, harmless, batch_size)
        out["kl_harmless"] = float(kl_rows(logits, base_logits).mean())
    if world_data:
        from posttrain.evaluate.suite import evaluate_world

        world = evaluate_world(
            model, tok, world_data, ("accuracy", "perplexity"), limit=world_limit
        )
        out |= {"accuracy": world["accuracy"], "perplexity": world["perplexity"]}
    return out


def induced_refusals(
    model, tok, harmless: Sequence[Prompt], r: torch.Tensor, coeff: float, layer: int, layout
) -> dict[str, float]:
    """Marker refusal rates on harmless prompts with coeff * r, then 2 * coeff * r, added over
    the prompt at `layer` (see the module docstring)."""
    out = {}
    for multiple, key in ((1, "induced_refusal_harmless"), (2, "induced_refusal_harmless_2x")):
        with activation_addition(model, r, multiple * coeff, layer, layout, prompt_only=True):
            out[key] = refusal_rate(model, tok, harmless)["refusal_rate"]
    return out


def plot_scores(candidates: Sequence[Candidate], chosen: Candidate, kl_limit: float, out: Path):
    """scores.png: per layer, each position's ablated/added refusal score and KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("ablated_refusal", "harmful, direction ablated (lower = fewer refusals)"),
        ("added_refusal", "harmless, direction added (> 0 = induces refusal)"),
        ("kl", "harmless first-token KL, ablated"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    positions = sorted({c.position for c in candidates})
    for ax, (key, title) in zip(axes, panels):
        for pos in positions:
            pts = sorted((c.layer, getattr(c, key)) for c in candidates if c.position == pos)
            ax.plot(*zip(*pts), marker="o", label=f"pos {pos}", alpha=0.8)
        ax.scatter([chosen.layer], [getattr(chosen, key)], s=160, facecolors="none",
                   edgecolors="black", linewidths=2, label="chosen", zorder=5)  # fmt: skip
        if key == "kl":
            ax.axhline(kl_limit, color="red", linestyle="--", label="kl_limit")
        if key == "added_refusal":
            ax.axhline(0.0, color="gray", linestyle=":")
        ax.set_xlabel("layer (stream point)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
