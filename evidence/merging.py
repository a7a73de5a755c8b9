"""Merging in the tiny world: two LoRA fine-tunes on disjoint skills, merged by each method.

    python evidence/merging.py [--out DIR]

Trains one LoRA SFT run per skill split of the world data (skill A: translation + facts;
skill B: arithmetic + strings) from the shipped base, folds each adapter into the base
(`posttrain merge adapter=...`), merges the two full models with every method through
`posttrain merge CONFIG.yaml` (mergekit-format configs, written here), and evaluates each
model's exact-match accuracy on the held-out test items of every task kind. Prints a
Markdown table and writes `results.json`. Runs resume: finished runs and merges are kept.

Settings (not tuned per method): linear 0.5/0.5; slerp t=0.5; task arithmetic weight 1 each
(the base is the shipped base); TIES and DARE density 0.5, weight 1, seed 0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

SFT = {
    "adapter": "lora", "lora": {"r": 16, "alpha": 32}, "packing": False, "max_length": 512,
    "batch_size": 16, "epochs": 10, "lr": 1e-3, "warmup": 0.05, "log_every": 50, "offline": True,
}  # fmt: skip
KINDS = {"skill_a": ("translation", "facts"), "skill_b": ("arithmetic", "strings")}


def configs(base: str, a: str, b: str) -> dict[str, dict]:
    """mergekit-schema configs for every method."""
    two = lambda **p: [{"model": a, "parameters": p}, {"model": b, "parameters": p}]  # noqa: E731
    gta = {"base_model": base, "dtype": "float32"}
    return {
        "linear": {"merge_method": "linear", "models": two(weight=0.5), "dtype": "float32"},
        "slerp": {"merge_method": "slerp", "base_model": a, "parameters": {"t": 0.5},
                  "models": [{"model": a}, {"model": b}], "dtype": "float32"},
        "task_arithmetic": {"merge_method": "task_arithmetic", "models": two(weight=1.0), **gta},
        "ties": {"merge_method": "ties", "models": two(weight=1.0, density=0.5), **gta},
        "dare_linear": {"merge_method": "dare_linear", "models": two(weight=1.0, density=0.5),
                        **gta},
        "dare_ties": {"merge_method": "dare_ties", "models": two(weight=1.0, density=0.5),
                      **gta},
    }  # fmt: skip


def accuracy(path: str, data: Path) -> dict:
    from posttrain.evaluate.suite import evaluate_world
    from posttrain.modeling.inference import load_for_inference

    model, tok = load_for_inference(path)
    out = evaluate_world(model, tok, data, ("accuracy",))
    skills = {s: sum(out["accuracy_by_task"][k] for k in kinds) / len(kinds)
              for s, kinds in KINDS.items()}  # fmt: skip
    return {**out, **skills}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="merging-evidence")
    args = parser.parse_args()
    from posttrain.ship.merge import main as merge
    from posttrain.train.sft import sft
    from posttrain.world.datasets import write_world_data
    from posttrain.world.pretrain import BASE_DIR

    out = Path(args.out)
    data = out / "data"
    if not (data / "manifest.json").is_file():
        write_world_data(data, seed=0, overwrite=True)
    models = {"base": str(BASE_DIR)}
    for skill in KINDS:
        run, full = out / f"sft_{skill}", out / f"full_{skill}"
        if not (run / "final").is_dir():
            sft({**SFT, "model": str(BASE_DIR), "output_dir": str(run),
                 "data": {"train": str(data / f"{skill}_train.jsonl")}})  # fmt: skip
        if not full.is_dir():
            merge([f"adapter={run}", f"output_dir={full}"])
        models[skill] = str(full)
    for method, config in configs(models["base"], models["skill_a"], models["skill_b"]).items():
        target = out / f"merged_{method}"
        if not target.is_dir():
            path = out / f"{method}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            merge([str(path), f"output_dir={target}"])
        models[method] = str(target)
    results = {name: accuracy(path, data) for name, path in models.items()}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(results: dict) -> str:
    kinds = [k for ks in KINDS.values() for k in ks]
    lines = ["| model | skill A (translation, facts) | skill B (arithmetic, strings) | "
             + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 3)]  # fmt: skip
    for name, r in results.items():
        cells = [f"{r['accuracy_by_task'].get(k, 0.0):.2f}" for k in kinds]
        lines.append(
            f"| {name} | {r['skill_a']:.3f} | {r['skill_b']:.3f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
