"""detect_format / to_sft_example: every accepted shape and errors naming row and field."""

from __future__ import annotations

import pytest

from posttrain.data.formats import detect_format, to_sft_example
from posttrain.errors import UserError

W = "chats.jsonl:4"


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"text": "x", "meta": 1}, "text"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"instruction": "a", "output": "b"}, "alpaca"),
        ({"messages": []}, "messages"),
        ({"conversations": []}, "messages"),
    ],
)
def test_detect_format(row, fmt):
    assert detect_format(row) == fmt


def test_detect_format_names_row_and_lists_shapes():
    with pytest.raises(UserError) as info:
        detect_format({"question": "a", "answer": "b"}, W)
    message = str(info.value)
    assert message.startswith(f"{W}: unknown row format (fields: answer, question)")
    for shape in ("text", "prompt_completion", "alpaca", "messages", "conversations"):
        assert shape in message
    with pytest.raises(UserError, match="preference data"):
        detect_format({"prompt": "a", "chosen": "b", "rejected": "c"}, W)


def test_text_and_prompt_completion_strings():
    assert to_sft_example(W, {"text": "hi"}) == {"text": "hi"}
    row = {"prompt": "Q", "completion": "A", "extra": 0}
    assert to_sft_example(W, row) == {"prompt": "Q", "completion": "A"}


def test_prompt_completion_messages_trains_only_the_completion():
    row = {
        "prompt": [
            {"role": "user", "content": "1"},
            {"role": "assistant", "content": "2"},
            {"role": "user", "content": "3"},
        ],
        "completion": "4",
    }
    assert to_sft_example(W, row) == {
        "messages": [
            {"role": "user", "content": "1"},
            {"role": "assistant", "content": "2", "train": False},
            {"role": "user", "content": "3"},
            {"role": "assistant", "content": "4"},
        ]
    }


def test_alpaca():
    row = {"instruction": "Do", "input": "this", "output": "done", "system": "S"}
    assert to_sft_example(W, row) == {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Do\n\nthis"},
            {"role": "assistant", "content": "done"},
        ]
    }
    plain = to_sft_example(W, {"instruction": "Do", "input": "", "output": "ok"})
    assert plain["messages"] == [
        {"role": "user", "content": "Do"},
        {"role": "assistant", "content": "ok"},
    ]


def test_messages_and_sharegpt():
    expected = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
        ]
    }
    row = {
        "messages": [
            {"role": r, "content": c}
            for r, c in [("system", "S"), ("user", "hi"), ("assistant", "yo")]
        ]
    }
    assert to_sft_example(W, row) == expected
    share = {
        "conversations": [
            {"from": f, "value": v} for f, v in [("system", "S"), ("human", "hi"), ("gpt", "yo")]
        ]
    }
    assert to_sft_example(W, share) == expected
    inside = {"messages": share["conversations"]}
    assert to_sft_example(W, inside) == expected
    parts = {
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "y"}, {"type": "text", "text": "o"}],
            },
        ]
    }
    assert to_sft_example(W, parts)["messages"][1] == {"role": "assistant", "content": "yo"}


@pytest.mark.parametrize(
    ("row", "fmt", "message"),
    [
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]}, "auto", r"chats\.jsonl:4: field 'messages'\[1\]\.content must be a string$"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}, "auto", r"field 'messages'\[1\]\.role must be one of .*got 'tool'"),
        ({"messages": [{"role": "user"}]}, "auto", r"field 'messages'\[0\]\.content is missing"),
        ({"messages": ["hi"]}, "auto", r"field 'messages'\[0\] must be an object"),
        ({"messages": []}, "auto", r"field 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user", "content": "a"}]}, "auto", r"chats\.jsonl:4: field 'messages' has no assistant turn"),
        ({"conversations": [{"from": "human", "value": "a"}]}, "auto", r"field 'conversations' has no assistant turn"),
        ({"instruction": "a", "output": None}, "auto", r"field 'output' must be a string, got null"),
        ({"instruction": "a", "output": "b", "input": 3}, "auto", r"field 'input' must be a string, got a number"),
        ({"text": ["a"]}, "auto", r"field 'text' must be a string, got a list"),
        ({"prompt": "a", "completion": 1}, "auto", r"field 'completion' must be a string or a list of messages"),
        ({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}]}, "auto", r"field 'completion' has no assistant turn"),
        ({"text": "a"}, "alpaca", r"chats\.jsonl:4: field 'instruction' is missing"),
        ({"text": "a"}, "messages", r"field 'messages' is missing"),
        ({"text": "a"}, "chat", r"data\.format must be auto or one of text, prompt_completion, alpaca, messages, got 'chat'"),
    ],
)  # fmt: skip
def test_errors_name_row_and_field(row, fmt, message):
    with pytest.raises(UserError, match=message):
        to_sft_example(W, row, fmt)


def test_forced_format_ignores_other_fields():
    row = {"text": "t", "prompt": "p", "completion": "c"}
    assert to_sft_example(W, row, "text") == {"text": "t"}
    assert to_sft_example(W, row) == {"prompt": "p", "completion": "c"}
