"""`posttrain abliterate MODEL_OR_RUN [harmful=FILE harmless=FILE] [key=value ...]`.

Finds the refusal direction (any behaviour that two contrastive prompt sets separate), erases
it, and measures what that did:
1. prompts: `harmful` / `harmless` sets (default: the tiny world's, written to a temp folder),
   split into train (directions), validation (selection) and held-out test (evaluation);
2. the refusal first tokens, from the model's own replies to validation harmful prompts; a
   model that never refuses stops here with its baseline (exit 2) unless `force=true`;
3. candidates per (layer, position) and selection (`abliterate.py`), or `layer=` /
   `position=` pins;
4. evaluation before and after (`evaluation.py`): `method=weights` orthogonalises the weights
   (norm-preserving on request), `method=hooks` runs the inference-time ablation hooks;
5. outputs, in one atomic folder: `final/` (weights: a full model folder, or with
   `output=adapter` a rank-1 LoRA adapter, the full model when the edit is not expressible),
   `directions.safetensors`, `report.json`, `scores.png`, `config.yaml`;
6. `heal=dpo` (`heal.py`): a short DPO pass on the edited weights, folded into `final/`, and
   the healed model measured again (`healed` in the report).

Simplified on purpose: one direction for every layer; hooks cannot be saved, so
`method=hooks` writes no `final/` (the direction file is what a caller applies).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import (
    build_config,
    check,
    dump_yaml,
    help_text,
    opt,
    positional_config,
)
from posttrain.errors import UserError
from posttrain.io import atomic_dir, write_json, write_text_atomic

DEFAULT_SETS = "the tiny world's harmful/harmless sets"


@dataclass
class AbliterateConfig:
    """`posttrain abliterate`: which model, which prompt sets, how to choose and apply."""

    model: str = opt("", "model folder, run directory or hub id (positional)")
    harmful: str = opt("", "prompts with the behaviour (data file or text, one per line); "
                           "empty = the tiny world's harmful set")  # fmt: skip
    harmless: str = opt("", "contrast prompts without it; empty = the tiny world's harmless set")
    harmful_test: str = opt("", "held-out harmful prompts; empty = split off test_fraction")
    harmless_test: str = opt("", "held-out harmless prompts; empty = split off test_fraction")
    output_dir: str = opt("runs/abliterate", "run directory (written atomically)")
    val_fraction: float = opt(0.2, "share of each set used to choose the direction")
    test_fraction: float = opt(0.2, "share held out for evaluation when no *_test file is given")
    min_prompts: int = opt(16, "fewest prompts a set may have")
    max_prompts: int = opt(256, "most prompts per part (train/validation/test) that are used")
    layer: int = opt(-1, "pin the stream point (block input l; L = the last block's output); "
                         "-1 = search")  # fmt: skip
    position: int = opt(0, "pin the post-instruction position (-1 = last token); 0 = search")
    positions: int = opt(0, "post-instruction positions to read; 0 = all template tokens after "
                            "the user's message")  # fmt: skip
    skip_last: float = opt(0.2, "search skips the last floor(skip_last * layers) stream points")
    kl_limit: float = opt(0.1, "a candidate's harmless first-token KL must stay under this")
    search: str = opt("", "optuna: search the direction's (fractional) layer and per-block "
                          "attention/MLP edit strengths, minimising refusals and KL (pip install "
                          "optuna); empty = one direction at full strength everywhere")  # fmt: skip
    trials: int = opt(60, "search=optuna: number of trials")
    projected: bool = opt(False, "project the harmless mean out of each direction")
    method: str = opt("weights", "weights: orthogonalise the weights and save; hooks: "
                                 "inference-time ablation, nothing saved but the direction")  # fmt: skip
    norm_preserving: bool = opt(False, "weights: keep each written vector's norm")
    output: str = opt("full", "full: final/ is a model folder; adapter: a LoRA adapter")
    force: bool = opt(False, "go on when the model never refuses the harmful prompts")
    heal: str = opt("", "dpo: a short DPO pass after the edit to win back task skill; empty = none")
    heal_data: str = opt("", "heal: preference pairs; empty = the tiny world's, minus harmful ones")
    heal_steps: int = opt(60, "heal: DPO steps")
    world_limit: int = opt(0, "tiny-world test rows for accuracy/perplexity; 0 = all")
    batch_size: int = opt(64, "prompts per forward pass")
    seed: int = opt(0, "split seed (and world data seed when the default sets are used)")

    def validate(self) -> None:
        check(bool(self.model), "model", "is required: posttrain abliterate MODEL_OR_RUN")
        check(
            self.method in ("weights", "hooks"),
            "method",
            f"must be weights or hooks, got {self.method!r}",
        )
        check(
            self.output in ("full", "adapter"),
            "output",
            f"must be full or adapter, got {self.output!r}",
        )
        check(0 < self.val_fraction < 1, "val_fraction", "must be in (0, 1)")
        check(0 < self.test_fraction < 1, "test_fraction", "must be in (0, 1)")
        check(self.min_prompts >= 3, "min_prompts", "must be >= 3 (train, validation, test)")
        check(self.max_prompts >= 1, "max_prompts", "must be >= 1")
        check(self.position <= 0, "position", "must be negative (-1 = last token) or 0 (search)")
        check(self.positions >= 0, "positions", "must be >= 0")
        check(0 <= self.skip_last < 1, "skip_last", "must be in [0, 1)")
        check(self.kl_limit > 0, "kl_limit", "must be > 0")
        check(not (self.norm_preserving and self.method == "hooks"), "norm_preserving",
              "applies to method=weights only")  # fmt: skip
        check(
            self.search in ("", "optuna"), "search", f"must be optuna or empty, got {self.search!r}"
        )
        check(self.trials >= 1, "trials", "must be >= 1")
        if self.search:
            check(self.method == "weights", "method", "must be weights with search=optuna")
            check(self.layer == -1, "layer", "is searched by search=optuna: leave it -1")
            check(not self.norm_preserving, "norm_preserving", "is not part of search=optuna")
            check(self.output == "full", "output", "must be full with search=optuna")
        check(not (self.harmful_test and not self.harmful), "harmful_test", "needs harmful=FILE")
        check(not (self.harmless_test and not self.harmless), "harmless_test",
              "needs harmless=FILE")  # fmt: skip
        check(bool(self.harmful) == bool(self.harmless), "harmful",
              "and harmless go together: give both files or neither")  # fmt: skip
        check(self.heal in ("", "dpo"), "heal", f"must be dpo or empty, got {self.heal!r}")
        check(not self.heal or (self.method, self.output) == ("weights", "full"), "heal",
              "needs method=weights and output=full (it trains the edited weights)")  # fmt: skip
        check(self.heal_steps >= 1, "heal_steps", "must be >= 1")
        check(not local_file_missing(self.heal_data), "heal_data",
              f"{self.heal_data}: no such file")  # fmt: skip


def local_file_missing(source: str) -> bool:
    """A data-file path (by its extension) that does not exist: checked before any work."""
    from posttrain.data.load import FILE_TYPES

    return Path(source).suffix.lower() in FILE_TYPES and not Path(source).is_file()


def prompt_sets(cfg: AbliterateConfig, tmp: str) -> tuple[dict, str | None]:
    """({harmful,harmless}_{train,val,test}: prompts}, tiny-world data folder or None)."""
    from posttrain.steer.prompts import check_count, read_prompts, split_prompts

    world = None
    files = {
        "harmful": (cfg.harmful, cfg.harmful_test),
        "harmless": (cfg.harmless, cfg.harmless_test),
    }
    if not cfg.harmful:
        from posttrain.world.datasets import write_world_data

        write_world_data(tmp, seed=cfg.seed, overwrite=True)
        world = tmp
        files = {k: (f"{tmp}/{k}_train.jsonl", f"{tmp}/{k}_test.jsonl") for k in files}
    sets, cap = {}, cfg.max_prompts
    for kind, (source, test_source) in files.items():
        prompts = read_prompts(source)
        check_count(prompts, kind, source, cfg.min_prompts)
        if test_source:
            train, val = split_prompts(prompts, [cfg.val_fraction], cfg.seed)
            test = read_prompts(test_source)
            check_count(test, f"{kind}_test", test_source, 1)
        else:
            train, val, test = split_prompts(
                prompts, [cfg.val_fraction, cfg.test_fraction], cfg.seed
            )
        sets |= {f"{kind}_train": train[:cap], f"{kind}_val": val[:cap], f"{kind}_test": test[:cap]}
    return sets, world


def refusal_ids_or_stop(cfg: AbliterateConfig, model, tok, harmful_val: list) -> tuple[list, float]:
    """The model's refusal first tokens; UserError with the baseline when it never refuses."""
    from posttrain.evaluate.refusal import refusal_token_ids
    from posttrain.steer.abliterate import refusal_first_tokens

    ids, rate = refusal_first_tokens(model, tok, harmful_val, batch_size=cfg.batch_size)
    if ids:
        return ids, rate
    if not cfg.force:
        raise UserError(
            f"harmful: the model refuses none of {len(harmful_val)} validation prompts "
            f"(baseline refusal rate {rate:.2f}); nothing to remove; force=true goes on anyway"
        )
    return refusal_token_ids(tok), rate  # stock refusal openings: the model has none of its own


