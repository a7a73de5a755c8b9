"""`posttrain steer MODEL_OR_RUN positive=FILE negative=FILE [mode=add|remove] [key=value ...]`.

The abliteration machinery for any behaviour two contrastive prompt sets separate (French vs
German requests, gloomy vs neutral, harmful vs harmless): the difference of means between
`positive` and `negative` prompts at a stream point is the behaviour's direction r, and
- `mode=add` adds `coeff` x (the raw difference's norm) x r there at every position
  (activation addition), to induce the behaviour on negative prompts (coeff < 0 suppresses);
- `mode=remove` ablates r everywhere (hooks while choosing, weight orthogonalisation for
  `final/`), to erase the behaviour from positive prompts.

The behaviour is measured as Arditi et al. measure refusal, without a judge: its *marker
tokens* are the greedy first reply tokens of positive training prompts that never open a
reply to a negative training prompt (read off the model, never hard-coded); the score is their
first-token log-odds and the rate the share of prompts whose greedy first token is a marker.
With `layer=-1` the stream point is searched on validation prompts: add maximises the score on
negative prompts; remove minimises it on positive prompts among the points whose first-token
KL on negative prompts stays under `kl_limit`.

Outputs, in one atomic folder: `directions.safetensors` (the direction, every candidate, the
norms), `report.json` (markers, per-layer scores, before/after scores, rates and KL on the
held-out prompts, sample replies), `config.yaml`, and for mode=remove `final/` (the
orthogonalised model, or with `output=adapter` a rank-1 LoRA adapter).

Simplified on purpose: one position (the last prompt token unless `position=`); activation
addition is not baked into weights (it would be a bias most architectures lack): mode=add saves
the direction, which `posttrain.steer.interventions.activation_addition` applies.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from posttrain.config import (
    build_config,
    check,
    dump_yaml,
    help_text,
    opt,
    positional_config,
)
from posttrain.errors import UserError
from posttrain.evaluate.generate import Prompt, generate, last_logits
from posttrain.evaluate.kl import kl_rows
from posttrain.evaluate.refusal import log_odds
from posttrain.io import atomic_dir, write_json, write_text_atomic


@dataclass
class SteerConfig:
    """`posttrain steer`: which model, which contrast, add or remove, where and how much."""

    model: str = opt("", "model folder, run directory or hub id (positional)")
    positive: str = opt("", "prompts showing the behaviour (data file, or text one per line)")
    negative: str = opt("", "contrast prompts without it")
    mode: str = opt("add", "add: induce the behaviour on negative prompts; remove: erase it")
    coeff: float = opt(1.0, "add: multiple of the raw difference-of-means norm (< 0 suppresses)")
    layer: int = opt(-1, "stream point (block input l; L = the last block's output); -1 = search")
    position: int = opt(-1, "post-instruction position of the direction (-1 = last token)")
    skip_last: float = opt(0.0, "search skips the last floor(skip_last * layers) stream points")
    kl_limit: float = opt(0.1, "remove: first-token KL on negative prompts must stay under this")
    output: str = opt("full", "remove: final/ as a full model folder or a LoRA adapter")
    output_dir: str = opt("runs/steer", "run directory (written atomically)")
    val_fraction: float = opt(0.2, "share of each set used to choose the stream point")
    test_fraction: float = opt(0.2, "share of each set held out for the report")
    min_prompts: int = opt(16, "fewest prompts a set may have")
    max_prompts: int = opt(256, "most prompts per part (train/validation/test) that are used")
    samples: int = opt(5, "held-out prompts whose replies before/after go in the report")
    max_new_tokens: int = opt(24, "length of the sample replies")
    batch_size: int = opt(64, "prompts per forward pass")
    seed: int = opt(0, "split seed")

    def validate(self) -> None:
        check(bool(self.model), "model", "is required: posttrain steer MODEL_OR_RUN")
        check(bool(self.positive), "positive", "is required: a file of prompts with the behaviour")
        check(bool(self.negative), "negative", "is required: a file of contrast prompts")
        check(self.mode in ("add", "remove"), "mode", f"must be add or remove, got {self.mode!r}")
        check(self.output in ("full", "adapter"), "output", "must be full or adapter")
        check(self.coeff != 0, "coeff", "must not be 0")
        check(self.position < 0, "position", "must be negative (-1 = the last prompt token)")
        check(0 <= self.skip_last < 1, "skip_last", "must be in [0, 1)")
        check(self.kl_limit > 0, "kl_limit", "must be > 0")
        check(0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)")
        check(0 < self.test_fraction < 1, "test_fraction", "must be in (0, 1)")
        check(self.min_prompts >= 3, "min_prompts", "must be >= 3 (train, validation, test)")


def read_sets(cfg: SteerConfig) -> dict[str, list[Prompt]]:
    """{positive,negative}_{train,val,test}: seeded splits of the two files."""
    from posttrain.steer.prompts import check_count, read_prompts, split_prompts

    sets = {}
    for kind in ("positive", "negative"):
        source = getattr(cfg, kind)
        prompts = read_prompts(source)
        check_count(prompts, kind, source, cfg.min_prompts)
        parts = split_prompts(prompts, [cfg.val_fraction, cfg.test_fraction], cfg.seed)
        for name, part in zip(("train", "val", "test"), parts):
            sets[f"{kind}_{name}"] = part[: cfg.max_prompts]
    return sets


def first_tokens(model, tok, prompts: Sequence[Prompt], batch_size: int) -> list[int]:
    """Each prompt's greedy first reply token."""
    return last_logits(model, tok, prompts, batch_size).argmax(-1).tolist()


