"""Detect the format of an SFT row and normalise it to one of three shapes.

Accepted rows (detected per row, or forced with `data.format`):

- `text`: `{"text": str}`; every token is trained.
- `prompt_completion`: `{"prompt": str, "completion": str}`; the completion is trained. When
  either side is a message list the row becomes a conversation (a string prompt becomes one
  user turn, a string completion one assistant turn) and only the completion's assistant
  turns are trained.
- `alpaca`: `{"instruction", "input"?, "output", "system"?}`; becomes a conversation with
  user = instruction (+ "\\n\\n" + input when input is not empty) and assistant = output.
- `messages`: `{"messages": [{"role", "content"}, ...]}`, or ShareGPT
  `{"conversations": [{"from", "value"}, ...]}` (ShareGPT keys are also accepted inside
  "messages"). Roles `human`/`gpt`/`bot`/`model` map to user/assistant.

`to_sft_example` returns exactly one of `{"text"}`, `{"prompt", "completion"}` (strings) or
`{"messages": [{"role", "content"}, ...]}` with roles system/user/assistant. One addition:
an assistant turn that came from a conversational *prompt* carries `"train": False`, so that
only the completion is trained (as TRL does for conversational prompt-completion data).

Simplified on purpose: no tool calls or tool roles, no images; message content given as a
list of `{"type": "text", "text": ...}` parts is joined into one string, other parts are errors.
"""

from __future__ import annotations

from typing import Any

from posttrain.errors import UserError

FORMATS = ("text", "prompt_completion", "alpaca", "messages")
SHAPES = (
    "text: {text}; prompt_completion: {prompt, completion}; "
    "alpaca: {instruction, input?, output}; messages: {messages: [{role, content}]} "
    "or {conversations: [{from, value}]}"
)
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}


def detect_format(row: dict, where: str = "row") -> str:
    """The SFT format of `row` (one of FORMATS); UserError naming `where` when none matches."""
    if "messages" in row or "conversations" in row:
        return "messages"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    keys = ", ".join(sorted(map(str, row))) or "none"
    hint = "; this looks like preference data (use dpo)" if "chosen" in row else ""
    raise UserError(f"{where}: unknown row format (fields: {keys}); expected {SHAPES}{hint}")


def to_sft_example(where: str, row: dict, fmt: str = "auto") -> dict:
    """Normalise one row to {"text"}, {"prompt", "completion"} or {"messages"} (see module doc)."""
    if fmt == "auto":
        fmt = detect_format(row, where)
    if fmt == "text":
        return {"text": _string(where, row, "text")}
    if fmt == "prompt_completion":
        return _prompt_completion(where, row)
    if fmt == "alpaca":
        return _alpaca(where, row)
    if fmt == "messages":
        key = "messages" if "messages" in row or "conversations" not in row else "conversations"
        messages = _messages(where, row, key)
        _require_assistant(where, messages, key)
        return {"messages": messages}
    raise UserError(f"data.format must be auto or one of {', '.join(FORMATS)}, got {fmt!r}")


# ----------------------------------------------------------------------------- formats


def _prompt_completion(where: str, row: dict) -> dict:
    prompt, completion = _field(where, row, "prompt"), _field(where, row, "completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"prompt": prompt, "completion": completion}
    before = _side(where, row, "prompt", "user")
    after = _side(where, row, "completion", "assistant")
    for message in before:
        if message["role"] == "assistant":
            message["train"] = False
    _require_assistant(where, after, "completion")
    return {"messages": before + after}


def _side(where: str, row: dict, key: str, role: str) -> list[dict]:
    """One side of a prompt/completion row as messages (a string becomes one `role` turn)."""
    value = row[key]
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return _messages(where, row, key)
    raise UserError(f"{where}: field '{key}' must be a string or a list of messages")


def _alpaca(where: str, row: dict) -> dict:
    instruction, output = _string(where, row, "instruction"), _string(where, row, "output")
    extra = _optional_string(where, row, "input")
    system = _optional_string(where, row, "system")
    user = instruction + ("\n\n" + extra if extra else "")
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return {"messages": messages}


def _messages(where: str, row: dict, key: str) -> list[dict]:
    value = _field(where, row, key)
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: field '{key}' must be a non-empty list of messages")
    return [_message(where, f"'{key}'[{i}]", m) for i, m in enumerate(value)]


def _message(where: str, path: str, message: Any) -> dict:
    if not isinstance(message, dict):
        raise UserError(f"{where}: field {path} must be an object with role and content")
    role_key, content_key = ("from", "value") if "from" in message else ("role", "content")
    if role_key not in message:
        raise UserError(f"{where}: field {path}.role is missing")
    role = message[role_key]
    if role not in ROLES:
        known = ", ".join(ROLES)
        raise UserError(f"{where}: field {path}.{role_key} must be one of {known}, got {role!r}")
    if content_key not in message:
        raise UserError(f"{where}: field {path}.{content_key} is missing")
    content = _content(where, f"{path}.{content_key}", message[content_key])
    return {"role": ROLES[role], "content": content}


def _content(where: str, path: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(_is_text_part(p) for p in content):
        return "".join(p["text"] for p in content)
    raise UserError(f"{where}: field {path} must be a string")


def _is_text_part(part: Any) -> bool:
    return (
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
    )


def _require_assistant(where: str, messages: list[dict], key: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: field '{key}' has no assistant turn (nothing to train)")


# ----------------------------------------------------------------------------- fields


def _field(where: str, row: dict, key: str) -> Any:
    if key not in row:
        raise UserError(f"{where}: field '{key}' is missing")
    return row[key]


def _string(where: str, row: dict, key: str) -> str:
    value = _field(where, row, key)
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be a string, got {_kind(value)}")
    return value


def _optional_string(where: str, row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be a string, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    names = {
        list: "a list",
        dict: "an object",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)
