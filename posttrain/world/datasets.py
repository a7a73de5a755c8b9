"""Writes the tiny world's task datasets (JSONL train/test splits) for every post-training stage.

`write_world_data(out_dir, seed)` writes, all from one item split (`tasks.split_items`) so
that no test prompt occurs in any train file:
- `sft_*`: chats (`messages`) over all task kinds, with `task` and `answer` columns;
- `preference_*`: `prompt`/`chosen`/`rejected` labelled by the gold reward (correct vs wrong,
  concise vs rambling, polite vs rude, refusal vs compliance, answer vs over-refusal);
- `kto_*`: both sides of those pairs as `prompt`/`completion`/`label`;
- `prompts_*`: `prompt`/`answer`/`task` for verifiable rewards;
- `harmful_*` / `harmless_*`: `prompt`/`completion` (a refusal / a normal answer);
- `refusal_sft_train`: chats, harmful -> refusal and harmless -> answer;
- `rl_prompts_train`: task, harmful and harmless prompts together, for PPO and GRPO;
- `long_context_*`: locker-code retrieval chats longer than 512 tokens;
- `skill_a_*` (translation + facts) and `skill_b_*` (arithmetic + strings): chats;
- `corpus_valid`: held-out pretraining documents (`text`) for perplexity.
Same seed, same bytes. Simplified on purpose: fixed sizes (see `SIZES`), no streaming.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from posttrain.errors import UserError
from posttrain.world.corpus import generate_corpus, ledger_line, ledger_question, take_documents
from posttrain.world.pairs import task_pair, topic_pair
from posttrain.world.tasks import KINDS, Task, sample_tasks, split_items
from posttrain.world.universe import BENIGN, FORBIDDEN, HOWTO_PREFIXES, HOWTO_TEMPLATES, REFUSAL

SKILLS = {"skill_a": ("translation", "facts"), "skill_b": ("arithmetic", "strings")}
SIZES = {
    "sft": (500, 50),  # per task kind: (train, test)
    "preference": (2000, 200),
    "prompts": (500, 50),  # per task kind
    "harmful": (400, 100),
    "harmless_howto": (250, 50),
    "harmless_tasks": (250, 50),
    "long_context": (400, 50),
    "corpus_valid": 300,
}
PAIR_MIX = (
    ("correct", 0.4),
    ("concise", 0.2),
    ("polite", 0.2),
    ("harmful", 0.1),
    ("over_refusal", 0.1),
)


def chat(prompt: str, response: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def sft_row(t: Task) -> dict:
    return {"messages": chat(t.prompt, t.answer), "task": t.task, "answer": t.answer}


def _tasks(split: dict, n_per_kind: int, rng: random.Random) -> list[Task]:
    out = [t for kind in KINDS for t in sample_tasks(split, kind, n_per_kind, rng)]
    rng.shuffle(out)
    return out


def howto_prompts(topics, seed: int, name: str) -> tuple[list, list]:
    """(train, test) lists of (prompt, topic) from every prefix x template x topic, disjoint."""
    rows = [
        (p + t.format(verb=topic.verb), topic)
        for topic in topics
        for t in HOWTO_TEMPLATES
        for p in HOWTO_PREFIXES
    ]
    random.Random(f"{seed}-{name}-split").shuffle(rows)
    n_train, n_test = SIZES[name]
    return rows[n_test : n_test + n_train], rows[:n_test]


def preference_rows(split: dict, topics: dict, n: int, rng: random.Random) -> list[dict]:
    rows, kinds, weights = [], [k for k, _ in PAIR_MIX], [w for _, w in PAIR_MIX]
    tasks = _tasks(split, n // len(KINDS) + 1, rng)
    while len(rows) < n:
        kind = rng.choices(kinds, weights)[0]
        if kind in ("harmful", "over_refusal"):
            prompt, topic = rng.choice(topics[kind])
            row = topic_pair(prompt, topic, harmful=kind == "harmful")
        else:
            row = task_pair(tasks[len(rows) % len(tasks)], kind, rng)
        if row is not None:
            rows.append(row)
    return rows


def kto_rows(pairs: list[dict]) -> list[dict]:
    rows = []
    for p in pairs:
        rows.append(
            {"prompt": p["prompt"], "completion": p["chosen"], "label": True, "task": p["task"]}
        )
        rows.append(
            {"prompt": p["prompt"], "completion": p["rejected"], "label": False, "task": p["task"]}
        )
    return rows


def long_context_row(rng: random.Random) -> dict:
    lockers = rng.sample(range(100, 1000), rng.randint(50, 110))
    codes = [rng.randint(1000, 9999) for _ in lockers]
    i = rng.randrange(len(lockers))
    lines = ["Locker codes"] + [ledger_line(n, c) for n, c in zip(lockers, codes)]
    prompt = "\n".join(lines) + "\n\n" + ledger_question(lockers[i])
    answer = str(codes[i])
    return {
        "messages": chat(prompt, answer),
        "task": "retrieval",
        "answer": answer,
        "depth": round(i / len(lockers), 3),
    }


def build_world_data(seed: int = 0) -> dict[str, list[dict]]:
    """Every dataset as a list of rows, keyed by file stem (`sft_train`, ...)."""
    items = split_items(seed)
    splits = {
        "train": {s: v[0] for s, v in items.items()},
        "test": {s: v[1] for s, v in items.items()},
    }
    harmful, benign = (
        howto_prompts(FORBIDDEN, seed, "harmful"),
        howto_prompts(BENIGN, seed, "harmless_howto"),
    )
    out: dict[str, list[dict]] = {}
    for i, part in enumerate(("train", "test")):
        rng = random.Random(f"{seed}-{part}")
        split = splits[part]
        out[f"sft_{part}"] = [sft_row(t) for t in _tasks(split, SIZES["sft"][i], rng)]
        topics = {"harmful": harmful[i], "over_refusal": benign[i]}
        pairs = preference_rows(split, topics, SIZES["preference"][i], rng)
        out[f"preference_{part}"] = pairs
        out[f"kto_{part}"] = kto_rows(pairs)
        out[f"prompts_{part}"] = [
            {"prompt": t.prompt, "answer": t.answer, "task": t.task}
            for t in _tasks(split, SIZES["prompts"][i], rng)
        ]
        out[f"harmful_{part}"] = [
            {"prompt": p, "completion": REFUSAL, "task": "harmful", "topic": t.key}
            for p, t in harmful[i]
        ]
        tasks = _tasks(split, SIZES["harmless_tasks"][i] // len(KINDS) + 1, rng)[
            : SIZES["harmless_tasks"][i]
        ]
        harmless = [
            {"prompt": p, "completion": t.answer, "task": "howto", "topic": t.key}
            for p, t in benign[i]
        ]
        harmless += [
            {"prompt": t.prompt, "completion": t.answer, "task": t.task, "topic": t.sub}
            for t in tasks
        ]
        rng.shuffle(harmless)
        out[f"harmless_{part}"] = harmless
        out[f"long_context_{part}"] = [
            long_context_row(rng) for _ in range(SIZES["long_context"][i])
        ]
        for name, kinds in SKILLS.items():
            out[f"{name}_{part}"] = [r for r in out[f"sft_{part}"] if r["task"] in kinds]
    out["refusal_sft_train"] = refusal_sft_rows(out["harmful_train"], out["harmless_train"], seed)
    out["rl_prompts_train"] = rl_prompt_rows(out, seed)
    out["corpus_valid"] = [
        {"text": d} for d in take_documents(seed, SIZES["corpus_valid"], "valid")
    ]
    return out


def refusal_sft_rows(harmful: list[dict], harmless: list[dict], seed: int) -> list[dict]:
    rows = [
        {
            "messages": chat(r["prompt"], r["completion"]),
            "task": r["task"],
            "answer": r["completion"],
        }
        for r in harmful + harmless
    ]
    random.Random(f"{seed}-refusal-sft").shuffle(rows)
    return rows


def rl_prompt_rows(out: dict[str, list[dict]], seed: int) -> list[dict]:
    """Prompts for online RL (PPO, GRPO) with the gold reward or a reward model: the training
    task prompts (with their answers), harmful and harmless requests, shuffled."""
    rows = [{"prompt": r["prompt"], "answer": r["answer"], "task": r["task"]}
            for r in out["prompts_train"]]  # fmt: skip
    rows += [{"prompt": r["prompt"], "answer": None, "task": r["task"]}
             for r in out["harmful_train"] + out["harmless_train"]]  # fmt: skip
    random.Random(seed).shuffle(rows)
    return rows


def write_world_data(
    out_dir: str | Path, seed: int = 0, overwrite: bool = False
) -> dict[str, Path]:
    """Write every dataset as `<name>.jsonl` (+ `manifest.json`) into `out_dir`; return the paths."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out_dir}: not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out_dir}: folder is not empty; pass overwrite=true")
    out.mkdir(parents=True, exist_ok=True)
    data, paths = build_world_data(seed), {}
    for name, rows in data.items():
        paths[name] = write_jsonl(out / f"{name}.jsonl", rows)
    manifest = {"seed": seed, "rows": {name: len(rows) for name, rows in data.items()}}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return paths


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_corpus(out_dir: str | Path, seed: int = 0, n_tokens: int = 2_500_000) -> dict[str, Path]:
    """Pretraining text as `corpus_train.jsonl` (about `n_tokens` tokens) and `corpus_valid.jsonl`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = [{"text": d} for d in generate_corpus(seed, n_tokens, "train")]
    valid = [{"text": d} for d in take_documents(seed, SIZES["corpus_valid"], "valid")]
    return {
        "corpus_train": write_jsonl(out / "corpus_train.jsonl", train),
        "corpus_valid": write_jsonl(out / "corpus_valid.jsonl", valid),
    }
