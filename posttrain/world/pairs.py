"""Response variants and preference pairs labelled by the gold reward.

For a task with exact answer "fromage" the variants are: the answer itself (ideal), a wrong
answer a model could plausibly give ("queso": the right word in the wrong language, an
off-by-one sum, a neighbour's city), a rambling answer (correct, buried in filler) and a
rude answer (correct, with an insult). Pairs: correct vs wrong, concise vs rambling, polite
vs rude, refusal vs compliance for harmful prompts, and answer vs over-refusal for
harmless how-to prompts. Every pair is ordered by `gold_reward`; ties are never emitted.

Simplified on purpose: variants come from fixed phrase lists in `universe.py`.
"""

from __future__ import annotations

import random

from posttrain.world.gold import gold_reward
from posttrain.world.lexicon import BY_ENGLISH, DICTIONARY
from posttrain.world.tasks import FOREIGN, Task, join_letters, letters_of
from posttrain.world.universe import (
    COUNTRIES,
    JOBS,
    PETS,
    RAMBLE_AFTER,
    RAMBLE_BEFORE,
    REFUSAL,
    RUDE_WRAPPERS,
    Topic,
)

PAIR_KINDS = ("correct", "concise", "polite", "harmful", "over_refusal")


def wrong_answer(task: Task, rng: random.Random) -> str:
    """A plausible but wrong answer to `task`."""
    fields = task.key.partition(":")[2].split("|")
    if task.task == "arithmetic" or task.sub == "count":
        value = int(task.answer)
        return str(value + rng.choice([-10, -2, -1, 1, 2, 10] if value > 10 else [1, 2]))
    if task.sub in ("reverse", "sort"):
        letters = letters_of(task.answer)
        if task.sub == "reverse" and fields[0] != task.answer:
            return fields[0]  # the letters left as they were
        i = rng.randrange(len(letters) - 1)
        letters[i], letters[i + 1] = letters[i + 1], letters[i]
        wrong = join_letters(letters)
        return wrong if wrong != task.answer else join_letters([*reversed(letters), letters[0]])
    return rng.choice([c for c in _alternatives(task, fields) if c.lower() != task.answer.lower()])


def _alternatives(task: Task, fields: list[str]) -> list[str]:
    if task.sub == "to_lang":
        entry, lang = BY_ENGLISH[fields[0].lower()], fields[1]
        other_langs = [entry.word(x) for x in FOREIGN if x != lang]
        same_lang = [e.word(lang) for e in DICTIONARY if e.category == entry.category]
        return other_langs + same_lang
    if task.sub == "from_lang":
        entry = next(e for e in DICTIONARY if e.word(fields[1]).lower() == fields[0].lower())
        return [e.english for e in DICTIONARY if e.category == entry.category]
    table = {
        "capital": [c[1] for c in COUNTRIES],
        "city": [c[1] for c in COUNTRIES],
        "country": [c[0] for c in COUNTRIES],
        "continent": sorted({c[2] for c in COUNTRIES}),
        "job": list(JOBS),
        "pet": list(PETS),
    }
    return table[task.sub]


def rambling(answer: str, rng: random.Random) -> str:
    middle = rng.choice(["The answer is {a}.", "I would say it is {a}.", "{a}."]).format(a=answer)
    return f"{rng.choice(RAMBLE_BEFORE)} {middle} {rng.choice(RAMBLE_AFTER)}"


def rude(answer: str, rng: random.Random) -> str:
    return rng.choice(RUDE_WRAPPERS).format(a=answer)


def task_pair(task: Task, kind: str, rng: random.Random) -> dict | None:
    """A preference row for a task ("correct", "concise" or "polite"), ordered by gold."""
    if kind == "correct":
        a, b = task.answer, wrong_answer(task, rng)
    elif kind == "concise":
        a, b = task.answer, rambling(task.answer, rng)
    else:
        a, b = task.answer, rude(task.answer, rng)
    return ordered(task.prompt, a, b, task.task, kind, task.answer)


def topic_pair(prompt: str, topic: Topic, harmful: bool) -> dict | None:
    """Refusal vs compliance for a harmful prompt; answer vs refusal for a harmless one."""
    if harmful:
        return ordered(prompt, REFUSAL, topic.answer, "harmful", "harmful", None)
    return ordered(prompt, topic.answer, REFUSAL, "howto", "over_refusal", topic.answer)


def ordered(prompt: str, a: str, b: str, task: str, kind: str, answer: str | None) -> dict | None:
    """{prompt, chosen, rejected, task, pair}, the higher-gold response chosen; None on a tie."""
    ra, rb = gold_reward(prompt, a, answer), gold_reward(prompt, b, answer)
    if ra == rb:
        return None
    chosen, rejected = (a, b) if ra > rb else (b, a)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "task": task, "pair": kind}
