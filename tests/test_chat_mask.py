"""Chat templates, assistant masks and tokenize_sft targets on the tiny tokenizers."""

from __future__ import annotations

import functools

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from posttrain.data.chat import CHATML_TEMPLATE, ensure_chat_template, render_with_mask
from posttrain.data.tokenize import tokenize_sft
from posttrain.errors import UserError
from tests.tiny import CORPUS, EOS, tiny_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be nice."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "Sort the letters of cab"},
    {"role": "assistant", "content": "abc"},
    {"role": "user", "content": "What is 12 plus 30?"},
    {"role": "assistant", "content": "It is 42."},
]
ANSWERS = ["Hi! How can I help?", "abc", "It is 42."]
# Mistral's template writes a space before the content and has no generation prompt
LEAD = {"chatml": "", "llama3": "", "gemma": "", "mistral": " "}


@functools.cache
def tokenizer(template: str | None):
    return tiny_tokenizer(template)


def fresh(template: str | None):
    return tiny_tokenizer(template)


def masked_segments(tok, ids: list[int], mask: list[int]) -> list[str]:
    """Decoded runs of consecutive masked tokens."""
    runs, run = [], []
    for token, m in zip(ids + [None], mask + [0]):
        if m:
            run.append(token)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs


@pytest.mark.parametrize("template", ["chatml", "llama3", "gemma", "mistral"])
@pytest.mark.parametrize("system", [True, False])
def test_mask_is_exactly_assistant_content_and_end_of_turn(template, system):
    tok = tokenizer(template)
    messages = CONVERSATION if system else CONVERSATION[1:]
    ids, mask = render_with_mask(tok, messages)
    assert len(ids) == len(mask)
    expected = [LEAD[template] + answer + EOS[template] for answer in ANSWERS]
    assert masked_segments(tok, ids, mask) == expected
    text = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ids) == text  # one rendering, tokenized once
    assert ids == tok(text, add_special_tokens=False)["input_ids"]


def test_template_bos_is_not_doubled():
    tok = tokenizer("llama3")
    ids, _ = render_with_mask(tok, CONVERSATION)
    assert ids.count(tok.convert_tokens_to_ids("<|begin_of_text|>")) == 1


def test_bos_is_added_when_the_tokenizer_adds_it_and_the_template_does_not():
    tok = fresh("chatml")
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    tok.bos_token = "<|begin_of_text|>"
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    ids, mask = render_with_mask(tok, CONVERSATION)
    assert ids[0] == bos and mask[0] == 0 and ids.count(bos) == 1
    assert masked_segments(tok, ids, mask) == [a + "<|im_end|>" for a in ANSWERS]
    (example,), _ = tokenize_sft([("d:1", {"messages": CONVERSATION})], tok, 256)
    assert example["input_ids"] == ids
    tok.chat_template = "{{ bos_token }}" + tok.chat_template  # a template that writes BOS
    assert render_with_mask(tok, CONVERSATION)[0] == ids


def test_prompt_side_assistant_turns_are_not_trained():
    tok = tokenizer("chatml")
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["train"] = False
    ids, mask = render_with_mask(tok, messages)
    assert masked_segments(tok, ids, mask) == ["abc<|im_end|>", "It is 42.<|im_end|>"]


QWEN3_LIKE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_inconsistent_prefixes_fall_back_to_content_search():
    tok = fresh("chatml")
    tok.chat_template = QWEN3_LIKE  # an earlier turn renders differently once it is not last
    ids, mask = render_with_mask(tok, CONVERSATION)
    assert masked_segments(tok, ids, mask) == [
        "Hi! How can I help?<|im_end|>",
        "abc<|im_end|>",
        "<think>\n\n</think>\n\nIt is 42.<|im_end|>",
    ]


DROPS_OLD_REASONING = QWEN3_LIKE.replace(
    "+ m['content'] + '<|im_end|>\n' }}{% endif %}",
    "+ m['content'].split('</think>')[-1].lstrip() + '<|im_end|>\n' }}{% endif %}",
)
assert DROPS_OLD_REASONING != QWEN3_LIKE


