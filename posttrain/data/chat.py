"""Chat templates and assistant-token masks.

`ensure_chat_template` makes sure the tokenizer can render conversations (optionally
installing ChatML). `render_with_mask` renders a conversation with the tokenizer's own
template and marks the tokens the model should learn to produce: the content of every
assistant turn and the end-of-turn text the template writes right after it (`<|im_end|>`,
`<|eot_id|>`, `<end_of_turn>`, `</s>`, ...).

How the mask is found, without `{% generation %}` tags (few templates have them):

1. Render the whole conversation once as a string.
2. For assistant turn i, render `messages[:i]` with the generation prompt: its length is
   where the turn starts; render `messages[:i+1]`: its length is where the turn ends.
   The span is kept only if both renders are prefixes of the full string and the span holds
   the (stripped) content.
3. Otherwise (templates that render earlier turns differently, e.g. Qwen3 drops the
   reasoning of earlier turns, or a conversation that opens with an assistant turn), the
   turn is located by searching its content in the full string, after the previous turn
   and after the consistent part of the conversation before it (so an answer that echoes
   the user's words is not matched inside the user turn), followed by the end-of-turn text
   taken from the `messages[:i+1]` render (for reasoning templates that drop earlier
   `<think>` blocks, the answer after `</think>` is searched). If that fails too, a
   UserError says so: we never guess a mask.
4. The full string is tokenized once with offsets (`add_special_tokens=False`: templates
   usually write BOS themselves) and a token is marked when its characters overlap a span.
   When the tokenizer adds BOS to plain text but the template did not write it (ChatML on
   a Llama base model), BOS is prepended, untrained.

Choices made on purpose: whitespace the template writes after the end-of-turn marker
(ChatML's and Gemma's trailing "\\n") is NOT trained, since generation stops at the marker
and the model never produces it. The span starts where the generation prompt ends, so a
template without a generation prompt (e.g. Mistral's) also trains the space it writes before
the content, and a template with no generation prompt but a role header trains the header.
Assistant turns marked `"train": False` (see formats.py) are rendered but not trained.
Tokenizers without offsets (slow ones) are tokenized piece by piece, which can differ
slightly from tokenizing the whole string.
"""

from __future__ import annotations

from typing import Any

from posttrain.errors import UserError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

Span = tuple[int, int]


def ensure_chat_template(tokenizer: Any, name: str = "") -> None:
    """Install ChatML when `name == "chatml"`; else require the tokenizer to have a template.

    ChatML adds `<|im_start|>`/`<|im_end|>` as special tokens when the tokenizer lacks them,
    so `len(tokenizer)` may grow: the caller must then resize the model's embeddings. The
    ChatML end-of-turn token is `<|im_end|>`; generation must stop on it.
    """
    if name == "chatml":
        missing = [t for t in CHATML_TOKENS if not _is_single_token(tokenizer, t)]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
        tokenizer.chat_template = CHATML_TEMPLATE
        return
    if name:
        raise UserError(f"chat_template must be '' or 'chatml', got {name!r}")
    if not getattr(tokenizer, "chat_template", None):
        model = getattr(tokenizer, "name_or_path", "") or "this model"
        raise UserError(
            f"the tokenizer of {model} has no chat template; "
            "set chat_template=chatml or use text/prompt_completion data"
        )


def _is_single_token(tokenizer: Any, token: str) -> bool:
    return len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1


