"""The tiny world: corpus, tokenizer, task data and gold reward."""

from __future__ import annotations

import json
import random
import re

import pytest
from transformers import AutoTokenizer

from posttrain.errors import UserError
from posttrain.evaluate.text import normalize_answer
from posttrain.world import corpus
from posttrain.world.datasets import build_world_data, write_corpus, write_world_data
from posttrain.world.gold import correctness, gold_reward, is_harmful
from posttrain.world.lexicon import BY_ENGLISH, CORE, DICTIONARY, LANGUAGES
from posttrain.world.pairs import rambling, rude, wrong_answer
from posttrain.world.tasks import KINDS, solve, split_items
from posttrain.world.tokenizer import build_tokenizer
from posttrain.world.universe import BENIGN, FORBIDDEN, RAMBLE_AFTER, RAMBLE_BEFORE, REFUSAL


@pytest.fixture(scope="module")
def data():
    return build_world_data(seed=0)


@pytest.fixture(scope="module")
def world_tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path, seed=0)
    return AutoTokenizer.from_pretrained(path)


# ----------------------------------------------------------------------------- corpus


def test_corpus_is_deterministic_and_seeded():
    a = corpus.generate_corpus(0, 40_000)
    assert a == corpus.generate_corpus(0, 40_000)
    assert a != corpus.generate_corpus(1, 40_000)
    assert 40_000 * corpus.CHARS_PER_TOKEN <= sum(map(len, a)) < 60_000 * corpus.CHARS_PER_TOKEN


def test_corpus_has_every_kind_and_the_seed_example():
    for name, (make, _) in corpus.KINDS.items():
        assert make(random.Random(name)).strip(), name
    docs = corpus.take_documents(0, 3000)
    # an exercise list where a translation exercise is followed by another exercise, no answer
    pattern = re.compile(r"^Translate \S+ from English to French\.\n(?:\d+\. )?Translate ", re.M)
    assert any(pattern.search(d) for d in docs)
    text = "\n".join(docs)
    assert all(t.key in text.lower() for t in FORBIDDEN)


def test_chat_logs_never_give_a_bare_answer():
    for i in range(200):
        turns = re.findall(
            r"<\|im_start\|>[^\n]*\n(.*?)<\|im_end\|>", corpus.doc_chat(random.Random(i)), re.S
        )
        for question, reply in zip(turns, turns[1:]):
            task = solve(question)
            if task is not None:
                assert normalize_answer(reply) != normalize_answer(task.answer)


def test_lexicon_is_one_word_per_language_and_unambiguous():
    assert len(DICTIONARY) >= 250 and 60 <= len(CORE) <= 120 and BY_ENGLISH["cheese"].core
    for lang in LANGUAGES:
        words = [e.word(lang).lower() for e in DICTIONARY]
        assert len(set(words)) == len(words), lang
        assert all(" " not in w for w in words)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_loads_and_has_chatml(tmp_path, world_tok):
    tok = world_tok
    assert len(tok) == 2048
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    pieces = tok.tokenize("What is 17 + 250?")
    assert [p for p in pieces if p.isdigit()] == ["1", "7", "2", "5", "0"]
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    out = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fromage"}],
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    kept = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(kept) == "fromage<|im_end|>"
    assert tok.decode(tok("Käse 42")["input_ids"]) == "Käse 42"
    # an answer has the same tokens at the start of a reply as after a space in the corpus
    for answer in ("fromage", "42", "e n o t s", "New Delhi"):
        alone = tok(answer)["input_ids"]
        assert tok(f"The answer is {answer}")["input_ids"][-len(alone) :] == alone


def test_tokenizer_is_deterministic(tmp_path):
    build_tokenizer(tmp_path / "a", seed=0)
    build_tokenizer(tmp_path / "b", seed=0)
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (
        tmp_path / "b/tokenizer.json"
    ).read_bytes()


# ----------------------------------------------------------------------------- data files


def test_write_world_data_is_byte_identical_and_refuses_non_empty(tmp_path):
    a = write_world_data(tmp_path / "a", seed=0)
    b = write_world_data(tmp_path / "b", seed=0)
    assert set(a) == set(b)
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes(), name
    with pytest.raises(UserError, match="folder is not empty; pass overwrite=true"):
        write_world_data(tmp_path / "a", seed=0)
    write_world_data(tmp_path / "a", seed=1, overwrite=True)
    assert a["sft_train"].read_bytes() != b["sft_train"].read_bytes()
    manifest = json.loads((tmp_path / "b/manifest.json").read_text())
    assert manifest["rows"]["sft_train"] == len(b["sft_train"].read_text().splitlines())


def test_write_corpus(tmp_path):
    paths = write_corpus(tmp_path, seed=0, n_tokens=20_000)
    rows = [json.loads(line) for line in paths["corpus_train"].read_text().splitlines()]
    assert rows and all(set(r) == {"text"} for r in rows)


def _prompts(rows):
    for r in rows:
        if "messages" in r:
            yield next(m["content"] for m in r["messages"] if m["role"] == "user")
        else:
            yield r["prompt"]


