"""Reward models end to end on a tiny local model: training, saving, scoring, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from posttrain.cli import main
from posttrain.data.preference import tokenize_ranked
from posttrain.errors import UserError
from posttrain.losses.preference import bradley_terry
from posttrain.modeling.inference import load_for_inference
from posttrain.train.reward import collate_ranked, load_scorer, reward_loss, score
from tests.tiny import save_tiny, tiny_tokenizer

PAIRS = [
    ("Capital of France?", "Paris", "Berlin"),
    ("What is 12 plus 30?", "42", "41"),
    ("Translate cheese to French.", "fromage", "bread"),
]


def write_pairs(path, n=24, ranked=False):
    with open(path, "w") as f:
        for i in range(n):
            p, good, bad = PAIRS[i % len(PAIRS)]
            row = {"prompt": p, "responses": [good, bad, "no idea"]} if ranked else {
                "prompt": p, "chosen": good, "rejected": bad}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny", family="llama")


def args(tiny_dir, data, out, *extra):
    return ["reward", f"model={tiny_dir}", f"data.train={data}", f"output_dir={out}",
            "batch_size=6", "max_length=64", "lr=5e-3", "log_every=1", "lora.r=4", *extra]  # fmt: skip


def test_pairs_tokenize_to_chat_turns_and_equal_pairs_are_dropped():
    tok = tiny_tokenizer("chatml")
    rows = [("a:1", {"prompt": "Hi", "chosen": "Yes", "rejected": "No"}),
            ("a:2", {"prompt": "Hi", "chosen": "Same", "rejected": "Same"})]  # fmt: skip
    examples, stats = tokenize_ranked(rows, tok, 64)
    assert stats["dropped_equal"] == 1 and len(examples) == 1
    first = tok.decode(examples[0]["responses"][0]["input_ids"])
    assert "<|im_start|>assistant" in first and first.rstrip().endswith("Yes<|im_end|>")


def test_loss_is_bradley_terry_of_the_score_head(tiny_dir):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1)
    tok = tiny_tokenizer("chatml")
    model.config.pad_token_id = tok.pad_token_id
    rows = [
        (f"r{i}", {"prompt": p, "chosen": g, "rejected": b}) for i, (p, g, b) in enumerate(PAIRS)
    ]
    examples, _ = tokenize_ranked(rows, tok, 64)
    batch = collate_ranked(examples, [[0, 1, 2]], tok.pad_token_id)
    loss, metrics = reward_loss(model, batch)
    alone = [
        model(input_ids=torch.tensor([r["input_ids"]])).logits[0, 0]
        for e in examples
        for r in e["responses"]
    ]
    want = sum(bradley_terry(alone[i], alone[i + 1]) for i in (0, 2, 4))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    assert 0.0 <= metrics["accuracy"] <= 1.0


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_reward_training_learns_the_pairs_and_saves_a_scorer(tiny_dir, tmp_path, adapter, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    assert (
        main(args(tiny_dir, data, out, f"adapter={adapter}", "max_steps=12", f"data.eval={data}"))
        == 0
    )
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert train[-1]["loss"] < train[0]["loss"]
    assert records[-1]["eval_accuracy"] == 1.0
    model, tok = load_scorer(str(out))
    good, bad = score(
        model, tok, [{"prompt": p, "completion": c} for p, c in [PAIRS[0][:2], PAIRS[0][::2]]]
    )
    assert good > bad
    scored = tmp_path / "scored.jsonl"
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Capital of France?", "completion": "Paris"}) + "\n")
    assert main(["reward", "score", str(out), f"data={rows}", f"output={scored}"]) == 0
    assert json.loads(scored.read_text())["reward"] == pytest.approx(good, abs=1e-4)
    with pytest.raises(UserError, match="is a reward model"):  # generation needs a causal LM
        load_for_inference(str(out))
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "Paris is the capital of France."}) + "\n")
    assert main(["sft", f"model={out}", f"data.train={text}", f"output_dir={tmp_path / 's'}"]) == 2
    assert "is a reward model" in capsys.readouterr().err


def test_a_causal_lm_is_not_taken_for_a_reward_model(tiny_dir, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Capital of France?", "completion": "Paris"}) + "\n")
    assert main(["reward", "score", tiny_dir, f"data={rows}"]) == 2  # a random head would score
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "not a reward model" in err and "posttrain reward" in err


def test_ranked_lists_train_and_resume_exactly(tiny_dir, tmp_path):
    data = write_pairs(tmp_path / "ranked.jsonl", ranked=True)
    full, half = tmp_path / "full", tmp_path / "half"
    assert main(args(tiny_dir, data, full, "max_steps=6")) == 0
    assert main(args(tiny_dir, data, half, "max_steps=6", "save_every=3")) == 0
    # drop the final model and the last checkpoint, then re-run: resumes from step 3
    import shutil

    shutil.rmtree(half / "final")
    shutil.rmtree(half / "checkpoints" / "step-6")
    assert main(args(tiny_dir, data, half, "max_steps=6", "save_every=3")) == 0
    a = load_file(str(full / "final" / "adapter_model.safetensors"))
    b = load_file(str(half / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("score" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_preference_rows_are_one_line_errors(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Hi", "chosen": "Yes"}) + "\n")
    assert main(args(tiny_dir, str(bad), tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.jsonl:1" in err and "rejected" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_loglik_readout_is_head_plus_weighted_response_loglik(tiny_dir):
    from transformers import AutoModelForCausalLM

    from posttrain.modeling.loglik_reward import LoglikReward

    tok = tiny_tokenizer("chatml")
    model = LoglikReward(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32))
    with torch.no_grad():
        model.loglik_weight.fill_(0.7)
    rows = [(f"r{i}", {"prompt": p, "chosen": g, "rejected": b}) for i, (p, g, b) in
            enumerate(PAIRS)]  # fmt: skip
    examples, _ = tokenize_ranked(rows, tok, 64)
    batch = collate_ranked(examples, [[0, 1, 2]], tok.pad_token_id)
    got = model(batch)
    for n, r in enumerate(r for e in examples for r in e["responses"]):
        out = model.lm(input_ids=torch.tensor([r["input_ids"]]), output_hidden_states=True)
        logp = out.logits[0].log_softmax(-1)
        loglik = sum(logp[t, y] for t, y in enumerate(r["targets"]) if y != -100)
        want = model.score(out.hidden_states[-1][0, -1]).squeeze() + 0.7 * loglik
        torch.testing.assert_close(got[n], want, rtol=1e-5, atol=1e-5)


def test_loglik_readout_trains_only_the_head_and_scores_after_saving(tiny_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    assert main(args(tiny_dir, data, out, "readout=last+loglik", "max_steps=8",
                     "max_grad_norm=0")) == 0  # fmt: skip
    head = load_file(str(out / "final" / "reward_head.safetensors"))
    assert float(head["loglik_weight"]) != 0.0
    saved = load_file(str(out / "final" / "model.safetensors"))
    original = load_file(f"{tiny_dir}/model.safetensors")
    assert all(torch.equal(saved[k], original[k]) for k in original)  # the LM stayed frozen
    model, tok = load_scorer(str(out))
    rows = [{"prompt": p, "completion": c} for p, c in [PAIRS[1][:2], PAIRS[1][::2]]]
    good, bad = score(model, tok, rows)
    assert good > bad
    assert main(args(tiny_dir, data, tmp_path / "x", "readout=mean")) == 2
