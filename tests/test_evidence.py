"""The PPO, frontier and refusal-PPO evidence scripts' evaluation, tables, plot and random
reward on a tiny random model and the world's data (their data mix and own-sample pairs live in
`posttrain/world/rlhf.py`, tested in test_rlhf.py): their long runs
are not tested (minutes to an hour), so this keeps the parts they share from drifting apart (the
others import from ppo.py)."""

from __future__ import annotations

import importlib
import json
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


def test_evaluation_table_and_plot_run_on_a_tiny_model(scripts, tmp_path, capsys):
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
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "report.md").write_text("# demo\n\n## Results\n\nrows\n\n## Completions\n\nc\n")
    for _ in range(2):  # a second run replaces the section
        frontier.add_to_report(demo, results, tmp_path / "frontier.png")
    report = (demo / "report.md").read_text()
    assert report.count(frontier.SECTION) == 1 and report.count("## Completions") == 1
    assert report.index("rows") < report.index(frontier.SECTION) < report.index("## Completions")
    assert "| DPO beta 0.1 |" in report and (demo / "plots" / "frontier.png").is_file()
    (demo / "report.md").unlink()  # an interrupted demo folder: nothing to add to, no error
    frontier.add_to_report(demo, results, tmp_path / "frontier.png")
    assert ppo_script.rl_prompts(data).is_file()
    for call, message in ((lambda: ppo_script.rl_prompts(tmp_path), "overwrite=true\n"),
                          (lambda: ppo_script.demo_run(tmp_path, "sft"), "runs/sft: no finished")):  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            call()
        assert stop.value.code == 2 and message in capsys.readouterr().err
    ppo_runs = [{**after, "kl_training": 0.5}, {**after, "kl_training": 1.5}]
    lines = refusals.seed_table({"SFT": [before], "PPO": ppo_runs}).splitlines()
    assert lines[2].startswith("| SFT | 1 |") and lines[2].endswith("| - | - |")
    assert lines[3].startswith("| PPO | 2 |") and "| 0.000 (0.000..0.000) |" in lines[3]
    assert lines[3].endswith("| 1.000 (0.500..1.500) |")


def test_training_kl_averages_the_last_logged_steps(scripts, tmp_path):
    rows = [{"step": i, "kl": float(i)} for i in range(20)] + [{"step": 20, "eval_loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert scripts[2].training_kl(tmp_path, last=4) == 17.5


def test_random_reward_is_a_fixed_standard_normal_of_the_text(scripts):
    refusals = scripts[2]
    prompts, replies = ["a"] * 2000, [str(i) for i in range(2000)]
    values = refusals.random_reward(prompts, replies)
    assert values == refusals.random_reward(prompts, replies)
    assert abs(sum(values) / 2000) < 0.1 and 0.9 < (sum(v * v for v in values) / 2000) < 1.1
    assert refusals.random_reward(["b"], ["0"]) != values[:1]


def test_bad_flags_and_a_reused_folder_with_other_settings_exit_2(scripts, tmp_path, monkeypatch,
                                                                  capsys):  # fmt: skip
    refusals = scripts[2]
    for flags in (["--flawed", "1.5"], ["--seeds", "0"], ["--target-kl", "-1"]):
        monkeypatch.setattr(sys, "argv", ["ppo_refusals.py", "--out", str(tmp_path), *flags])
        with pytest.raises(SystemExit) as stop:
            refusals.main()
        assert stop.value.code == 2 and "--flawed" in capsys.readouterr().err
    refusals.same_settings(tmp_path, {"flawed": 0.5, "target_kl": 2.0})
    refusals.same_settings(tmp_path, {"flawed": 0.5, "target_kl": 2.0})  # the same: fine
    with pytest.raises(SystemExit) as stop:
        refusals.same_settings(tmp_path, {"flawed": 0.0, "target_kl": 2.0})
    assert stop.value.code == 2 and "choose another --out" in capsys.readouterr().err


def test_frontier_seeds_table_gives_mean_and_range(scripts):
    frontier = scripts[1]
    runs = [{"SFT": {"gold_greedy": 0.3}, "DPO beta 0.1": {"gold_greedy": g, "kl_to_sft": k}}
            for g, k in ((0.5, 1.0), (0.7, 2.0))]  # fmt: skip
    table = frontier.seeds_table(runs)
    assert "| SFT | +0.300 | - |" in table
    assert "| DPO beta 0.1 | +0.600 (+0.500 to +0.700) | 1.50 (1.00 to 2.00) |" in table