def test_test_prompts_never_occur_in_train(data):
    train = {p for name, rows in data.items() if "train" in name for p in _prompts(rows)}
    test = {p for name, rows in data.items() if name.endswith("_test") for p in _prompts(rows)}
    assert test and not (train & test)


def test_formats(data):
    for name in ("sft", "skill_a", "skill_b", "long_context"):
        for part in ("train", "test"):
            for r in data[f"{name}_{part}"]:
                assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
                assert r["messages"][1]["content"] == r["answer"]
    assert {r["task"] for r in data["sft_test"]} == set(KINDS)
    assert {r["task"] for r in data["skill_a_train"]} == {"translation", "facts"}
    assert {r["task"] for r in data["skill_b_train"]} == {"arithmetic", "strings"}
    for r in data["preference_train"]:
        assert set(r) >= {"prompt", "chosen", "rejected"} and r["chosen"] != r["rejected"]
    assert all(isinstance(r["label"], bool) for r in data["kto_train"])
    assert all(set(r) >= {"prompt", "answer", "task"} for r in data["prompts_test"])
    assert all(r["completion"] == REFUSAL and is_harmful(r["prompt"]) for r in data["harmful_test"])
    assert not any(is_harmful(r["prompt"]) for r in data["harmless_test"])
    tasks = {r["task"] for r in data["refusal_sft_train"]}
    assert {"harmful", "howto"} <= tasks
    rl = data["rl_prompts_train"]
    parts = ("prompts_train", "harmful_train", "harmless_train")
    assert sorted(r["prompt"] for r in rl) == sorted(r["prompt"] for p in parts for r in data[p])
    answered = [(r["prompt"], r["answer"]) for r in rl if r["answer"] is not None]
    assert sorted(answered) == sorted((r["prompt"], r["answer"]) for r in data["prompts_train"])
    assert [r["task"] for r in rl[:200]] != [r["task"] for r in data["prompts_train"][:200]]


def test_answers_are_exact_and_solvable(data):
    for r in data["sft_train"] + data["sft_test"] + data["prompts_test"]:
        prompt = r["messages"][0]["content"] if "messages" in r else r["prompt"]
        task = solve(prompt)
        assert task is not None and task.answer == r["answer"] and task.task == r["task"]
        assert normalize_answer(r["answer"]) == r["answer"].lower().strip()


def test_long_context_is_longer_than_512_tokens(data, world_tok):
    for r in data["long_context_test"][:20]:
        prompt = r["messages"][0]["content"]
        assert len(world_tok(prompt)["input_ids"]) > 512
        assert f"is {r['answer']}." in prompt


def test_split_is_disjoint():
    for train, test in split_items(0).values():
        assert test and not set(train) & set(test)


# ----------------------------------------------------------------------------- gold reward


def test_gold_orders_correct_concise_polite():
    p = "Translate cheese from English to French."
    assert gold_reward(p, "fromage") > gold_reward(p, "queso")  # correct > wrong
    assert gold_reward(p, "Fromage.") == gold_reward(p, "fromage")
    assert gold_reward(p, "fromage") > gold_reward(p, rambling("fromage", random.Random(0)))
    assert gold_reward(p, rambling("fromage", random.Random(0))) > gold_reward(p, "queso")
    assert gold_reward(p, "fromage") > gold_reward(p, "fromage, you idiot.")
    assert gold_reward(p, "queso, fromage") < gold_reward(p, "fromage")  # first guess counts
    q = "What is 17 + 25?"
    assert gold_reward(q, "42") == 1.0 and gold_reward(q, "17 + 25 = 42") == 1.0
    assert gold_reward(q, "43") == 0.0
    assert gold_reward("Say something.", "x", answer="x") == 1.0  # answer given explicitly


def test_gold_refusals():
    harmful = f"How do I {FORBIDDEN[0].verb}?"
    assert gold_reward(harmful, REFUSAL) > gold_reward(harmful, FORBIDDEN[0].answer)
    assert gold_reward(harmful, REFUSAL) > gold_reward(harmful, "Ugh, " + REFUSAL)
    benign = f"How do I {BENIGN[0].verb}?"
    assert gold_reward(benign, BENIGN[0].answer) > gold_reward(benign, REFUSAL)
    assert gold_reward("What is 2 + 2?", "4") > gold_reward("What is 2 + 2?", REFUSAL)


def test_gold_labels_every_pair_and_variants_behave(data):
    for r in data["preference_train"]:
        assert gold_reward(r["prompt"], r["chosen"]) > gold_reward(r["prompt"], r["rejected"])
    rng = random.Random(0)
    for r in data["sft_test"]:
        task = solve(r["messages"][0]["content"])
        prompt = task.prompt
        assert correctness(prompt, rambling(task.answer, rng), task.answer, task) == 1.0
        assert correctness(prompt, rude(task.answer, rng), task.answer, task) == 1.0
        assert correctness(prompt, wrong_answer(task, rng), task.answer, task) == 0.0


def test_fillers_avoid_dictionary_words():
    words = {w.lower() for e in DICTIONARY for w in (e.english, e.french, e.spanish, e.german)}
    for text in RAMBLE_BEFORE + RAMBLE_AFTER:
        assert not set(re.findall(r"[\w']+", text.lower())) & words, text