def choose(cfg: AbliterateConfig, model, tok, sets: dict, ids: list, layout):
    """(directions, norms, candidates, chosen) from the train and validation parts."""
    from posttrain.steer.abliterate import compute_directions, score_candidates, select_candidate

    directions, norms = compute_directions(
        model, tok, sets["harmful_train"], sets["harmless_train"], cfg.projected,
        cfg.positions or None, cfg.batch_size, layout,
    )  # fmt: skip
    n_points, n_positions = norms.shape
    check(cfg.layer < n_points, "layer", f"must be < {n_points} (stream points 0..{n_points - 1})")
    check(-cfg.position <= n_positions, "position", f"must be >= -{n_positions}")
    candidates = score_candidates(
        model, tok, directions, norms, sets["harmful_val"], sets["harmless_val"], ids,
        cfg.skip_last, cfg.batch_size, layout,
        layers=[cfg.layer] if cfg.layer >= 0 else None,
        positions=[cfg.position] if cfg.position else None,
    )  # fmt: skip
    if not candidates:
        raise UserError("layer/position: the pinned direction is zero (no difference there)")
    return directions, norms, candidates, select_candidate(candidates, cfg.kl_limit)


def abliterate(cfg: AbliterateConfig | dict) -> dict:
    """The whole command; returns the report (also written to output_dir/report.json)."""
    from posttrain.evaluate.generate import last_logits
    from posttrain.modeling.inference import load_for_inference, resolve_model_path
    from posttrain.steer.evaluation import induced_refusals, measure
    from posttrain.steer.residual import discover

    cfg = build_config(AbliterateConfig, cfg)
    start = time.time()
    resolve_model_path(cfg.model)
    with tempfile.TemporaryDirectory() as tmp:
        sets, world = prompt_sets(cfg, tmp)
        model, tok = load_for_inference(cfg.model)
        layout = discover(model)
        ids, val_rate = refusal_ids_or_stop(cfg, model, tok, sets["harmful_val"])
        if cfg.search:
            from posttrain.steer.search import chosen_direction, search_from_config

            directions, norms, best = search_from_config(cfg, model, tok, sets, ids, layout)
            r, coeff, layer = chosen_direction(best, directions, norms)
            candidates, chosen = [], best.chosen_dict() | {"coeff": coeff}
        else:
            directions, norms, candidates, best = choose(cfg, model, tok, sets, ids, layout)
            layer, position = best.layer, best.position
            r, coeff = directions[layer, position], float(norms[layer, position])
            chosen = best.as_dict() | {"coeff": coeff}
        test = (sets["harmful_test"], sets["harmless_test"], ids)
        limit, bs = cfg.world_limit or None, cfg.batch_size
        base_logits = last_logits(model, tok, sets["harmless_test"], bs)
        before = measure(model, tok, *test, world_data=world, world_limit=limit, batch_size=bs)
        before |= induced_refusals(model, tok, sets["harmless_test"], r, coeff, layer, layout)
        with tempfile.TemporaryDirectory() as staged:
            final = Path(staged) / "final"
            if cfg.search:
                saved = save_searched(model, tok, layout, best, directions, final)
            elif cfg.method == "weights":
                saved = save_edit(model, tok, r, layout, final, cfg.output, cfg.norm_preserving)
            else:
                saved = "none (method=hooks)"
            after = measure_after(cfg, model, tok, r, layout, test, base_logits, world, limit)
            report = {
                "model": cfg.model,
                "prompts": {k: len(v) for k, v in sets.items()},
                "refusal_tokens": [tok.decode([i]) for i in ids],
                "refusal_token_ids": ids,
                "validation_refusal_rate": val_rate,
                "chosen": chosen,
                "saved": saved,
                "before": before,
                "after": after,
                "seconds": round(time.time() - start, 1),
                "candidates": [c.as_dict() for c in candidates],
            }
            if cfg.search:
                report["search"] = best.as_dict()
            if cfg.heal:
                report |= healed(cfg, Path(staged), test, base_logits, world)
            write_run(cfg, report, directions, norms, r, candidates, best, Path(staged))
    return report


