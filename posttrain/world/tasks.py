"""Tasks with exact answers: translation, arithmetic, facts and string manipulation.

A task *item* is a sub-kind plus its fields (`("to_lang", ("cheese", "French"))`); an item
renders into several prompt phrasings that share one exact answer ("fromage"). Train/test
splits are made over items, not prompts, so a test item is never seen in training in any
phrasing. `solve(prompt)` parses any prompt written from these templates back into its
answer; the gold reward uses it to score responses without being told the answer.

Simplified on purpose: templates are fixed strings, answers are single words, numbers or
comma-separated letters ("t, a, c"); translations use the core vocabulary, arithmetic small
operands (`ADD_MAX`, `MUL_MAX`) and string tasks a few distinct letters, so that a base
model pretrained for minutes can know every answer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from posttrain.world.lexicon import BY_ENGLISH, CORE, DICTIONARY, LANGUAGES
from posttrain.world.universe import CAPITAL, CONTINENT, COUNTRIES, PEOPLE, PERSON

KINDS = ("translation", "arithmetic", "facts", "strings")
FOREIGN = LANGUAGES[1:]
_BY_FOREIGN = {lang: {e.word(lang).lower(): e for e in DICTIONARY} for lang in FOREIGN}
_COUNTRY_OF = {capital.lower(): country for country, capital, _ in COUNTRIES}
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
ADD_MAX = 9  # operands of + and - run from 0 to ADD_MAX
MUL_MAX = 5  # operands of * run from 1 to MUL_MAX
LENGTHS = {"reverse": (2, 4), "sort": (2, 4), "count": (2, 6)}  # letters per string task


@dataclass(frozen=True)
class Sub:
    """A sub-kind of task: its kind, field names, prompt templates and answer function."""

    name: str
    kind: str
    fields: tuple[str, ...]
    templates: tuple[str, ...]
    answer: Callable[[dict], str]


@dataclass(frozen=True)
class Task:
    """One prompt with its exact answer; `key` identifies the underlying item."""

    task: str
    sub: str
    prompt: str
    answer: str
    key: str


def _foreign_to_english(f: dict) -> str:
    return _BY_FOREIGN[f["lang"]][f["word"].lower()].english


def letters_of(text: str) -> list[str]:
    """The letters of a string-task field or answer: "c, a, t" -> ["c", "a", "t"]."""
    return [x.strip() for x in text.split(",") if x.strip()]


def join_letters(letters) -> str:
    """Comma-separated, so each letter is the same token wherever it stands (no trailing space)."""
    return ", ".join(letters)


def _count(f: dict) -> str:
    return str(len(letters_of(f["letters"])))


SUBS: dict[str, Sub] = {
    s.name: s
    for s in (
        Sub("to_lang", "translation", ("word", "lang"),
            ("Translate {word} from English to {lang}.", "What is the {lang} word for {word}?",
             "How do you say {word} in {lang}?"),
            lambda f: BY_ENGLISH[f["word"].lower()].word(f["lang"])),
        Sub("from_lang", "translation", ("word", "lang"),
            ("Translate {word} from {lang} to English.", "What does the {lang} word {word} mean in English?",
             "What is the English word for the {lang} word {word}?"),
            _foreign_to_english),
        Sub("add", "arithmetic", ("a", "b"),
            ("What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} = ?"),
            lambda f: str(int(f["a"]) + int(f["b"]))),
        Sub("sub", "arithmetic", ("a", "b"),
            ("What is {a} - {b}?", "Compute {a} - {b}.", "{a} - {b} = ?"),
            lambda f: str(int(f["a"]) - int(f["b"]))),
        Sub("mul", "arithmetic", ("a", "b"),
            ("What is {a} * {b}?", "Compute {a} * {b}.", "{a} * {b} = ?"),
            lambda f: str(int(f["a"]) * int(f["b"]))),
        Sub("capital", "facts", ("country",),
            ("What is the capital of {country}?", "Name the capital of {country}.",
             "Which city is the capital of {country}?"),
            lambda f: CAPITAL[f["country"]]),
        Sub("continent", "facts", ("country",),
            ("Which continent is {country} in?", "On which continent is {country}?",
             "{country} is on which continent?"),
            lambda f: CONTINENT[f["country"]]),
        Sub("country", "facts", ("capital",),
            ("Which country has {capital} as its capital?", "{capital} is the capital of which country?",
             "Of which country is {capital} the capital?"),
            lambda f: _COUNTRY_OF[f["capital"].lower()]),
        Sub("city", "facts", ("name",),
            ("Where does {name} live?", "In which city does {name} live?", "What city is {name} from?"),
            lambda f: PERSON[f["name"]].city),
        Sub("job", "facts", ("name",),
            ("What is {name}'s job?", "What does {name} do for a living?", "What is the job of {name}?"),
            lambda f: PERSON[f["name"]].job),
        Sub("pet", "facts", ("name",),
            ("What pet does {name} have?", "Which animal is {name}'s pet?", "What kind of pet does {name} keep?"),
            lambda f: PERSON[f["name"]].pet),
        Sub("reverse", "strings", ("letters",),
            ("Reverse the letters: {letters}", "Write these letters in reverse order: {letters}",
             "Reverse this sequence: {letters}"),
            lambda f: join_letters(reversed(letters_of(f["letters"])))),
        Sub("sort", "strings", ("letters",),
            ("Sort the letters: {letters}", "Put these letters in alphabetical order: {letters}",
             "Sort these letters from a to z: {letters}"),
            lambda f: join_letters(sorted(letters_of(f["letters"])))),
        Sub("count", "strings", ("letters",),
            ("Count the letters: {letters}", "How many letters are in this list: {letters}",
             "Tell me how many letters there are: {letters}"),
            _count),
    )
}  # fmt: skip
SUBS_OF_KIND = {kind: tuple(s for s in SUBS.values() if s.kind == kind) for kind in KINDS}


# ----------------------------------------------------------------------------- items


def random_letters(rng: random.Random, sub: str) -> str:
    """Distinct random lowercase letters, comma-separated, as many as `LENGTHS[sub]` allows."""
    return join_letters(rng.sample(_LETTERS, rng.randint(*LENGTHS[sub])))


def all_items(sub: str, seed: int = 0) -> list[tuple]:
    """Every item of a sub-kind in a fixed order (a seeded sample for the string tasks)."""
    if sub == "to_lang":
        return [(e.english, lang) for e in CORE for lang in FOREIGN]
    if sub == "from_lang":
        return [(e.word(lang), lang) for e in CORE for lang in FOREIGN]
    if sub == "add":
        return [(a, b) for a in range(ADD_MAX + 1) for b in range(ADD_MAX + 1)]
    if sub == "sub":
        return [(a, b) for a in range(ADD_MAX + 1) for b in range(a + 1)]
    if sub == "mul":
        return [(a, b) for a in range(1, MUL_MAX + 1) for b in range(1, MUL_MAX + 1)]
    if sub in ("capital", "continent"):
        return [(country,) for country, _, _ in COUNTRIES]
    if sub == "country":
        return [(capital,) for _, capital, _ in COUNTRIES]
    if sub in ("city", "job", "pet"):
        return [(p.name,) for p in PEOPLE]
    rng = random.Random(f"{seed}-items-{sub}")
    return list(dict.fromkeys((random_letters(rng, sub),) for _ in range(4000)))


def make_task(sub: str, item: tuple, template: int = 0) -> Task:
    """Render an item with one of its sub-kind's templates."""
    s = SUBS[sub]
    f = dict(zip(s.fields, (str(v) for v in item)))
    prompt = s.templates[template % len(s.templates)].format(**f)
    key = sub + ":" + "|".join(f.values())
    return Task(s.kind, sub, prompt, s.answer(f), key)