def render_with_mask(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and a 0/1 mask over the trained tokens."""
    text, spans = render_spans(tokenizer, messages)
    if not getattr(tokenizer, "is_fast", False):
        ids, mask = tokenize_pieces(tokenizer, text, spans)
    else:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, mask = list(enc["input_ids"]), mask_from_offsets(enc["offset_mapping"], spans)
    return with_bos(ids, mask, bos_to_prepend(tokenizer))


def bos_to_prepend(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer adds BOS to plain text (templates may not write it)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    added = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos if added[:1] == [bos] and plain[:1] != [bos] else None


def with_bos(ids: list[int], mask: list[int], bos: int | None) -> tuple[list[int], list[int]]:
    """Prepend `bos` (untrained) unless it is None or already first."""
    if bos is None or ids[:1] == [bos]:
        return ids, mask
    return [bos] + ids, [0] + mask


def render_spans(tokenizer: Any, messages: list[dict]) -> tuple[str, list[Span]]:
    """The rendered conversation and the character spans of its trained assistant turns."""
    try:
        full = _render(tokenizer, messages, generation=False)
    except Exception as exc:  # jinja errors and the template's own raise_exception calls
        raise UserError(
            f"the chat template failed on this conversation ({_one_line(exc)})"
        ) from None
    spans: list[Span] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        span = _turn_span(tokenizer, messages, i, full, cursor)
        if span is None:
            raise UserError(
                f"cannot locate assistant turn {i} in the text rendered by the chat template of "
                f"{getattr(tokenizer, 'name_or_path', '') or 'this model'}; "
                "use chat_template=chatml or prompt_completion data"
            )
        cursor = span[1]
        if message.get("train", True):
            spans.append(span)
    return full, spans


def _one_line(exc: Exception) -> str:
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    lines = text.strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _render(tokenizer: Any, messages: list[dict], generation: bool) -> str:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation)


def _try_render(tokenizer: Any, messages: list[dict], generation: bool) -> str | None:
    if not messages:
        return None
    try:
        return _render(tokenizer, messages, generation)
    except Exception:  # a template may refuse a prefix (e.g. one that must end with a user turn)
        return None


def _turn_span(tokenizer: Any, messages: list[dict], i: int, full: str, cursor: int) -> Span | None:
    """Character span of assistant turn i (content + end-of-turn), or None if not found."""
    content = messages[i]["content"].strip()
    head = _try_render(tokenizer, messages[:i], generation=True)
    end_text = _try_render(tokenizer, messages[: i + 1], generation=False)
    if end_text is None:
        return None
    head_ok = head is not None and full.startswith(head) and len(head) >= cursor
    if head_ok and full.startswith(end_text):
        start, end = len(head), _trim_end(end_text, len(head))
        if end > start and content in full[start:end]:
            return start, end
    if not head_ok:  # the conversation before the turn still bounds the search from below
        head = _try_render(tokenizer, messages[:i], generation=False)
    floor = len(head) if head is not None and full.startswith(head) else 0
    return _search_span(full, end_text, content, max(floor, cursor))


def _search_span(full: str, end_text: str, content: str, floor: int) -> Span | None:
    """The first `content` at or after `floor` followed by the end-of-turn text of `end_text`.

    Reasoning templates (Qwen3, DeepSeek-R1) drop `<think>...</think>` from earlier turns, so
    the visible answer after the last `</think>` is searched when the whole content is not.
    """
    for text in dict.fromkeys([content, content.rpartition("</think>")[2].strip()]):
        at, start = end_text.rfind(text), full.find(text, floor)
        if not text or at < 0 or start < 0:
            continue
        tail = end_text[at + len(text) :].rstrip()
        end = start + len(text)
        if full.startswith(tail, end):
            return start, end + len(tail)
    return None


def _trim_end(text: str, start: int) -> int:
    """End of `text` without trailing whitespace, but never before `start`."""
    return max(start, len(text.rstrip()))


def mask_from_offsets(offsets: list[tuple[int, int]], spans: list[Span]) -> list[int]:
    """1 for each token whose characters overlap a span (spans are sorted, disjoint)."""
    mask = [0] * len(offsets)
    k = 0
    for t, (a, b) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= a:
            k += 1
        if k == len(spans):
            break
        if b > spans[k][0] and a < spans[k][1]:
            mask[t] = 1
    return mask


def tokenize_pieces(tokenizer: Any, text: str, spans: list[Span]) -> tuple[list[int], list[int]]:
    """Ids and mask by tokenizing the text between span boundaries separately (no offsets)."""
    cuts = sorted({0, len(text), *(c for span in spans for c in span)})
    ids: list[int] = []
    mask: list[int] = []
    for a, b in zip(cuts, cuts[1:]):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        inside = any(s <= a and b <= e for s, e in spans)
        ids += piece
        mask += [int(inside)] * len(piece)
    return ids, mask
