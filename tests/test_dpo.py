"""DPO family end to end on a tiny local model: first-step loss, learning, cache, resume, errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import main
from posttrain.train.dpo import LOSSES
from tests.test_reward import write_pairs
from tests.tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny", family="llama")


def args(tiny_dir, data, out, *extra):
    return ["dpo", f"model={tiny_dir}", f"data.train={data}", f"output_dir={out}",
            "batch_size=6", "max_length=64", "lr=5e-3", "log_every=1", "lora.r=4", *extra]  # fmt: skip


def losses(out):
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_dpo_starts_at_log2_and_learns_the_preferences(tiny_dir, tmp_path, adapter):
    """Policy == reference at step 1 (LoRA B = 0; full: cached reference), so loss = log 2."""
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    assert main(args(tiny_dir, data, out, f"adapter={adapter}", "max_steps=10", "beta=0.5")) == 0
    train = losses(out)
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert train[-1]["loss"] < 0.5 * train[0]["loss"]
    assert (
        train[-1]["accuracy"] == 1.0 and train[-1]["rewards_chosen"] > train[-1]["rewards_rejected"]
    )
    assert (out / "reference_logps.json").is_file() == (adapter == "full")


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains(tiny_dir, tmp_path, loss):
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    assert (
        main(args(tiny_dir, data, out, f"loss={loss}", "max_steps=8", "label_smoothing=0.1")) == 0
    )
    train = losses(out)
    assert all(math.isfinite(r["loss"]) for r in train)
    assert train[-1]["logps_chosen"] > train[0]["logps_chosen"] - 1.0
    assert train[-1]["margin"] > train[0]["margin"]


def test_full_dpo_resumes_exactly_and_reuses_or_refreshes_the_reference_cache(
    tiny_dir, tmp_path, capsys
):
    data = write_pairs(tmp_path / "pairs.jsonl")
    full, half = tmp_path / "full", tmp_path / "half"
    assert main(args(tiny_dir, data, full, "adapter=full", "max_steps=6")) == 0
    assert main(args(tiny_dir, data, half, "adapter=full", "max_steps=6", "save_every=3")) == 0
    shutil.rmtree(half / "final")
    shutil.rmtree(half / "checkpoints" / "step-6")
    capsys.readouterr()
    assert main(args(tiny_dir, data, half, "adapter=full", "max_steps=6", "save_every=3")) == 0
    assert "recomputing" not in capsys.readouterr().err
    a = load_file(str(full / "final" / "model.safetensors"))
    b = load_file(str(half / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    changed = write_pairs(tmp_path / "changed.jsonl", n=12)
    shutil.rmtree(half / "final")
    assert main(args(tiny_dir, changed, half, "adapter=full", "max_steps=6")) == 0
    assert "recomputing" in capsys.readouterr().err


def test_unknown_loss_lists_the_choices(tiny_dir, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl")
    assert main(args(tiny_dir, data, tmp_path / "run", "loss=magic")) == 2
    err = capsys.readouterr().err.strip()
    assert "loss" in err and "simpo" in err and len(err.splitlines()) == 1
