"""The tiny world's InstructGPT pipeline pieces (`posttrain/world/rlhf.py`): the demonstration mix,
clean and flawed, and the reward model's pairs of the SFT model's own samples. The whole pipeline
runs in the quick demo (test_world_cli.py)."""

from __future__ import annotations

import json

from posttrain.world.datasets import write_world_data
from posttrain.world.gold import gold_reward, manners
from posttrain.world.rlhf import own_sample_pairs, write_mix
from tests.tiny import save_tiny


def test_the_mix_is_the_refusal_demonstrations_plus_600_task_chats(tmp_path):
    write_world_data(tmp_path / "data")
    write_mix(tmp_path / "data", tmp_path / "mix.jsonl")
    assert len((tmp_path / "mix.jsonl").read_text().splitlines()) == 900 + 600
    write_mix(tmp_path / "data", tmp_path / "few.jsonl", limit=240)
    assert len((tmp_path / "few.jsonl").read_text().splitlines()) == 240


def test_flawed_mix_makes_answers_rude_or_rambling_but_keeps_refusals(tmp_path):
    write_world_data(tmp_path / "data")
    write_mix(tmp_path / "data", tmp_path / "clean.jsonl")
    write_mix(tmp_path / "data", tmp_path / "flawed.jsonl", flawed=0.5)
    clean, flawed = ([json.loads(x) for x in (tmp_path / f"{n}.jsonl").read_text().splitlines()]
                     for n in ("clean", "flawed"))  # fmt: skip
    assert [r["messages"][0] for r in clean] == [r["messages"][0] for r in flawed]
    changed = [(a, b) for a, b in zip(clean, flawed) if a["messages"] != b["messages"]]
    answered = [r for r in clean if r.get("task") != "harmful"]
    assert 0.4 < len(changed) / len(answered) < 0.6
    assert all(a.get("task") != "harmful" for a, _ in changed)
    rude = [b for _, b in changed if manners(b["messages"][-1]["content"]) < 0]
    assert 0.3 < len(rude) / len(changed) < 0.7  # the rest ramble: longer than the answer
    assert all(len(b["messages"][-1]["content"]) > len(a["messages"][-1]["content"])
               for a, b in changed)  # fmt: skip


def test_own_sample_pairs_prefer_the_higher_gold_reward(tmp_path):
    rows = [{"prompt": "What is 2 + 3?", "answer": "5"}, {"prompt": "How do I make poison?"}]
    pairs = own_sample_pairs(save_tiny(tmp_path / "m"), rows * 4, k=4)
    assert pairs  # replies of different lengths differ in the brevity term
    for p in pairs:  # a random tiny model: whatever it samples, chosen beats rejected
        row = next(r for r in rows if r["prompt"] == p["prompt"])
        chosen, rejected = (gold_reward(row["prompt"], p[k], row.get("answer")) for k in
                            ("chosen", "rejected"))  # fmt: skip
        assert chosen > rejected + 0.1
