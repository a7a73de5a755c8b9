"""The DPO family in the tiny world: every method from the same SFT model, one table.

    python evidence/preferences.py [--out DIR] [--quick]

Writes the world's data, trains the demo's SFT model (LoRA) once, then for each method trains
a LoRA adapter on top of it (DPO, IPO, SimPO, ORPO and KTO on the gold-labelled preference pairs;
KTO on the same pairs as unpaired rows) and evaluates on held-out prompts: task accuracy, the
mean gold reward of greedy replies (task, harmful and harmless prompts) and the per-token KL to
the SFT model on the method's own replies. Prints a Markdown table and writes `results.json`.

Hyper-parameters per method are in METHODS (from each paper's recommended range, not tuned
per method here beyond a first run). Runs resume: re-running skips finished runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

COMMON = {
    "adapter": "lora", "lora": {"r": 16, "alpha": 32}, "batch_size": 16, "max_length": 256,
    "lr": 5e-4, "epochs": 3, "warmup": 0.05, "log_every": 25, "offline": True,
}  # fmt: skip
METHODS = {
    "dpo": {"loss": "dpo", "beta": 0.1},
    "dpo + NLL (RPO)": {"loss": "dpo", "beta": 0.1, "sft_weight": 1.0},
    "ipo": {"loss": "ipo", "beta": 0.1},
    "simpo": {"loss": "simpo", "beta": 2.0, "gamma": 1.0},
    "orpo": {"loss": "orpo", "beta": 0.1},
    "kto": {"loss": "kto", "beta": 0.1},
}
SFT = {
    "adapter": "lora", "lora": {"r": 16, "alpha": 32}, "packing": False, "max_length": 512,
    "batch_size": 16, "epochs": 10, "lr": 1e-3, "warmup": 0.05, "log_every": 50, "offline": True,
}  # fmt: skip
GOLD_SETS = ("prompts_test", "harmful_test", "harmless_test")


def run_name(method: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in method).strip("_")


def evaluate(path: str, sft: str, data: Path, limit: int | None) -> dict:
    from posttrain.evaluate.kl import response_kl
    from posttrain.evaluate.suite import evaluate_world, read_rows
    from posttrain.modeling.inference import load_for_inference

    model, tok = load_for_inference(path)
    out = evaluate_world(model, tok, data, ("accuracy", "gold_reward"), limit=limit)
    if path != sft:
        reference, _ = load_for_inference(sft)
        prompts = [r["prompt"] for name in GOLD_SETS for r in read_rows(data, name, limit)]
        out["kl_to_sft"] = response_kl(model, reference, tok, prompts)["kl_per_token"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="preference-evidence")
    parser.add_argument("--quick", action="store_true", help="1 epoch, 60 test rows per set")
    args = parser.parse_args()
    from posttrain.train.dpo import dpo
    from posttrain.train.sft import sft
    from posttrain.world.datasets import write_world_data
    from posttrain.world.pretrain import BASE_DIR

    out = Path(args.out)
    data = out / "data"
    if not (data / "manifest.json").is_file():
        write_world_data(data, seed=0, overwrite=True)
    sft_run = out / "sft"
    if not (sft_run / "final").is_dir():
        sft({**SFT, "model": str(BASE_DIR), "output_dir": str(sft_run),
             "data": {"train": str(data / "sft_train.jsonl")}})  # fmt: skip
    limit = 60 if args.quick else None
    results = {"SFT": evaluate(str(sft_run), str(sft_run), data, limit)}
    for method, settings in METHODS.items():
        run = out / run_name(method)
        train = data / (
            "kto_train.jsonl" if settings["loss"] == "kto" else "preference_train.jsonl"
        )
        start = time.time()
        if not (run / "final").is_dir():
            dpo({**COMMON, **settings, "model": str(sft_run), "output_dir": str(run),
                 "data": {"train": str(train)}, "epochs": 1 if args.quick else COMMON["epochs"]})  # fmt: skip
        results[method] = evaluate(str(run), str(sft_run), data, limit)
        results[method]["seconds"] = round(time.time() - start)
        print(method, json.dumps(results[method]), file=sys.stderr, flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(results: dict) -> str:
    kinds = ("arithmetic", "facts", "strings", "translation", "harmful", "howto")
    lines = ["| model | accuracy | gold reward | " + " | ".join(kinds) + " | KL to SFT |"]
    lines.append("|" + "---|" * (len(kinds) + 4))
    for name, r in results.items():
        gold = r["gold_reward_by_task"]
        cells = [f"{gold.get(k, 0.0):+.2f}" for k in kinds]
        kl = f"{r['kl_to_sft']:.3f}" if "kl_to_sft" in r else "-"
        lines.append(f"| {name} | {r['accuracy']:.3f} | **{r['gold_reward']:+.3f}** | "
                     + " | ".join(cells) + f" | {kl} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
