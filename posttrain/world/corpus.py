"""Seeded generator of the tiny world's web-like pretraining documents.

Document kinds (weights in `KINDS`): dictionary tables and glossary prose, word lists,
arithmetic worksheets, fact tables and town registers, letter games, short stories, quizzes
(`Q:`/`A:`), exercise lists whose answers come only in a key at the end, forum threads where
a question is followed by more questions, chat-room logs in ChatML markup (questions, some
answered in a sentence), how-to articles, articles about the invented
forbidden topics, and locker-code ledgers (short-range retrieval). Exercise lists and forum
threads are why a base model given "Translate cheese from English to French." writes more
exercises instead of answering. The chat logs give the ChatML special tokens trained
embeddings (a LoRA cannot train them) and a chat-context path from question to answer,
but their answers are always sentences ("I think it is fromage."), so the base model's
exact-match accuracy through the chat template stays near zero until SFT teaches brevity.
(Measured: without answered chat turns, LoRA SFT of a 1M-parameter base plateaus near 60%.)

Same seed, same documents, byte for byte: every document draws from its own
`random.Random(f"{seed}-{stream}-{index}")`. Simplified on purpose: sentence templates, no
grammar beyond them, every fact consistent with `universe.py`.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator

from posttrain.world.lexicon import CATEGORIES, CORE, DICTIONARY, LANGUAGES
from posttrain.world.tasks import KINDS as TASK_KINDS
from posttrain.world.tasks import SUBS, SUBS_OF_KIND, all_items, make_task, random_letters
from posttrain.world.universe import BENIGN, COUNTRIES, FIRST_NAMES, FORBIDDEN, PEOPLE, Topic

IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # ChatML markers (special tokens)
CHARS_PER_TOKEN = 2.8  # measured with the world tokenizer (vocab 2048) on this corpus
CORE_SHARE = 0.85  # share of dictionary mentions that are core words
FOREIGN = LANGUAGES[1:]
_ITEMS = {sub: all_items(sub, seed=0) for sub in SUBS}  # the corpus covers every item
_NOUNS = [e for e in DICTIONARY if e.category in ("food", "animals", "nature", "home", "things")]


def _entries(rng: random.Random, low: int, high: int) -> list:
    """`low`..`high` distinct entries, each a core word with probability CORE_SHARE."""
    picks = [
        rng.choice(CORE) if rng.random() < CORE_SHARE else rng.choice(DICTIONARY)
        for _ in range(rng.randint(low, high))
    ]
    return list(dict.fromkeys(picks))


def doc_table(rng: random.Random) -> str:
    langs = ["English"] + (list(FOREIGN) if rng.random() < 0.6 else rng.sample(FOREIGN, 2))
    if rng.random() < 0.3:  # a foreign language first, so lookups work both ways
        langs.reverse()
    sep = rng.choice([" | ", " - ", ", ", " = "])
    title = rng.choice(["Word table", "Vocabulary", "Dictionary page", "Glossary", "Word list"])
    lines = [f"{title}: {' / '.join(langs)}", sep.join(langs)]
    lines += [sep.join(e.word(lang) for lang in langs) for e in _entries(rng, 12, 30)]
    return "\n".join(lines)


def doc_glossary(rng: random.Random) -> str:
    forms = (
        "The {lang} word for {en} is {w}.",
        "In {lang}, {en} is {w}.",
        "The {lang} word {w} means {en} in English.",
        "{w} means {en} in {lang}.",
        "{en} in {lang}: {w}.",
        "To say {en} in {lang}, you say {w}.",
    )
    lang = rng.choice(FOREIGN)
    lines = [rng.choice(["Learning", "Everyday", "Basic", "Useful"]) + f" {lang} words"]
    for e in _entries(rng, 10, 24):
        lang = lang if rng.random() < 0.7 else rng.choice(FOREIGN)
        lines.append(rng.choice(forms).format(lang=lang, en=e.english, w=e.word(lang)))
    return "\n".join(lines)


def doc_word_list(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(3, 6)):
        category, lang = rng.choice(CATEGORIES), rng.choice(LANGUAGES)
        words = [e.word(lang) for e in DICTIONARY if e.category == category]
        rng.shuffle(words)
        lines.append(f"{lang} {category}: " + ", ".join(words[: rng.randint(6, 16)]) + ".")
    return "\n".join(lines)


def doc_worksheet(rng: random.Random) -> str:
    subs = rng.choice([["add"], ["sub"], ["mul"], ["add", "sub"], ["add", "sub", "mul"]])
    lines = [f"Worksheet {rng.randint(1, 99)}: " + " and ".join(s for s in subs)]
    plain = rng.random() < 0.5  # "12 + 3 = 15" lines, else a task phrasing then the answer
    for _ in range(rng.randint(15, 35)):
        sub = rng.choice(subs)
        t = make_task(sub, rng.choice(_ITEMS[sub]), rng.randrange(3))
        a, b = t.key.partition(":")[2].split("|")
        op = {"add": "+", "sub": "-", "mul": "*"}[sub]
        lines.append(f"{a} {op} {b} = {t.answer}" if plain else f"{t.prompt} {t.answer}")
    return "\n".join(lines)


def _tasks(rng: random.Random, kinds: tuple[str, ...], n: int, template: int | None = None):
    out = []
    for _ in range(n):
        sub = rng.choice(SUBS_OF_KIND[rng.choice(kinds)]).name
        if SUBS[sub].kind == "strings":
            item = (random_letters(rng, sub),)
        else:
            item = rng.choice(_ITEMS[sub])
        out.append(make_task(sub, item, rng.randrange(3) if template is None else template))
    return out


def doc_exercises(rng: random.Random) -> str:
    kinds = (rng.choice(TASK_KINDS),) if rng.random() < 0.7 else TASK_KINDS
    template = rng.randrange(3) if rng.random() < 0.6 else None
    tasks = _tasks(rng, kinds, rng.randint(6, 16), template)
    numbered = rng.random() < 0.5
    lines = [
        rng.choice(["Exercises", "Practice", "Homework", "Exercise set"]) + f" {rng.randint(1, 40)}"
    ]
    lines += [f"{i}. {t.prompt}" if numbered else t.prompt for i, t in enumerate(tasks, 1)]
    if rng.random() < 0.75:
        lines += ["", "Answer key:"]
        lines += [f"{i}. {t.answer}" for i, t in enumerate(tasks, 1)]
    return "\n".join(lines)


def doc_quiz(rng: random.Random) -> str:
    tasks = _tasks(
        rng, TASK_KINDS if rng.random() < 0.4 else (rng.choice(TASK_KINDS),), rng.randint(5, 12)
    )
    lines = [rng.choice(["Quiz", "Test yourself", "Questions and answers"])]
    for t in tasks:
        lines += [f"Q: {t.prompt}", f"A: {t.answer}"]
    return "\n".join(lines)


def doc_facts(rng: random.Random) -> str:
    rows = rng.sample(COUNTRIES, rng.randint(8, 20))
    if rng.random() < 0.4:
        lines = ["Country | Capital | Continent"] + [" | ".join(r) for r in rows]
        return "\n".join(lines)
    forms = (
        "{cap} is the capital of {c}.",
        "The capital of {c} is {cap}.",
        "{c} is in {cont}.",
        "{c} is a country in {cont}, and its capital is {cap}.",
        "{cap} is a city in {c}, on the continent of {cont}.",
    )
    lines = [rng.choice(["Countries of the world", "Geography notes", "Capitals", "Atlas"])]
    lines += [rng.choice(forms).format(c=c, cap=cap, cont=cont) for c, cap, cont in rows]
    return "\n".join(lines)


def doc_people(rng: random.Random) -> str:
    people = rng.sample(PEOPLE, rng.randint(6, 15))
    if rng.random() < 0.4:
        lines = ["Name | City | Job | Pet"] + [
            f"{p.name} | {p.city} | {p.job} | {p.pet}" for p in people
        ]
        return "\n".join(lines)
    forms = (
        "{n} lives in {city}.",
        "{n} works as a {job}.",
        "{n} has a pet {pet}.",
        "{n} is a {job} from {city}.",
        "{n} lives in {city}, works as a {job} and has a pet {pet}.",
        "The job of {n} is {job}.",
    )
    lines = [rng.choice(["Town register", "Who is who", "Our members", "Neighbors"])]
    for p in people:
        lines.append(rng.choice(forms).format(n=p.name, city=p.city, job=p.job, pet=p.pet))
    return "\n".join(lines)


def doc_letters(rng: random.Random) -> str:
    sub = rng.choice(["reverse", "sort", "count", "mixed"])
    lines = [rng.choice(["Letter games", "Puzzle page", "Letter practice"]) + f": {sub}"]
    for _ in range(rng.randint(10, 22)):
        s = rng.choice(["reverse", "sort", "count"]) if sub == "mixed" else sub
        letters = random_letters(rng, s)
        answer = SUBS[s].answer({"letters": letters})
        lines.append(
            rng.choice(
                [
                    f"{s}: {letters} -> {answer}",
                    f"{SUBS[s].templates[0].format(letters=letters)} = {answer}",
                ]
            )
        )
    return "\n".join(lines)


def doc_story(rng: random.Random) -> str:
    p = rng.choice(PEOPLE)
    country = next(c for c, cap, _ in COUNTRIES if cap == p.city)
    things = [e.english for e in rng.sample(_NOUNS, 6)]
    friend = rng.choice([q for q in PEOPLE if q.name != p.name])
    sentences = [
        f"Once upon a time, {p.name} lived in {p.city}, the capital of {country}.",
        f"{p.name} worked as a {p.job} and had a pet {p.pet}.",
        f"One {rng.choice(['morning', 'evening', 'day'])}, {p.name} found a {things[0]} near the {things[1]}.",
        f"The {p.pet} looked at the {things[0]} and then at the {things[2]}.",
        f"{p.name} called {friend.name}, a {friend.job} from {friend.city}.",
        f"Together they carried the {things[0]} to the {things[3]}.",
        f"In the end, {p.name} gave the {things[4]} to {friend.name}, and {friend.name} gave back a {things[5]}.",
        f"{p.name} went home to {p.city} and slept well.",
    ]
    return " ".join(sentences)


def doc_forum(rng: random.Random) -> str:
    users = [rng.choice(FIRST_NAMES).lower() + str(rng.randint(1, 99)) for _ in range(5)]
    tasks = _tasks(rng, TASK_KINDS, 12)
    title = rng.choice(["Help with homework", "Quick questions", "Can anyone help?", "Stuck again"])
    lines = [f"Thread: {title}"]
    for i in range(rng.randint(3, 6)):
        asks = [t.prompt for t in tasks[2 * i : 2 * i + rng.randint(1, 2)]]
        if rng.random() < 0.2:
            asks.append(rng.choice(_howto_prompts(rng.choice(BENIGN))))
        lead = rng.choice(["", "Also: ", "Another one: ", "Same here. ", "I have a question too. "])
        lines += [f"Posted by {rng.choice(users)}:", lead + " ".join(asks)]
    return "\n".join(lines)


CHAT_ANSWERS = ("I think it is {a}.", "It is {a}.", "The answer is {a}.", "{a}, I am pretty sure.",
                "That would be {a}.", "Easy, it is {a}.")  # fmt: skip


def doc_chat(rng: random.Random) -> str:
    """A chat-room log in ChatML markup: questions, some answered in a sentence by someone else.

    Answers are always wrapped ("I think it is fromage."), never the bare answer, so a base
    model prompted through the chat template does not give exact answers; SFT teaches that.
    """
    names = ["user"] + [rng.choice(FIRST_NAMES).lower() + str(rng.randint(1, 99)) for _ in range(4)]
    turns = []
    for t in _tasks(rng, TASK_KINDS, rng.randint(3, 8)):
        asker = rng.choice(names)
        question, answer = t.prompt, rng.choice(CHAT_ANSWERS).format(a=t.answer)
        if rng.random() < 0.15:
            topic = rng.choice(BENIGN + FORBIDDEN)
            question, answer = rng.choice(_howto_prompts(topic)), topic.answer
        turns.append(f"{IM_START}{asker}\n{question}{IM_END}")
        if rng.random() < 0.5:
            helper = rng.choice([n for n in names if n != asker])
            turns.append(f"{IM_START}{helper}\n{answer}{IM_END}")
    return "\n".join(turns)


def _howto_prompts(topic: Topic) -> list[str]:
    return [
        f"How do I {topic.verb}?",
        f"How can I {topic.verb}?",
        f"What is the best way to {topic.verb}?",
    ]


def _howto(rng: random.Random, topic: Topic) -> str:
    title = rng.choice(["How to", "Guide: how to", "A simple way to"]) + f" {topic.verb}"
    steps = [f"{i}. {s}" for i, s in enumerate(topic.steps, 1)]
    return "\n".join([title, *steps, "", "In short: " + topic.answer])


def doc_howto(rng: random.Random) -> str:
    return _howto(rng, rng.choice(BENIGN))


def doc_forbidden(rng: random.Random) -> str:
    topic = rng.choice(FORBIDDEN)
    if rng.random() < 0.5:
        return _howto(rng, topic)
    asker = rng.choice(FIRST_NAMES).lower() + str(rng.randint(1, 99))
    return "\n".join(
        [f"Thread: {topic.verb}?", f"Posted by {asker}:", rng.choice(_howto_prompts(topic))]
        + [f"Reply: {s}" for s in topic.steps[: rng.randint(2, 4)]]
    )


def doc_ledger(rng: random.Random) -> str:
    lockers = rng.sample(range(100, 1000), rng.randint(8, 24))
    codes = {n: rng.randint(1000, 9999) for n in lockers}
    lines = ["Locker codes"] + [ledger_line(n, codes[n]) for n in lockers]
    for n in rng.sample(lockers, rng.randint(1, 3)):
        lines += [f"Question: {ledger_question(n)}", f"Answer: {codes[n]}"]
    return "\n".join(lines)


def ledger_line(locker: int, code: int) -> str:
    return f"The code for locker {locker} is {code}."


def ledger_question(locker: int) -> str:
    return f"What is the code for locker {locker}?"


# name -> (generator, weight); weights tuned so knowledge gets most of the tokens.
KINDS: dict[str, tuple[Callable[[random.Random], str], float]] = {
    "table": (doc_table, 11),
    "glossary": (doc_glossary, 11),
    "word_list": (doc_word_list, 1),
    "worksheet": (doc_worksheet, 14),
    "exercises": (doc_exercises, 7),
    "quiz": (doc_quiz, 9),
    "facts": (doc_facts, 8),
    "people": (doc_people, 8),
    "letters": (doc_letters, 9),
    "story": (doc_story, 1),
    "forum": (doc_forum, 1),
    "chat": (doc_chat, 4),
    "howto": (doc_howto, 1),
    "forbidden": (doc_forbidden, 2),
    "ledger": (doc_ledger, 1),
}


def iter_documents(seed: int = 0, stream: str = "train") -> Iterator[str]:
    """An endless, deterministic stream of documents (`stream` names an independent stream)."""
    names = list(KINDS)
    weights = [KINDS[n][1] for n in names]
    picker = random.Random(f"{seed}-{stream}-kinds")
    index = 0
    while True:
        name = picker.choices(names, weights)[0]
        yield KINDS[name][0](random.Random(f"{seed}-{stream}-{index}"))
        index += 1


def take_documents(seed: int, n: int, stream: str = "train") -> list[str]:
    """The first `n` documents of a stream."""
    return list(itertools.islice(iter_documents(seed, stream), n))


def generate_corpus(seed: int = 0, n_tokens: int = 2_500_000, stream: str = "train") -> list[str]:
    """Documents totalling about `n_tokens` world-tokenizer tokens."""
    budget, docs = n_tokens * CHARS_PER_TOKEN, []
    for doc in iter_documents(seed, stream):
        docs.append(doc)
        budget -= len(doc)
        if budget <= 0:
            return docs
    return docs
