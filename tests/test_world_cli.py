"""`posttrain world data|pretrain`, `posttrain eval` and `posttrain demo --quick` end to end."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import posttrain
from posttrain.cli import main
from posttrain.world.pretrain import BASE_DIR


def test_world_data_writes_splits_and_refuses_a_non_empty_folder(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["world", "data", str(out)]) == 0
    assert (out / "sft_train.jsonl").is_file() and (out / "sft_test.jsonl").is_file()
    before = (out / "sft_test.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["world", "data", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "overwrite=true" in err and len(err.splitlines()) == 1
    assert main(["world", "data", str(out), "overwrite=true"]) == 0
    assert (out / "sft_test.jsonl").read_bytes() == before  # same seed, same bytes


def test_eval_refuses_a_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(tmp_path) in err and len(err.splitlines()) == 1
    assert main(["eval", str(tmp_path / "missing")]) == 2


def test_eval_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ["eval", str(BASE_DIR), "tasks=accuracy,perplexity", "limit=8", f"output={out}"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "accuracy_by_task/translation" in printed and "perplexity" in printed
    results = json.loads(out.read_text())
    assert 0.0 <= results["accuracy"] <= 1.0 and results["perplexity"] > 1.0


def test_pretrain_builds_a_loadable_base_model(tmp_path):
    out = tmp_path / "base"
    args = ["world", "pretrain", f"output_dir={out}", "tokens=20000", "hidden=32", "layers=1"]
    args += ["heads=1", "context=128", "batch_size=4"]
    assert main(args) == 0
    report = json.loads((out / "pretrain.json").read_text())
    assert report["params"] > 0 and report["tokens_seen"] >= 20000 * 0.5
    assert report["final_eval_loss"] is not None
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.max_position_embeddings == 128 and tok.chat_template
    assert main(args) == 2  # exists, no overwrite
    assert main(["world", "pretrain", f"output_dir={tmp_path / 'b'}", "hidden=30", "heads=4"]) == 2


def test_python_api_mirrors_the_cli(tmp_path):
    out = tmp_path / "api.json"
    results = posttrain.evaluate_model(str(BASE_DIR), tasks=["accuracy"], limit=4, output=str(out))
    assert json.loads(out.read_text()) == results and "accuracy_by_task" in results


@pytest.mark.slow
def test_quick_demo_sft_beats_the_base_model(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", f"output_dir={out}"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"base", "sft", "reward", "dpo", "grpo", "ppo", "abliterate"}
    ablated = results["abliterate"]
    assert ablated["refusal_rate_harmful_after"] <= ablated["refusal_rate_harmful_before"]
    assert results["dpo"]["kl_to_sft"] > 0 and "harmful" in results["dpo"]["gold_reward_by_task"]
    ppo = results["ppo"]
    assert ppo["kl_to_sft"] > 0 and results["grpo"]["kl_to_sft"] > 0  # they trained
    assert results["reward"]["pairwise_accuracy"] > 0.6  # chance is 0.5
    assert results["sft"]["accuracy"] > results["base"]["accuracy"] + 0.2
    assert set(results["sft"]["accuracy_by_task"]) == {
        "translation",
        "arithmetic",
        "facts",
        "strings",
    }
    report = (out / "report.md").read_text()
    assert "Translate cheese from English to French." in report
    assert "## Abliteration of the DPO model" in report
    assert (out / "runs" / "abliterate" / "scores.png").stat().st_size > 0  # linked from it
    assert (out / "plots" / "sft.png").stat().st_size > 0
    assert "## PPO: flawed demonstrations" in report and "| ppo |" not in report
    assert "## GRPO: a short SFT run" in report and "| grpo |" not in report
    assert {"accuracy_before", "accuracy_after"} <= set(results["grpo"])
    assert "- SFT: `" in report and "- PPO: `" in report  # its replies before and after
    assert (out / "plots" / "ppo.png").stat().st_size > 0
    assert {"gold_reward_before", "gold_reward_after", "kl_per_reply_training"} <= set(ppo)
