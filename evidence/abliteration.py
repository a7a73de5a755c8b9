"""Abliteration in the tiny world: a chat model that refuses, its refusal direction erased, healed.

    python evidence/abliteration.py [--out DIR] [--heal-steps N] [--trials N]

1. The refusal model: full SFT of the shipped base on the world's chat tasks together with
   its refusal set (harmful requests answered with a refusal, harmless how-to requests
   answered), so it both answers tasks and refuses (kept in `DIR/refusal` between runs).
2. `posttrain abliterate` with `projected=true` and `heal=dpo` (the default sets: the world's
   harmful and harmless prompts; `heal_data`: the world's preference pairs minus the harmful
   ones).
3. The same with `search=optuna` (`--trials`, default 200) instead of the full-strength edit.
4. A table of the held-out numbers before the edit, after it, after healing and after the
   searched edit: refusals on harmful prompts, refusals on harmless ones, refusals induced by
   adding the direction over the prompt (at the difference of means, and at twice it),
   first-token KL on harmless prompts, task accuracy and perplexity.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REFUSAL_SFT = {
    "adapter": "full", "lr": 6e-4, "epochs": 2, "batch_size": 16, "max_length": 256,
    "packing": False, "warmup": 0.05, "log_every": 50, "offline": True,
}  # fmt: skip
ROWS = (
    ("refusal_rate_harmful", "refusals, held-out harmful"),
    ("refusal_rate_harmless", "refusals, held-out harmless"),
    ("induced_refusal_harmless", "harmless prompts refusing with the direction added (1x)"),
    ("induced_refusal_harmless_2x", "the same at 2x the difference of means"),
    ("kl_harmless", "first-token KL on harmless"),
    ("accuracy", "task accuracy"),
    ("perplexity", "perplexity"),
)


def refusal_model(out: Path) -> str:
    """Full SFT on chat tasks + the refusal set, trained once into out/refusal."""
    run = out / "refusal"
    if not (run / "final").is_dir():
        from posttrain.train.sft import sft
        from posttrain.world.datasets import write_world_data

        data = out / "data"
        write_world_data(data, overwrite=True)
        mixed = data / "chat_and_refusal.jsonl"
        mixed.write_text((data / "sft_train.jsonl").read_text()
                         + (data / "refusal_sft_train.jsonl").read_text())  # fmt: skip
        sft({**REFUSAL_SFT, "model": "posttrain/world/base", "output_dir": str(run),
             "data": {"train": str(mixed)}})  # fmt: skip
    return str(run)


def table(stages: list[tuple[str, dict]]) -> str:
    """Markdown: one row per number, one column per stage."""
    lines = ["| | " + " | ".join(s for s, _ in stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for key, label in ROWS:
        cells = [f"{numbers[key]:.3f}" if key in numbers else "" for _, numbers in stages]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stages(edit: dict, searched: dict) -> list[tuple[str, dict]]:
    """Table columns; a direction's induced refusals (measured on the unedited model) sit in
    the column of the edit made with it."""

    def induced(report: dict) -> dict:
        return {k: v for k, v in report["before"].items() if k.startswith("induced_")}

    before = {k: v for k, v in edit["before"].items() if not k.startswith("induced_")}
    return [("before", before), ("edit", edit["after"] | induced(edit)),
            ("edit + heal", edit["healed"]), ("searched edit", searched["after"] | induced(searched))]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="evidence-abliteration")
    ap.add_argument("--heal-steps", type=int, default=60)
    ap.add_argument("--trials", type=int, default=200)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from posttrain.steer.cli import abliterate

    model = refusal_model(out)
    edit = abliterate({"model": model, "projected": True, "heal": "dpo",
                       "heal_steps": args.heal_steps, "output_dir": str(out / "abliterate")})  # fmt: skip
    searched = abliterate({"model": model, "projected": True, "search": "optuna",
                           "trials": args.trials, "output_dir": str(out / "search")})  # fmt: skip
    (out / "results.json").write_text(json.dumps({"edit": edit, "search": searched}, indent=2))
    print(table(stages(edit, searched)))
    c, s = edit["chosen"], searched["chosen"]
    print(
        f"edit: layer {c['layer']} position {c['position']}, {edit['seconds']} s (heal "
        f"included); search: layer {s['layer']:.2f}, {searched['seconds']} s"
    )


if __name__ == "__main__":
    main()