def save_edit(model, tok, r, layout, final: Path, output="full", norm_preserving=False) -> str:
    """Orthogonalise `model` in place and write final/: a full folder or a rank-1 adapter."""
    from posttrain.steer.interventions import AdapterUnsupported, orthogonalize, save_as_lora

    saved = "full"
    if output == "adapter" and not norm_preserving:
        try:
            save_as_lora(model, r, final, layout)
            tok.save_pretrained(str(final))
            saved = "adapter"
        except AdapterUnsupported as why:
            print(f"output=adapter: {why}; saving the full model instead")
    elif output == "adapter":
        print("output=adapter: the norm-preserving edit is not low-rank; saving the full model")
    orthogonalize(model, r, norm_preserving, layout)
    if saved == "full":
        model.save_pretrained(str(final))
        tok.save_pretrained(str(final))
    return saved


def healed(cfg: AbliterateConfig, staged: Path, test, base_logits, world) -> dict:
    """heal=dpo: DPO on the edited final/ (folded back in); the healed model's numbers."""
    from posttrain.steer.evaluation import measure
    from posttrain.steer.heal import heal_dpo, world_heal_pairs

    data = cfg.heal_data or world_heal_pairs(staged, cfg.seed)
    model, tok, metrics = heal_dpo(staged / "final", data, cfg.heal_steps, staged)
    numbers = measure(model, tok, *test, base_logits, world, cfg.world_limit or None,
                      cfg.batch_size)  # fmt: skip
    return {"healed": numbers, "heal": {"data": str(data), "steps": cfg.heal_steps} | metrics}