def marker_tokens(positive_first: Sequence[int], negative_first: Sequence[int]) -> list[int]:
    """First tokens of positive replies that never open a negative reply, most frequent first."""
    never = Counter(positive_first) - Counter({t: 10**9 for t in set(negative_first)})
    return [t for t, _ in never.most_common()]


def behaviour(model, tok, prompts: Sequence[Prompt], markers: Sequence[int], bs: int) -> dict:
    """{score: mean marker log-odds, rate: share whose greedy first token is a marker}."""
    logits = last_logits(model, tok, prompts, bs)
    marked = torch.isin(logits.argmax(-1), torch.tensor(list(markers)))
    return {"score": float(log_odds(logits, markers).mean()), "rate": float(marked.float().mean())}


@contextlib.contextmanager
def intervention(cfg: SteerConfig, model, r: torch.Tensor, norm: float, layer: int, layout):
    """Activation addition at `layer` (add) or directional ablation everywhere (remove)."""
    from posttrain.steer.interventions import ablation_hooks, activation_addition

    if cfg.mode == "add":
        with activation_addition(model, r, cfg.coeff * norm, layer, layout):
            yield
    else:
        with ablation_hooks(model, r, layout):
            yield


def score_layers(cfg, model, tok, sets, markers, directions, norms, layout) -> list[dict]:
    """Validation score (and KL for remove) of the direction at each candidate stream point."""
    from posttrain.steer.abliterate import candidate_layers

    n_points = directions.shape[0]
    if cfg.layer >= 0:
        check(
            cfg.layer < n_points, "layer", f"must be < {n_points} (stream points 0..{n_points - 1})"
        )
        layers = [cfg.layer]
    else:
        layers = candidate_layers(n_points, len(layout.blocks), cfg.skip_last)
    target = sets["negative_val"] if cfg.mode == "add" else sets["positive_val"]
    base = last_logits(model, tok, sets["negative_val"], cfg.batch_size)
    rows, floor = [], 1e-6 * float(norms.max())
    for layer in layers:
        norm = float(norms[layer, cfg.position])
        if norm <= floor:  # e.g. layer 0: the same template token in both sets
            continue
        with intervention(cfg, model, directions[layer, cfg.position], norm, layer, layout):
            row = {"layer": layer, "norm": norm}
            row |= behaviour(model, tok, target, markers, cfg.batch_size)
            logits = last_logits(model, tok, sets["negative_val"], cfg.batch_size)
            row["kl_negative"] = float(kl_rows(logits, base).mean())
        rows.append(row)
    if not rows:
        raise UserError("positive/negative: the sets give no direction (identical activations)")
    return rows


def choose_layer(cfg: SteerConfig, rows: Sequence[dict]) -> dict:
    """add: the highest score; remove: the lowest score with KL under kl_limit (else lowest KL)."""
    if cfg.mode == "add":
        return max(rows, key=lambda r: r["score"] * (1 if cfg.coeff > 0 else -1))
    within = [r for r in rows if r["kl_negative"] < cfg.kl_limit]
    return (
        min(within, key=lambda r: r["score"])
        if within
        else min(rows, key=lambda r: r["kl_negative"])
    )


