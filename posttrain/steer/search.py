"""`posttrain abliterate search=optuna`: a multi-objective search over where and how hard to edit.

Arditi et al. erase one direction from every residual writer at full strength. Per-layer
strength and a direction taken between two layers can keep most of the refusal removal for
much less damage; this module searches that space with Optuna (TPE, two objectives), the idea
the heretic write-up describes (written here from that description, not from its code).

A trial's parameters (`suggest`):
- `direction_index`, a float stream point between the first candidate layer with a non-zero
  difference at `position` and the last candidate (`abliterate.candidate_layers`); the
  direction is the blend of the unit directions at floor/ceil, re-normalised
  (`directions.interpolate_layers`);
- per component, "attn" (attention output projections) and "mlp" (MLP down projections, MoE
  experts, shared experts), a kernel over blocks (`kernel_weights`): `max_weight` in
  [0, 1.5] at block `max_weight_position`, falling linearly to `min_weight` (sampled as
  `min_weight_fraction` of `max_weight`, so the range never depends on another parameter) at
  `min_weight_distance` blocks away, 0 beyond.

The edit (`edit_writers`): every writer of block i and component c becomes
W - w_{c,i} r (r^T W) along its hidden axis (biases the same); w = 1 is the full
orthogonalisation of `interventions.orthogonalize_writer`, w > 1 overshoots. The embeddings
take the first block's attention weight w_{attn,0} (so all weights 1 is exactly
`interventions.orthogonalize`); the lm_head is untied from them first. Every trial edits from
a copy of the original writer tensors (`original_writers`), and the search restores them at
the end: the model is never deep-copied.

Objectives, both minimised, on the validation prompts: the share of harmful prompts whose
greedy reply (`REPLY_TOKENS` long) carries a refusal marker (`evaluate.refusal.refusal_rate`,
what the report measures; the first-token log-odds > 0 proved optimistic: a search that drove
it to 0 left 29% of replies refusing), and the mean first-token KL on harmless prompts against the unedited logits (`evaluate.kl.kl_rows`). The front is
Optuna's `best_trials`. The chosen trial (`choose`): the lowest refusal share among trials with
KL <= kl_limit, ties by KL. When no trial under the limit refuses less than the unedited model
(the least-KL trial would then be an edit that removes nothing), the lowest refusal share of
all, ties by KL, flagged `passed=False` (the same fallback as `abliterate.select_candidate`).
Both choices lie on the front.

Simplified on purpose: a single post-instruction position for the direction; marker phrases
instead of a judge; no norm-preserving variant; no
pruning; trials run one after another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from posttrain.errors import UserError
from posttrain.evaluate.generate import Prompt, last_logits
from posttrain.evaluate.kl import kl_rows
from posttrain.evaluate.refusal import log_odds, refusal_rate
from posttrain.steer.abliterate import candidate_layers
from posttrain.steer.directions import interpolate_layers
from posttrain.steer.interventions import unit
from posttrain.steer.residual import ResidualLayout, Writer, untie_lm_head

MAX_WEIGHT = 1.5
REPLY_TOKENS = 12  # reply length the refusal objective reads markers in


def kernel_weights(
    n_blocks: int,
    max_weight: float,
    max_weight_position: float,
    min_weight: float,
    min_weight_distance: float,
) -> list[float]:
    """Edit strength per block: `max_weight` at the peak, linear to `min_weight` at
    `min_weight_distance` blocks from it, 0 further away."""
    out = []
    for i in range(n_blocks):
        distance = abs(i - max_weight_position)
        if distance > min_weight_distance:
            out.append(0.0)
        else:
            out.append(max_weight + (min_weight - max_weight) * distance / min_weight_distance)
    return out


def component_of(writer: Writer, block_name: str) -> str:
    """The writer's component: attn under an attention sublayer (self_attn, attn, attention),
    else mlp (mlp, feed_forward, block_sparse_moe, ...)."""
    child = writer.name[len(block_name) + 1 :].split(".", 1)[0].lower()
    return "attn" if "attn" in child or "attention" in child else "mlp"


def components(layout: ResidualLayout) -> list[str]:
    """The components present in the model's blocks, attn first."""
    found = {
        component_of(w, name)
        for name, writers in zip(layout.block_names, layout.writers)
        for w in writers
    }
    return [c for c in ("attn", "mlp") if c in found]