def save_searched(model, tok, layout, result, directions, final: Path) -> str:
    """Bake the searched edit into `model` in place and write final/ (a full model)."""
    from posttrain.steer.search import apply_trial

    apply_trial(model, layout, result.chosen.params, directions, result.position)
    model.save_pretrained(str(final))
    tok.save_pretrained(str(final))
    return "full"


def measure_after(cfg, model, tok, r, layout, test, base_logits, world, limit) -> dict:
    """`measure` on the edited weights, or with the ablation hooks on."""
    import contextlib

    from posttrain.steer.evaluation import measure
    from posttrain.steer.interventions import ablation_hooks

    hooks = ablation_hooks(model, r, layout) if cfg.method == "hooks" else contextlib.nullcontext()
    with hooks:
        return measure(model, tok, *test, base_logits, world, limit, cfg.batch_size)


def write_run(cfg, report, directions, norms, r, candidates, best, staged: Path) -> None:
    """output_dir, in one rename: final/, directions.safetensors, report.json, scores.png."""
    import shutil

    from posttrain.steer.directions import save_directions
    from posttrain.steer.evaluation import plot_scores

    with atomic_dir(cfg.output_dir) as out:
        if (staged / "final").is_dir():
            shutil.move(str(staged / "final"), str(out / "final"))
        save_directions(out / "directions.safetensors", directions, norms=norms, direction=r)
        write_json(out / "report.json", report)
        write_text_atomic(out / "config.yaml", dump_yaml(cfg))
        if cfg.search:
            from posttrain.steer.search import plot_pareto

            plot_pareto(best, out / "pareto.png")
        else:
            plot_scores(candidates, best, cfg.kl_limit, out / "scores.png")


def summary(report: dict) -> str:
    """A few lines for the terminal."""
    c, b, a = report["chosen"], report["before"], report["after"]
    lines = [f"chosen: layer {c['layer']} position {c['position']} (passed={c['passed']})"]
    for key in b:
        if key in a:
            lines.append(f"  {key:<26} {b[key]:>9.4f} -> {a[key]:.4f}")
    for key in ("induced_refusal_harmless", "induced_refusal_harmless_2x"):
        lines.append(f"  {key:<26} {b[key]:>9.4f}")
    if "kl_harmless" in a:
        lines.append(f"  {'kl_harmless':<26} {a['kl_harmless']:>9.4f}")
    for key, value in report.get("healed", {}).items():
        lines.append(f"  healed {key:<19} {value:>9.4f}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(help_text(AbliterateConfig, "abliterate MODEL_OR_RUN"))
        return
    cfg = positional_config(AbliterateConfig, argv)
    report = abliterate(cfg)
    print(summary(report))
    print(f"wrote {cfg.output_dir}")
