"""The PPO, frontier and refusal-PPO evidence scripts' evaluation, table, plot and data mix on a
tiny random model and the world's data: their long runs are not tested (minutes to an hour), so
this keeps the parts they share from drifting apart (the others import from ppo.py)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from posttrain.world.datasets import write_world_data
from tests.tiny import save_tiny

EVIDENCE = Path(__file__).resolve().parents[1] / "evidence"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(EVIDENCE))
    try:
        yield [importlib.import_module(m) for m in ("ppo", "frontier", "ppo_refusals")]
    finally:
        sys.path.remove(str(EVIDENCE))


def length_reward(prompts, completions, **_):
    return [float(len(c)) for c in completions]


def test_evaluation_table_and_plot_run_on_a_tiny_model(scripts, tmp_path):
    ppo_script, frontier, refusals = scripts
    data = tmp_path / "data"
    write_world_data(data)
    sft, policy = save_tiny(tmp_path / "sft"), save_tiny(tmp_path / "policy")
    before = ppo_script.evaluate(str(sft), str(sft), data, length_reward)
    after = ppo_script.evaluate(str(policy), str(sft), data, length_reward)
    assert {"accuracy", "gold_greedy", "gold_sampled", "learned_greedy"} <= set(before)
    assert "kl_to_sft" not in before and after["kl_to_sft"] == pytest.approx(0.0, abs=1e-6)
    assert after["gold_greedy"] == before["gold_greedy"]  # same weights, greedy
    assert -2.2 <= after["gold_sampled"] <= 1.0 and after["learned_greedy"] >= 0
    results = {"SFT": before, "DPO beta 0.1": after, "PPO beta 0.1": after}
    lines = ppo_script.table(results).splitlines()
    assert len(lines) == 5 and lines[2].startswith("| SFT |") and lines[3].endswith("| 0.00 |")
    frontier.plot(results, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 0
    assert ppo_script.rl_prompts(data).is_file()
    with pytest.raises(SystemExit, match="overwrite=true"):
        ppo_script.rl_prompts(tmp_path)
    refusals.write_mix(data, tmp_path / "mix.jsonl")
    assert len((tmp_path / "mix.jsonl").read_text().splitlines()) == 900 + 600
