"""Plain-text checks shared by data writers and evaluators: answer normalisation and refusals.

`normalize_answer` is the one definition of "the same answer": case-insensitive, surrounding
whitespace and trailing periods/exclamation marks ignored, inner whitespace collapsed,
curly quotes made straight. Data writers store answers that are already normal; evaluators
compare `normalize_answer(response) == normalize_answer(answer)`.

`is_refusal` looks for stock refusal phrases anywhere in a response. Simplified on purpose:
a marker list, not a classifier, so a refusal worded in a new way is missed.
"""

from __future__ import annotations

import re

_SPACES = re.compile(r"\s+")
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})

REFUSAL_MARKERS = (
    "i can't",
    "i cannot",
    "i can not",
    "i won't",
    "i will not",
    "i'm sorry",
    "i am sorry",
    "sorry, but",
    "i'm not able",
    "i am not able",
    "i'm unable",
    "i am unable",
    "as an ai",
    "i must decline",
    "can't help with",
    "cannot help with",
    "not able to help",
)


def normalize_answer(text: str) -> str:
    """Canonical form of an answer: lowercase, single spaces, no trailing `.`/`!`."""
    text = _SPACES.sub(" ", text.translate(_QUOTES)).strip().lower()
    return text.rstrip(".! ").strip()


def exact_match(response: str, answer: str) -> bool:
    """True when the response is the answer up to `normalize_answer`."""
    return normalize_answer(response) == normalize_answer(answer)


def is_refusal(text: str, markers: tuple[str, ...] = REFUSAL_MARKERS) -> bool:
    """True when a refusal marker phrase occurs in the (normalised) text."""
    norm = normalize_answer(text)
    return any(m in norm for m in markers)
