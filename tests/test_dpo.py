"""DPO family end to end on a tiny local model: first-step loss, learning, cache, resume, errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import main
from posttrain.data.preference import tokenize_unpaired
from posttrain.train.dpo import LOSSES
from tests.test_reward import PAIRS, write_pairs
from tests.tiny import save_tiny, tiny_tokenizer


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


@pytest.mark.parametrize("loss", [x for x in LOSSES if x != "kto"])
def test_every_pair_loss_trains(tiny_dir, tmp_path, loss):
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
    assert main(args(tiny_dir, changed, half, "adapter=full", "max_steps=6")) == 2
    assert "started with data.train=" in capsys.readouterr().err  # resuming would mix the two
    shutil.rmtree(half / "final")
    shutil.rmtree(half / "checkpoints")  # a start over in the same folder: the cache is stale
    assert main(args(tiny_dir, changed, half, "adapter=full", "max_steps=6")) == 0
    assert "recomputing" in capsys.readouterr().err


def test_unknown_loss_lists_the_choices(tiny_dir, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl")
    assert main(args(tiny_dir, data, tmp_path / "run", "loss=magic")) == 2
    err = capsys.readouterr().err.strip()
    assert "loss" in err and "simpo" in err and len(err.splitlines()) == 1


def write_unpaired(path, n=24):
    with open(path, "w") as f:
        for i in range(n):
            prompt, good, bad = PAIRS[i % len(PAIRS)]
            row = {"prompt": prompt, "completion": good if i % 2 else bad, "label": bool(i % 2)}
            f.write(json.dumps(row) + "\n")
    return str(path)


def test_kto_examples_pair_each_completion_with_the_previous_rows_for_the_kl_term():
    tok = tiny_tokenizer("chatml")
    rows = [("a:1", {"prompt": "Hi", "completion": "Yes", "label": True}),
            ("a:2", {"prompt": "Bye", "chosen": "Later", "rejected": "Go away"})]  # fmt: skip
    examples, stats = tokenize_unpaired(rows, tok, 64)
    assert [e["label"] for e in examples] == [True, True, False] and stats["examples"] == 3

    def text(side):
        return tok.decode(side["input_ids"])

    assert "Hi" in text(examples[0]["responses"][1]) and "Go away" in text(
        examples[0]["responses"][1]
    )
    assert "Bye" in text(examples[2]["responses"][1]) and "Later" in text(
        examples[2]["responses"][1]
    )


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_kto_starts_at_one_half_and_separates_desirable_from_undesirable(
    tiny_dir, tmp_path, adapter
):
    """Policy == reference at step 1 gives r = z0 = 0, so each example's loss is 1 - sigmoid(0)."""
    data = write_unpaired(tmp_path / "kto.jsonl")
    out = tmp_path / "run"
    extra = [f"adapter={adapter}", "loss=kto", "max_steps=12", "batch_size=8", "beta=0.5"]
    assert main(args(tiny_dir, data, out, *extra, f"data.eval={data}", "eval_every=12")) == 0
    train = losses(out)
    assert train[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert train[-1]["loss"] < train[0]["loss"]
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["eval_rewards_chosen"] > 0 > last["eval_rewards_rejected"]
    assert (out / "reference_logps.json").is_file() == (adapter == "full")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "Hi", "completion": "Yes"}, "kto.jsonl:1: missing field 'label'"),
        (
            {"prompt": "Hi", "completion": "Yes", "label": "yes"},
            "kto.jsonl:1: field 'label' must be",
        ),
    ],  # fmt: skip
)
def test_kto_bad_rows_name_the_row(tiny_dir, tmp_path, capsys, row, message):
    data = tmp_path / "kto.jsonl"
    data.write_text((json.dumps(row) + "\n") * 3)
    assert main(args(tiny_dir, data, tmp_path / "run", "loss=kto")) == 2
    assert message in capsys.readouterr().err


def test_sft_weight_adds_the_chosen_mean_nll_to_each_pair_loss():
    from posttrain.train.dpo import DPOConfig, pair_losses

    pol = torch.tensor([[-6.0, -9.0], [-4.0, -2.0]])  # (B, 2) summed log-probs
    count = torch.tensor([[3.0, 3.0], [2.0, 4.0]])
    ref = torch.tensor([[-7.0, -8.0], [-4.0, -3.0]])
    plain = DPOConfig(model="m", sft_weight=0.0)
    rpo = DPOConfig(model="m", sft_weight=0.5)
    base = pair_losses(plain, pol, count, ref)[0]
    logits = 0.1 * torch.tensor([(-6 + 7) - (-9 + 8), (-4 + 4) - (-2 + 3)])
    assert torch.allclose(base, -torch.nn.functional.logsigmoid(logits))
    assert torch.allclose(
        pair_losses(rpo, pol, count, ref)[0], base + 0.5 * torch.tensor([2.0, 2.0])
    )