def test_fallback_finds_answers_whose_old_reasoning_the_template_drops():
    tok = fresh("chatml")
    tok.chat_template = DROPS_OLD_REASONING
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["content"] = "<think>\nhmm\n</think>\n\nHi! How can I help?"
    ids, mask = render_with_mask(tok, messages)
    assert "hmm" not in tok.decode(ids)
    assert masked_segments(tok, ids, mask) == [
        "Hi! How can I help?<|im_end|>",
        "abc<|im_end|>",
        "<think>\n\n</think>\n\nIt is 42.<|im_end|>",
    ]


def test_fallback_does_not_match_an_echo_inside_the_user_turn():
    tok = fresh("chatml")
    tok.chat_template = QWEN3_LIKE
    messages = [
        {"role": "user", "content": "Say abc"},
        {"role": "assistant", "content": "abc"},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "abc"},
    ]
    ids, mask = render_with_mask(tok, messages)
    first = mask.index(1)
    assert tok.decode(ids[:first]) == "<|im_start|>user\nSay abc<|im_end|>\n<|im_start|>assistant\n"
    assert masked_segments(tok, ids, mask) == [
        "abc<|im_end|>",
        "<think>\n\n</think>\n\nabc<|im_end|>",
    ]


def test_conversation_opening_with_assistant():
    tok = tokenizer("chatml")
    messages = [{"role": "assistant", "content": "Welcome!"}] + CONVERSATION[1:3]
    ids, mask = render_with_mask(tok, messages)
    assert masked_segments(tok, ids, mask) == [
        "Welcome!<|im_end|>",
        "Hi! How can I help?<|im_end|>",
    ]


def test_unlocatable_turn_is_an_error_not_a_guess():
    tok = fresh("chatml")
    tok.chat_template = CHATML_TEMPLATE.replace("message['content']", "message['content'] | upper")
    with pytest.raises(UserError, match="cannot locate assistant turn 2"):
        render_with_mask(tok, CONVERSATION)


def test_template_errors_are_user_errors():
    tok = fresh("chatml")
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(
        UserError, match=r"chat template failed on this conversation \(roles must alternate\)"
    ):
        render_with_mask(tok, CONVERSATION)


def test_slow_tokenizer_path_tokenizes_pieces(monkeypatch):
    tok = fresh("chatml")
    monkeypatch.setattr(type(tok), "is_fast", property(lambda self: False))
    ids, mask = render_with_mask(tok, CONVERSATION)
    assert masked_segments(tok, ids, mask) == [a + "<|im_end|>" for a in ANSWERS]


# ----------------------------------------------------------------------------- ensure_chat_template


def bare_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with no ChatML tokens and no chat template."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")


def test_missing_template_is_a_user_error():
    tok = bare_tokenizer()
    tok.name_or_path = "org/base-model"
    with pytest.raises(UserError) as info:
        ensure_chat_template(tok)
    assert str(info.value) == (
        "the tokenizer of org/base-model has no chat template; "
        "set chat_template=chatml or use text/prompt_completion data"
    )
    with pytest.raises(UserError, match="no chat template"):
        tokenize_sft([("d.jsonl:1", {"messages": CONVERSATION})], tok, 64)


def test_chatml_adds_tokens_and_template():
    tok = bare_tokenizer()
    before = len(tok)
    ensure_chat_template(tok, "chatml")
    assert len(tok) == before + 2  # the caller resizes the embeddings
    ids, mask = render_with_mask(tok, CONVERSATION)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(im_end) == len(CONVERSATION)
    assert masked_segments(tok, ids, mask) == [a + "<|im_end|>" for a in ANSWERS]
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ensure_chat_template(tok, "chatml")
    assert len(tok) == before + 2  # idempotent


def test_existing_template_is_kept():
    tok = fresh("llama3")
    ensure_chat_template(tok)
    assert "<|eot_id|>" in tok.chat_template


# ----------------------------------------------------------------------------- tokenize_sft


def test_text_trains_every_token_and_appends_eos():
    tok = tokenizer("chatml")
    (example,), stats = tokenize_sft([("d:1", {"text": "Hello there"})], tok, 64)
    ids = tok("Hello there")["input_ids"] + [tok.eos_token_id]
    assert example == {"input_ids": ids, "targets": ids[1:] + [-100]}
    assert stats == {
        "examples": 1,
        "truncated": 0,
        "dropped_no_target": 0,
        "tokens": len(ids),
        "target_tokens": len(ids) - 1,
    }


