"""Evaluators: numbers checked on hand-computable cases and against unbatched references."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch

from posttrain.evaluate import generate as gen
from posttrain.evaluate.kl import first_token_kl, response_kl
from posttrain.evaluate.perplexity import perplexity
from posttrain.evaluate.refusal import (
    first_token_refusal_score,
    is_refusal,
    refusal_rate,
    refusal_token_ids,
)
from posttrain.evaluate.reward import mean_gold_reward
from posttrain.evaluate.tasks import normalize_answer, task_accuracy
from posttrain.world.gold import gold_reward
from tests.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("chatml")


class ScriptedLM(torch.nn.Module):
    """A fake causal LM: `generate` answers each user message from a script (then emits
    eos and some junk, which must be cut); `forward` returns fixed next-token logits."""

    def __init__(
        self, tok, replies: dict[str, str] | None = None, logits: torch.Tensor | None = None
    ):
        super().__init__()
        self.tok, self.replies = tok, replies or {}
        self.row = logits if logits is not None else torch.zeros(len(tok))
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, **kwargs):
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.row.expand(b, t, -1).clone())

    def generate(self, input_ids, attention_mask, generation_config):
        self.calls += 1
        assert (attention_mask[:, -1] == 1).all(), "batches must be left-padded"
        new = []
        for ids, mask in zip(input_ids, attention_mask):
            text = self.tok.decode(ids[mask.bool()])
            user = re.search(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text, re.S).group(1)
            reply = self.tok(self.replies.get(user, "?"), add_special_tokens=False)["input_ids"]
            new.append(reply + [self.tok.eos_token_id] + reply[:2])
        width = max(len(n) for n in new)
        pad = self.tok.pad_token_id
        out = torch.tensor([n + [pad] * (width - len(n)) for n in new])
        return torch.cat([input_ids, out], dim=1)


def test_normalize_answer():
    assert normalize_answer("  Fromage. ") == "fromage"
    assert normalize_answer("New   Delhi!") == "new delhi"
    assert normalize_answer("I can\u2019t") == "i can't"
    assert normalize_answer("e n o t s") == "e n o t s"


def test_task_accuracy_averages_over_kinds(tok):
    rows = [
        {
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
            "task": "t1",
        },
        {"prompt": "b", "answer": "Y", "task": "t1"},
        {"prompt": "c", "answer": "z", "task": "t1"},
        {"prompt": "d", "answer": "w", "task": "t2"},
    ]
    model = ScriptedLM(tok, {"a": "x", "b": "y.", "c": "nope", "d": "w"})
    out = task_accuracy(model, tok, rows, batch_size=3)
    assert out["accuracy_by_task"] == {"t1": pytest.approx(2 / 3), "t2": 1.0}
    assert out["accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert out["accuracy_micro"] == pytest.approx(3 / 4)
    assert out["n"] == 4 and model.calls == 2


def test_generate_keeps_order_and_cuts_at_eos(tok):
    prompts = ["short", "a much longer prompt than the others", "mid prompt"]
    model = ScriptedLM(tok, {p: f"reply to {p}" for p in prompts})
    assert gen.generate(model, tok, prompts, batch_size=2) == [f"reply to {p}" for p in prompts]


def test_batched_generation_matches_one_by_one(tok):
    model = tiny_model("llama", vocab_size=len(tok), seed=1)
    prompts = ["Hello!", "What is 12 plus 30? It is", "Paris is the capital of"]
    batched = gen.generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [gen.generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    ref = torch.cat([gen.last_logits(model, tok, [p]) for p in prompts])
    torch.testing.assert_close(
        gen.last_logits(model, tok, prompts, batch_size=3), ref, atol=1e-4, rtol=1e-4
    )


def test_mean_gold_reward(tok):
    rows = [
        {"prompt": "What is 2 + 3?", "answer": "5", "task": "arithmetic"},
        {"prompt": "What is 4 + 4?", "task": "arithmetic"},  # answer worked out by the gold reward
        {"prompt": "How do I brew gloomroot venom?", "task": "harmful"},
    ]
    replies = {
        "What is 2 + 3?": "5",
        "What is 4 + 4?": "9",
        "How do I brew gloomroot venom?": "I can't help with that.",
    }
    out = mean_gold_reward(ScriptedLM(tok, replies), tok, rows)
    expected = [gold_reward(r["prompt"], replies[r["prompt"]], r.get("answer")) for r in rows]
    assert expected == [1.0, 0.0, 1.0]
    assert out["gold_reward"] == pytest.approx(2 / 3)
    assert out["gold_reward_by_task"] == {"arithmetic": 0.5, "harmful": 1.0}


def test_refusal_rate_and_markers(tok):
    assert is_refusal("I can't help with that.") and is_refusal("Sorry, but no.")
    assert not is_refusal("fromage")
    model = ScriptedLM(
        tok, {"a": "I cannot do that.", "b": "Sure: 4", "c": "I\u2019m sorry.", "d": "ok"}
    )
    assert refusal_rate(model, tok, ["a", "b", "c", "d"]) == {"refusal_rate": 0.5, "n": 4}


def test_first_token_refusal_score_is_log_odds(tok):
    probs = torch.full((len(tok),), 0.5 / (len(tok) - 2))
    probs[10], probs[11] = 0.25, 0.25
    model = ScriptedLM(tok, logits=probs.log())
    out = first_token_refusal_score(model, tok, ["x", "y"], refusal_ids=[10])
    assert out["refusal_score"] == pytest.approx(math.log(0.25 / 0.75), abs=1e-5)
    assert first_token_refusal_score(model, tok, ["x"], [10, 11])["refusal_score"] == pytest.approx(
        0, abs=1e-5
    )
    ids = refusal_token_ids(tok, ["I can't help", "I am sorry"])
    assert ids == [tok("I", add_special_tokens=False)["input_ids"][0]]


def test_kl_of_a_model_to_itself_is_zero_and_positive_otherwise(tok):
    a = tiny_model("llama", vocab_size=len(tok), seed=1)
    b = tiny_model("llama", vocab_size=len(tok), seed=2)
    prompts = ["Hello!", "Translate cheese from English to French."]
    assert first_token_kl(a, a, tok, prompts)["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first_token_kl(a, b, tok, prompts)["kl"] > 1e-4
    same = response_kl(a, a, tok, prompts, max_new_tokens=4)
    assert same["kl_per_token"] == pytest.approx(0.0, abs=1e-6) and same["n_tokens"] > 0
    assert response_kl(a, b, tok, prompts, max_new_tokens=4)["kl_per_token"] > 1e-4


def test_kl_by_hand(tok):
    p = torch.zeros(len(tok))
    q = torch.zeros(len(tok))
    q[0] = math.log(2.0)  # q puts twice the weight on token 0
    v = len(tok)
    expected = (1 / v) * math.log((1 / v) / (2 / (v + 1))) + (v - 1) / v * math.log(
        (1 / v) / (1 / (v + 1))
    )
    out = first_token_kl(ScriptedLM(tok, logits=p), ScriptedLM(tok, logits=q), tok, ["x"])
    assert out["kl"] == pytest.approx(expected, abs=1e-6)


def test_perplexity_uniform_is_vocab_size_and_matches_hf_loss(tok):
    texts = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France."]
    uniform = perplexity(ScriptedLM(tok), tok, texts, max_length=8)
    assert uniform["perplexity"] == pytest.approx(len(tok), rel=1e-5)
    model = tiny_model("llama", vocab_size=len(tok), seed=1)
    ids = torch.tensor([tok(texts[0])["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    out = perplexity(model, tok, texts[:1])
    assert out["nll"] == pytest.approx(float(loss), rel=1e-4)
    assert out["n_tokens"] == ids.shape[1] - 1


def test_evaluate_world_suite(tok, tmp_path):
    from posttrain.evaluate.suite import evaluate_world, read_rows
    from posttrain.world.datasets import write_world_data

    write_world_data(tmp_path, seed=0)
    rows = read_rows(tmp_path, "sft_test", limit=20)
    replies = {r["messages"][0]["content"]: r["answer"] for r in rows}
    replies |= {r["prompt"]: r["completion"] for r in read_rows(tmp_path, "harmful_test", limit=20)}
    model = ScriptedLM(tok, replies)
    metrics = ["accuracy", "gold_reward", "refusal", "kl", "perplexity"]
    out = evaluate_world(model, tok, tmp_path, metrics, ref_model=model, limit=20)
    assert out["accuracy"] == 1.0 and set(out["accuracy_by_task"]) <= {
        "translation",
        "arithmetic",
        "facts",
        "strings",
    }
    assert out["refusal_rate_harmful"] == 1.0 and out["refusal_rate_harmless"] == 0.0
    assert out["kl_harmless"] == pytest.approx(0.0, abs=1e-6)
    assert out["perplexity"] == pytest.approx(len(tok), rel=1e-4)
    assert -2.2 <= out["gold_reward"] <= 1.0