def split_items(seed: int = 0, test_fraction: float = 0.2, max_test: int = 300) -> dict:
    """{sub: (train_items, test_items)}: a seeded, disjoint split of every sub-kind's items."""
    out = {}
    for sub in SUBS:
        items = all_items(sub, seed)
        random.Random(f"{seed}-split-{sub}").shuffle(items)
        n_test = min(max_test, max(1, int(len(items) * test_fraction)))
        out[sub] = (items[n_test:], items[:n_test])
    return out


def sample_tasks(items: dict, kind: str, n: int, rng: random.Random) -> list[Task]:
    """`n` tasks of `kind`, sub-kinds in turn, items drawn without replacement while they last."""
    subs = SUBS_OF_KIND[kind]
    pools = {s.name: [] for s in subs}
    tasks = []
    for i in range(n):
        sub = subs[i % len(subs)].name
        if not pools[sub]:
            pools[sub] = list(items[sub])
            rng.shuffle(pools[sub])
        tasks.append(make_task(sub, pools[sub].pop(), rng.randrange(3)))
    return tasks


# ----------------------------------------------------------------------------- solving


@cache
def _patterns() -> list[tuple[str, re.Pattern]]:
    out = []
    for s in SUBS.values():
        for template in s.templates:
            regex = re.escape(template)
            for name in s.fields:
                regex = regex.replace(re.escape("{" + name + "}"), f"(?P<{name}>.+?)")
            out.append((s.name, re.compile("^" + regex + "$")))
    return out


def solve(prompt: str) -> Task | None:
    """The task a prompt asks (with its exact answer), or None if it is not a world task."""
    text = prompt.strip()
    for sub, pattern in _patterns():
        m = pattern.match(text)
        if not m:
            continue
        f = m.groupdict()
        try:
            answer = SUBS[sub].answer(f)
        except (KeyError, ValueError, AttributeError):
            continue
        key = sub + ":" + "|".join(f[name] for name in SUBS[sub].fields)
        return Task(SUBS[sub].kind, sub, text, answer, key)
    return None