def block_weights(params: dict, comps: Sequence[str], n_blocks: int) -> dict[str, list[float]]:
    """{component: weight per block} from a trial's parameters."""
    out = {}
    for c in comps:
        top = params[f"{c}.max_weight"]
        out[c] = kernel_weights(
            n_blocks,
            top,
            params[f"{c}.max_weight_position"],
            params[f"{c}.min_weight_fraction"] * top,
            params[f"{c}.min_weight_distance"],
        )
    return out


def original_writers(layout: ResidualLayout, copy: bool = True) -> dict[str, tuple]:
    """{writer name: (weight, bias or None)}, copied (what every trial edits from) or, with
    copy=False, the live tensors (an edit made once, in place)."""
    take = (lambda t: t.detach().clone()) if copy else (lambda t: t.detach())
    return {
        w.name: (take(w.weight), None if w.bias_tensor is None else take(w.bias_tensor))
        for w in layout.all_writers()
    }


def scaled_ablation(w: torch.Tensor, r: torch.Tensor, out_dim: int, strength: float):
    """W - strength * r (r^T W) along axis `out_dim`, in fp32 (r unit)."""
    moved = w.float().movedim(out_dim, -1)  # (..., d)
    rf = r.to(moved.device)
    return (moved - strength * (moved @ rf).unsqueeze(-1) * rf).movedim(-1, out_dim)


@torch.no_grad()
def set_writer(writer: Writer, original: tuple, r: torch.Tensor, strength: float) -> None:
    """Write the original weight (and bias) edited with `strength` into the writer."""
    weight, bias = original
    new = weight if strength == 0 else scaled_ablation(weight, r, writer.out_dim, strength)
    writer.weight.copy_(new.to(writer.weight.dtype))
    if bias is not None:
        new_bias = bias if strength == 0 else scaled_ablation(bias, r, -1, strength)  # (E?, d)
        writer.bias_tensor.copy_(new_bias.to(bias.dtype))


def edit_writers(
    layout: ResidualLayout, originals: dict, r: torch.Tensor, weights: dict[str, list[float]]
) -> None:
    """Every writer = its original edited by its block's component weight (see module doc)."""
    r = unit(r)
    first = weights.get("attn") or next(iter(weights.values()))
    for emb in layout.embeddings:
        set_writer(emb, originals[emb.name], r, first[0])
    for i, (name, writers) in enumerate(zip(layout.block_names, layout.writers)):
        for w in writers:
            set_writer(w, originals[w.name], r, weights[component_of(w, name)][i])


def restore_writers(layout: ResidualLayout, originals: dict) -> None:
    """Put every original writer tensor back (bit-exact)."""
    with torch.no_grad():
        for w in layout.all_writers():
            weight, bias = originals[w.name]
            w.weight.copy_(weight)
            if bias is not None:
                w.bias_tensor.copy_(bias)


def direction_range(
    norms: torch.Tensor, n_blocks: int, position: int, skip_last: float
) -> tuple[int, int]:
    """(first, last) stream point to search: candidate layers, leading zero differences
    (layer 0: the same template tokens in both sets) skipped."""
    layers = candidate_layers(norms.shape[0], n_blocks, skip_last)
    floor = 1e-6 * float(norms[:, position].max())
    nonzero = [lay for lay in layers if float(norms[lay, position]) > floor]
    if not nonzero:
        raise UserError(
            "harmful/harmless: the two sets give no difference at any candidate layer "
            f"(position {position}); nothing to search"
        )
    return nonzero[0], layers[-1]


def suggest(trial, layer_range: tuple[int, int], comps: Sequence[str], n_blocks: int) -> dict:
    """A trial's parameters (module doc), sampled through the Optuna trial."""
    params = {"direction_index": trial.suggest_float("direction_index", *map(float, layer_range))}
    for c in comps:
        params[f"{c}.max_weight"] = trial.suggest_float(f"{c}.max_weight", 0.0, MAX_WEIGHT)
        params[f"{c}.max_weight_position"] = trial.suggest_float(
            f"{c}.max_weight_position", 0.0, float(n_blocks - 1)
        )
        params[f"{c}.min_weight_fraction"] = trial.suggest_float(
            f"{c}.min_weight_fraction", 0.0, 1.0
        )
        params[f"{c}.min_weight_distance"] = trial.suggest_float(
            f"{c}.min_weight_distance", 1.0, float(n_blocks)
        )
    return params


