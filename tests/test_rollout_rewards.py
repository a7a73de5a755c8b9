"""posttrain.rollout.rewards: user functions and their checks, tiny-world rewards, reward models."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.errors import UserError
from posttrain.rollout import rewards as R
from tests.tiny import tiny_tokenizer

PROMPTS = ["What is 2 + 3?", "What is 4 * 5?", [{"role": "user", "content": "Compute 9 - 4."}]]
ANSWERS = ["5", "20", "5"]


# module-level functions, importable as tests.test_rollout_rewards:NAME
def length_reward(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def raises_on_twenty(prompts, completions, answer, **_):
    return [1.0 / (a != "20") for a in answer]


def nan_on_second(prompts, completions, **_):
    return [0.0, math.nan, 1.0][: len(completions)]


def no_kwargs(prompts, completions, answer):
    return [float(c == a) for c, a in zip(completions, answer)]


def test_load_function_and_bad_specs():
    assert R.load_function("posttrain.rollout.rewards:exact_answer") is R.exact_answer
    for bad, words in [
        ("no_colon", "module:function"),
        ("no_such_module_xyz:f", "cannot import"),
        ("posttrain.rollout.rewards:nope", "no function 'nope'"),
    ]:
        with pytest.raises(UserError, match="reward.fn") as e:
            R.load_function(bad)
        assert words in str(e.value)


def test_columns_reach_the_function_by_name():
    got = R.call_reward_fn(R.exact_answer, PROMPTS, ["5", "21", " 5. "], {"answer": ANSWERS})
    assert got == [1.0, 0.0, 1.0]
    assert R.call_reward_fn(length_reward, PROMPTS, ["a", "bb", ""], {"answer": ANSWERS}) == [
        1,
        2,
        0,
    ]


def test_bad_reward_functions_name_the_prompt_index():
    cols = {"answer": ANSWERS}
    with pytest.raises(UserError, match=r"raised on prompt 1 \('What is 4 \* 5\?'\).*ZeroDivision"):
        R.call_reward_fn(raises_on_twenty, PROMPTS, ["5", "20", "5"], cols, "my_fn")
    with pytest.raises(UserError, match=r"nan for prompt 1"):
        R.call_reward_fn(nan_on_second, PROMPTS, ["a", "b", "c"], cols)
    with pytest.raises(UserError, match="returned 2 rewards for 3 completions"):
        R.call_reward_fn(lambda prompts, completions, **_: [1.0, 2.0], PROMPTS, ["a", "b", "c"])
    with pytest.raises(UserError, match=r"None for prompt 2 \('Compute 9 - 4.'\)"):
        R.call_reward_fn(lambda prompts, completions, **_: [1, 2, None], PROMPTS, ["a", "b", "c"])
    with pytest.raises(UserError, match="raised on the batch"):
        R.call_reward_fn(lambda prompts, completions, **_: 1 / (len(prompts) - 3), PROMPTS, "abc")
    tensor_out = R.call_reward_fn(lambda prompts, completions, **_: torch.ones(3), PROMPTS, "abc")
    assert tensor_out == [1.0, 1.0, 1.0]


def test_gold_reward_ranks_correct_over_wrong_and_rambling():
    right = R.gold(PROMPTS, ["5", "20", "5"], answer=ANSWERS)
    wrong = R.gold(PROMPTS, ["6", "21", "4"])  # answers worked out from the prompts
    assert right == [1.0, 1.0, 1.0]
    assert all(w < r for w, r in zip(wrong, right))
    rambling = R.gold(PROMPTS[:1], ["5 " + "and so on " * 10])
    assert 0 < rambling[0] < 1.0


def test_combine_weights_and_truncation_penalty():
    sources = R.build_sources(
        ["posttrain.rollout.rewards:exact_answer", "tests.test_rollout_rewards:length_reward"],
        weights=[2.0, 0.5],
    )
    total, parts = R.combine(sources, PROMPTS, ["5", "abcd", "x"], {"answer": ANSWERS})
    assert parts["posttrain.rollout.rewards:exact_answer"].tolist() == [1.0, 0.0, 0.0]
    assert total.tolist() == [2.0 + 0.5, 0.5 * 4, 0.5 * 1]
    ended = torch.tensor([True, False, True])
    assert R.truncation_penalty(total, ended, 1.0).tolist() == [2.5, 1.0, 0.5]
    with pytest.raises(UserError, match="reward.weights"):
        R.build_sources(["posttrain.rollout.rewards:gold"], weights=[1.0, 2.0])
    with pytest.raises(UserError, match="reward.fn and/or reward.model"):
        R.build_sources()


def test_functions_are_checked_against_the_data_columns_before_any_step():
    exact, strict = "posttrain.rollout.rewards:exact_answer", "tests.test_rollout_rewards:no_kwargs"
    assert R.build_sources([exact, strict], columns=["answer"])  # both fit
    assert R.build_sources([exact], columns=["answer", "task"])  # **_ takes the rest
    with pytest.raises(UserError, match=r"exact_answer needs the data column 'answer'.*task"):
        R.build_sources([exact], columns=["task"])
    with pytest.raises(UserError, match=r"no_kwargs does not take the data column 'task'.*kwargs"):
        R.build_sources([strict], columns=["answer", "task"])
    R.check_columns(max, "builtin", ["task"])  # no signature to read: left to the call


def test_reward_model_source_matches_reward_score(tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from posttrain.train.reward import load_scorer, score

    tok = tiny_tokenizer("chatml")
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    completions = ["5", "twenty", "It is 5."]
    source = R.RewardModel(str(tmp_path), batch_size=2)
    got = R.call_reward_fn(source, PROMPTS, completions, {"answer": ANSWERS}, "reward_model")
    model, tokenizer = load_scorer(str(tmp_path))
    rows = [{"prompt": p, "completion": c} for p, c in zip(PROMPTS, completions)]
    want = score(model, tokenizer, rows)
    assert len(got) == 3 and len(set(got)) == 3
    assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-5)