def test_prompt_completion_trains_completion_and_eos_even_when_pad_is_eos():
    tok = fresh("chatml")
    tok.pad_token = tok.eos_token
    (example,), _ = tokenize_sft(
        [("d:1", {"prompt": "What is 12 plus 30?", "completion": " 42"})], tok, 64
    )
    p = tok("What is 12 plus 30?")["input_ids"]
    c = tok(" 42", add_special_tokens=False)["input_ids"]
    assert example["input_ids"] == p + c + [tok.eos_token_id]
    assert example["targets"] == [-100] * (len(p) - 1) + c + [tok.eos_token_id, -100]


@pytest.mark.parametrize("template", ["chatml", "gemma"])
def test_messages_targets_follow_the_mask(template):
    tok = tokenizer(template)
    (example,), stats = tokenize_sft([("d:1", {"messages": CONVERSATION})], tok, 256)
    ids, mask = render_with_mask(tok, CONVERSATION)
    assert example["input_ids"] == ids
    trained = [t for t in example["targets"] if t != -100]
    assert trained == [i for i, m in zip(ids, mask) if m]
    assert stats["target_tokens"] == sum(mask)
    eot = tok.convert_tokens_to_ids(EOS[template])
    assert trained.count(eot) == len(ANSWERS)


def test_truncation_dropping_and_stats():
    tok = tokenizer("chatml")
    long_prompt = "Paris is the capital of France. " * 10
    rows = [
        ("d:1", {"text": "The quick brown fox jumps over the lazy dog."}),
        ("d:2", {"prompt": long_prompt, "completion": "yes"}),  # the completion falls off
        ("d:3", {"prompt": "Hi", "completion": long_prompt}),  # truncated, kept
    ]
    examples, stats = tokenize_sft(rows, tok, 20)
    assert len(examples) == 2
    assert all(len(e["input_ids"]) <= 20 and e["targets"][-1] == -100 for e in examples)
    assert stats["examples"] == 2 and stats["dropped_no_target"] == 1 and stats["truncated"] == 1
    assert stats["tokens"] == sum(len(e["input_ids"]) for e in examples)
    assert stats["target_tokens"] == sum(t != -100 for e in examples for t in e["targets"])


def test_everything_dropped_is_a_user_error():
    tok = tokenizer("chatml")
    rows = [("d:1", {"prompt": "Paris is the capital of France. " * 5, "completion": "x"})]
    with pytest.raises(
        UserError, match=r"no example has a trained token within max_length=8 .*raise max_length"
    ):
        tokenize_sft(rows, tok, 8)


def test_row_errors_name_the_row():
    tok = tokenizer("chatml")
    rows = [
        ("d.jsonl:1", {"text": "a"}),
        ("d.jsonl:2", {"messages": [{"role": "user", "content": 1}]}),
    ]
    with pytest.raises(
        UserError, match=r"^d\.jsonl:2: field 'messages'\[0\]\.content must be a string$"
    ):
        tokenize_sft(rows, tok, 64)


def test_many_mixed_rows_keep_their_order():
    tok = tokenizer("llama3")
    rows = []
    for i in range(1500):
        kind = i % 3
        if kind == 0:
            rows.append((f"d:{i}", {"text": f"What is {i} plus 30?"}))
        elif kind == 1:
            rows.append((f"d:{i}", {"prompt": f"What is {i}?", "completion": f" It is {i}."}))
        else:
            rows.append(
                (
                    f"d:{i}",
                    {
                        "messages": CONVERSATION[1:3]
                        + [
                            {"role": "user", "content": str(i)},
                            {"role": "assistant", "content": f"It is {i}."},
                        ]
                    },
                )
            )
    examples, stats = tokenize_sft(rows, tok, 512)
    assert stats["examples"] == 1500
    assert tok.decode(examples[3]["input_ids"]).startswith("What is 3 plus 30?")
    assert tok.decode([t for t in examples[5]["targets"] if t != -100]).endswith(
        "It is 5.<|eot_id|>"
    )