@dataclass
class TrialRecord:
    """One trial: its parameters and validation scores."""

    number: int
    params: dict
    refusal_share: float  # harmful prompts whose greedy reply is a refusal
    kl: float  # harmless first-token KL to the unedited model
    refusal_score: float  # mean refusal log-odds on harmful prompts (reported, not optimised)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class SearchResult:
    """Every trial, the Pareto front (trial numbers) and the chosen trial."""

    trials: list[TrialRecord]
    front: list[int]
    chosen: TrialRecord
    passed: bool  # KL within kl_limit and fewer refusals than the unedited model
    kl_limit: float
    position: int
    baseline_refusal_share: float  # the unedited model's, on the same prompts
    components: list[str] = field(default_factory=list)

    def chosen_dict(self) -> dict:
        """The chosen trial with `layer` (its direction_index), `position` and `passed`, the
        keys a report's "chosen" has without the search."""
        layer = round(self.chosen.params["direction_index"], 3)
        return self.chosen.as_dict() | {"layer": layer, "position": self.position,
                                        "passed": self.passed}  # fmt: skip

    def as_dict(self) -> dict:
        return {
            "chosen": self.chosen_dict(),
            "front": self.front,
            "kl_limit": self.kl_limit,
            "baseline_refusal_share": self.baseline_refusal_share,
            "position": self.position,
            "components": self.components,
            "trials": [t.as_dict() for t in self.trials],
        }


def choose(
    trials: Sequence[TrialRecord], kl_limit: float, baseline_share: float = 1.0
) -> tuple[TrialRecord, bool]:
    """(chosen trial, passed): see the module doc."""
    key = lambda t: (t.refusal_share, t.kl, t.number)  # noqa: E731
    within = [t for t in trials if t.kl <= kl_limit and t.refusal_share < baseline_share]
    if within:
        return min(within, key=key), True
    return min(trials, key=key), False


def import_optuna():
    """optuna, or the UserError saying how to get it (it is an optional extra)."""
    try:
        import optuna
    except ImportError:
        raise UserError("search=optuna needs optuna: pip install optuna") from None
    return optuna


def refused_share(model: nn.Module, tok, prompts: Sequence[Prompt], batch_size: int) -> float:
    """Share of `prompts` whose greedy reply (REPLY_TOKENS long) has a refusal marker."""
    return refusal_rate(model, tok, prompts, REPLY_TOKENS, batch_size)["refusal_rate"]


def search(
    model: nn.Module,
    tok,
    layout: ResidualLayout,
    directions: torch.Tensor,
    norms: torch.Tensor,
    harmful_val: Sequence[Prompt],
    harmless_val: Sequence[Prompt],
    refusal_ids: Sequence[int],
    n_trials: int = 60,
    kl_limit: float = 0.1,
    position: int = -1,
    skip_last: float = 0.2,
    seed: int = 0,
    batch_size: int = 64,
) -> SearchResult:
    """Run the study (module doc); the model's weights are the originals again afterwards
    (its lm_head is untied from the embedding when they were tied)."""
    optuna = import_optuna()
    if n_trials < 1:
        raise UserError(f"trials must be >= 1, got {n_trials}")
    n_blocks, comps = len(layout.blocks), components(layout)
    layer_range = direction_range(norms, n_blocks, position, skip_last)
    untie_lm_head(model)
    originals = original_writers(layout)
    base = last_logits(model, tok, harmless_val, batch_size)
    baseline_share = refused_share(model, tok, harmful_val, batch_size)
    records: list[TrialRecord] = []

    def objective(trial) -> tuple[float, float]:
        params = suggest(trial, layer_range, comps, n_blocks)
        r = interpolate_layers(directions, params["direction_index"], position)
        edit_writers(layout, originals, r, block_weights(params, comps, n_blocks))
        odds = log_odds(last_logits(model, tok, harmful_val, batch_size), refusal_ids)
        kl = float(kl_rows(last_logits(model, tok, harmless_val, batch_size), base).mean())
        share = refused_share(model, tok, harmful_val, batch_size)
        records.append(TrialRecord(trial.number, params, share, kl, float(odds.mean())))
        if (trial.number + 1) % 20 == 0 or trial.number + 1 == n_trials:
            best = min(records, key=lambda t: (t.kl > kl_limit, t.refusal_share, t.kl))
            print(f"search: trial {trial.number + 1}/{n_trials}; fewest refusals within the "
                  f"KL limit so far {best.refusal_share:.2f} (KL {best.kl:.3f})", flush=True)  # fmt: skip
        return share, kl

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        sampler = optuna.samplers.TPESampler(seed=seed)
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
        study.optimize(objective, n_trials=n_trials)
    finally:
        optuna.logging.set_verbosity(verbosity)
        restore_writers(layout, originals)
    chosen, passed = choose(records, kl_limit, baseline_share)
    front = sorted(t.number for t in study.best_trials)
    return SearchResult(records, front, chosen, passed, kl_limit, position, baseline_share, comps)