def measure(cfg, model, tok, sets, markers, base_logits) -> dict:
    """Held-out behaviour on both sets, KL on negative prompts, sample replies."""
    bs, out = cfg.batch_size, {}
    for kind in ("positive", "negative"):
        for key, value in behaviour(model, tok, sets[f"{kind}_test"], markers, bs).items():
            out[f"{key}_{kind}"] = value
    logits = last_logits(model, tok, sets["negative_test"], bs)
    out["kl_negative"] = float(kl_rows(logits, base_logits).mean())
    target = sets["negative_test" if cfg.mode == "add" else "positive_test"][: cfg.samples]
    replies = generate(model, tok, target, max_new_tokens=cfg.max_new_tokens, batch_size=bs)
    out["samples"] = [{"prompt": p, "reply": r} for p, r in zip(target, replies)]
    return out


def steer(cfg: SteerConfig | dict) -> dict:
    """The whole command; returns the report (also written to output_dir/report.json)."""
    from posttrain.modeling.inference import load_for_inference, resolve_model_path
    from posttrain.steer.abliterate import compute_directions
    from posttrain.steer.residual import discover

    cfg = build_config(SteerConfig, cfg)
    resolve_model_path(cfg.model)
    sets = read_sets(cfg)
    model, tok = load_for_inference(cfg.model)
    layout = discover(model)
    bs = cfg.batch_size
    markers = marker_tokens(
        first_tokens(model, tok, sets["positive_train"], bs),
        first_tokens(model, tok, sets["negative_train"], bs),
    )
    if not markers:
        raise UserError("positive: the model's replies open with the same tokens for both sets; "
                        "there is no behaviour to measure")  # fmt: skip
    directions, norms = compute_directions(
        model, tok, sets["positive_train"], sets["negative_train"], batch_size=bs, layout=layout
    )
    check(-cfg.position <= norms.shape[1], "position", f"must be >= -{norms.shape[1]}")
    rows = score_layers(cfg, model, tok, sets, markers, directions, norms, layout)
    best = choose_layer(cfg, rows)
    r = directions[best["layer"], cfg.position]
    base_logits = last_logits(model, tok, sets["negative_test"], bs)
    before = measure(cfg, model, tok, sets, markers, base_logits)
    with intervention(cfg, model, r, best["norm"], best["layer"], layout):
        after = measure(cfg, model, tok, sets, markers, base_logits)
    report = {
        "model": cfg.model,
        "mode": cfg.mode,
        "prompts": {k: len(v) for k, v in sets.items()},
        "markers": [tok.decode([i]) for i in markers],
        "chosen": best | {"position": cfg.position, "coeff": cfg.coeff * best["norm"]},
        "layers": rows,
        "before": before,
        "after": after,
    }
    write_run(cfg, report, model, tok, layout, directions, norms, r)
    return report


def write_run(cfg, report, model, tok, layout, directions, norms, r) -> None:
    """output_dir in one rename: directions, report, config and (remove) the edited model."""
    from posttrain.steer.cli import save_edit
    from posttrain.steer.directions import save_directions

    with atomic_dir(cfg.output_dir) as out:
        if cfg.mode == "remove":
            report["saved"] = save_edit(model, tok, r, layout, out / "final", cfg.output)
        save_directions(out / "directions.safetensors", directions, norms=norms, direction=r)
        write_json(out / "report.json", report)
        write_text_atomic(out / "config.yaml", dump_yaml(cfg))


def summary(report: dict) -> str:
    """A few lines for the terminal."""
    c, b, a = report["chosen"], report["before"], report["after"]
    lines = [f"{report['mode']}: layer {c['layer']} position {c['position']} "
             f"coeff {c['coeff']:.3f}; markers {report['markers'][:6]}"]  # fmt: skip
    for key in ("rate_positive", "rate_negative", "score_positive", "score_negative"):
        lines.append(f"  {key:<16} {b[key]:>8.3f} -> {a[key]:.3f}")
    lines.append(f"  {'kl_negative':<16} {a['kl_negative']:>8.3f}")
    for s in a["samples"][:3]:
        lines.append(f"  {str(s['prompt'])[:50]!r} -> {s['reply'][:40]!r}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(help_text(SteerConfig, "steer MODEL_OR_RUN"))
        return
    cfg = positional_config(SteerConfig, argv)
    report = steer(cfg)
    print(summary(report))
    print(f"wrote {cfg.output_dir}")
