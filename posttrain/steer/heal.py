"""`posttrain abliterate heal=dpo`: a short DPO pass after the edit, to win back task skill.

An edit to the weights can cost task accuracy (the "alignment tax"). Healing trains a LoRA
adapter on the edited model with DPO plus the RPO NLL term (the demo's DPO settings) for
`steps` steps, on preference pairs that do not teach the erased behaviour back: by default the
tiny world's preference pairs without the harmful ones (whose chosen reply is a refusal). The
reference is the edited model itself (the adapter disabled), and the adapter is then folded
into `final/`, so the run still ships one full model.

Simplified on purpose: the demo's DPO settings only; a user's `heal_data` is used as given (if
it holds pairs that prefer refusals, refusals come back, and the report shows it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

HEAL_DPO = {
    "adapter": "lora", "lora": {"r": 16, "alpha": 32}, "loss": "dpo", "beta": 0.1,
    "sft_weight": 1.0, "lr": 5e-4, "batch_size": 16, "max_length": 256, "warmup": 0.05,
    "log_every": 10, "offline": True,
}  # fmt: skip


def world_heal_pairs(folder: Path, seed: int = 0) -> Path:
    """The tiny world's preference pairs minus the harmful ones, as one JSONL file."""
    from posttrain.world.datasets import write_world_data

    write_world_data(folder / "world", seed=seed, overwrite=True)
    lines = (folder / "world" / "preference_train.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line).get("pair") != "harmful"]
    out = folder / "heal_pairs.jsonl"
    out.write_text("\n".join(kept) + "\n")
    return out


def heal_dpo(final: Path, data: str | Path, steps: int, work: Path) -> tuple:
    """DPO-train an adapter on the model in `final/`, fold it in there; (model, tok, metrics)."""
    from posttrain.modeling.inference import load_for_inference
    from posttrain.train.dpo import dpo

    run = work / "heal_run"
    metrics = dpo({**HEAL_DPO, "model": str(final), "output_dir": str(run),
                   "data": {"train": str(data)}, "max_steps": steps})  # fmt: skip
    model, tok = load_for_inference(str(run))  # the adapter merged into the edited model
    healed = work / "healed"
    model.save_pretrained(str(healed))
    tok.save_pretrained(str(healed))
    shutil.rmtree(final)
    healed.rename(final)
    return model, tok, metrics