def apply_trial(
    model: nn.Module,
    layout: ResidualLayout,
    params: dict,
    directions: torch.Tensor,
    position: int = -1,
) -> torch.Tensor:
    """Bake a trial's edit into `model` in place (lm_head untied first); returns its unit
    direction (what directions.safetensors records as `direction`)."""
    comps = components(layout)
    r = interpolate_layers(directions, params["direction_index"], position)
    untie_lm_head(model)
    weights = block_weights(params, comps, len(layout.blocks))
    edit_writers(layout, original_writers(layout, copy=False), r, weights)
    return r


def chosen_direction(
    result: SearchResult, directions: torch.Tensor, norms: torch.Tensor
) -> tuple[torch.Tensor, float, int]:
    """(unit direction, coefficient, nearest stream point) of the chosen trial: what
    directions.safetensors records and `evaluation.induced_refusals` adds (the coefficient is
    the raw difference norm blended like the direction)."""
    index, pos = result.chosen.params["direction_index"], result.position
    low = int(index)
    high, frac = min(low + 1, norms.shape[0] - 1), index - low
    coeff = (1 - frac) * float(norms[low, pos]) + frac * float(norms[high, pos])
    return interpolate_layers(directions, index, pos), coeff, round(index)


def search_from_config(cfg, model: nn.Module, tok, sets: dict, refusal_ids, layout) -> tuple:
    """(directions, norms, SearchResult) for `posttrain abliterate search=optuna`: directions
    from the train parts, the study on the validation parts (cfg: an AbliterateConfig)."""
    from posttrain.config import check
    from posttrain.steer.abliterate import compute_directions

    directions, norms = compute_directions(
        model, tok, sets["harmful_train"], sets["harmless_train"], cfg.projected,
        cfg.positions or None, cfg.batch_size, layout,
    )  # fmt: skip
    position = cfg.position or -1
    check(-position <= norms.shape[1], "position", f"must be >= -{norms.shape[1]}")
    result = search(
        model, tok, layout, directions, norms, sets["harmful_val"], sets["harmless_val"],
        refusal_ids, cfg.trials, cfg.kl_limit, position, cfg.skip_last, cfg.seed, cfg.batch_size,
    )  # fmt: skip
    return directions, norms, result


def plot_pareto(result: SearchResult, path: str | Path) -> Path:
    """pareto.png: every trial's KL vs refusal share, the front joined, the chosen circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_number = {t.number: t for t in result.trials}
    front = sorted((by_number[n] for n in result.front), key=lambda t: t.kl)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter([t.kl for t in result.trials], [t.refusal_share for t in result.trials],
               s=18, color="gray", alpha=0.6, label="trials")  # fmt: skip
    ax.plot([t.kl for t in front], [t.refusal_share for t in front], "o-", color="tab:blue",
            drawstyle="steps-post", label="Pareto front")  # fmt: skip
    c = result.chosen
    ax.scatter([c.kl], [c.refusal_share], s=180, facecolors="none", edgecolors="black",
               linewidths=2, label=f"chosen (trial {c.number})", zorder=5)  # fmt: skip
    ax.axvline(result.kl_limit, color="red", linestyle="--", label="kl_limit")
    ax.set_xscale("symlog", linthresh=result.kl_limit / 10)  # KL spans orders of magnitude
    ax.set_xlim(left=0)
    ax.set_xlabel("harmless first-token KL (validation)")
    ax.set_ylabel("harmful refusal share (validation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
