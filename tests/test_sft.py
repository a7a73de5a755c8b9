"""SFT end to end on a tiny local model: run directory, reload, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import posttrain
from posttrain.cli import main
from tests.tiny import save_tiny

QUESTIONS = [
    "What is 12 plus 30?",
    "Translate cheese to French.",
    "Reverse stone.",
    "Capital of France?",
]
ANSWERS = ["42", "fromage", "enots", "Paris"]


def write_chats(path, n=24):
    with open(path, "w") as f:
        for i in range(n):
            q, a = QUESTIONS[i % 4], ANSWERS[i % 4]
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            if i % 3 == 0:
                msgs.insert(0, {"role": "system", "content": "You are a helpful assistant."})
            f.write(json.dumps({"messages": msgs}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny", family="llama")


def base_args(tiny_dir, data, out, *extra):
    return [
        "sft", f"model={tiny_dir}", f"data.train={data}", f"output_dir={out}",
        "batch_size=4", "max_length=64", "lr=1e-2", "log_every=1", "lora.r=4", *extra,
    ]  # fmt: skip


def test_lora_sft_writes_a_loadable_run(tiny_dir, tmp_path):
    data = write_chats(tmp_path / "chats.jsonl")
    out = tmp_path / "run"
    assert main(base_args(tiny_dir, data, out, "max_steps=6", f"data.eval={data}")) == 0
    assert (out / "config.yaml").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "tokens_per_s"} <= r.keys() for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    assert any("eval_loss" in r for r in records)
    assert (out / "checkpoints" / "step-6" / "state.json").is_file()
    final = out / "final"
    assert (final / "adapter_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(final)
    assert tok.chat_template
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    ids = torch.tensor([[1, 5, 9, 30]])
    before = base(ids).logits
    model = PeftModel.from_pretrained(base, final)
    assert not torch.allclose(model(ids).logits, before)
    assert main(["plot", str(out)]) == 0 and (out / "curves.png").stat().st_size > 1000


def run_cli(args, kill_at_step=None):
    """Run the CLI in a fresh process; optionally SIGKILL it when it reaches a step."""
    script = (
        "import os, signal, sys\n"
        "from posttrain.train import loop\n"
        "orig = loop.Loop.train_step\n"
        "def patched(self):\n"
        f"    if self.step == {kill_at_step!r}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return orig(self)\n"
        "loop.Loop.train_step = patched\n"
        "from posttrain.cli import main\n"
        f"sys.exit(main({args!r}))\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_resume_after_sigkill_is_bit_exact(tiny_dir, tmp_path, adapter):
    data = write_chats(tmp_path / "chats.jsonl")
    extra = [
        "max_steps=8",
        "save_every=3",
        f"adapter={adapter}",
        "lora.dropout=0.1",
        "grad_accum=2",
    ]
    if adapter == "full":
        extra.append("lr=1e-3")
    straight = run_cli(base_args(tiny_dir, data, tmp_path / "a", *extra))
    assert straight.returncode == 0, straight.stderr
    killed = run_cli(base_args(tiny_dir, data, tmp_path / "b", *extra), kill_at_step=5)
    assert killed.returncode == -9
    assert (tmp_path / "b" / "checkpoints" / "step-3").is_dir()
    assert not (tmp_path / "b" / "final").exists()
    resumed = run_cli(base_args(tiny_dir, data, tmp_path / "b", *extra))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    name = "adapter_model.safetensors" if adapter == "lora" else "model.safetensors"
    a = load_file(tmp_path / "a" / "final" / name)
    b = load_file(tmp_path / "b" / "final" / name)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps) and len(steps) == len(set(steps))


@pytest.mark.parametrize(
    "content, extra, message",
    [
        ('{"messages": []}\n{bad json\n', [], "chats.jsonl:2: invalid JSON"),
        ("", [], "chats.jsonl: no rows"),
        ('{"foo": 1}\n', [], "chats.jsonl:1"),
        (None, ["data.train={tmp}/missing.jsonl"], "missing.jsonl: file not found"),
        (None, ["adapter=nope"], "adapter must be one of"),
        (None, ["lora.r=0"], "lora.r must be > 0, got 0"),
        (None, ["data.format=weird"], "weird"),
        (None, ["max_length=3"], "max_length"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tiny_dir, tmp_path, capsys, content, extra, message
):
    path = tmp_path / "chats.jsonl"
    if content is None:
        write_chats(path)
    else:
        path.write_text(content)
    out = tmp_path / "run"
    extra = [e.format(tmp=tmp_path) for e in extra]
    args = base_args(tiny_dir, path, out, "max_steps=2", *extra)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_python_api_takes_a_dict(tiny_dir, tmp_path):
    data = write_chats(tmp_path / "chats.jsonl")
    cfg = {"model": tiny_dir, "data": {"train": data}, "output_dir": str(tmp_path / "run")}
    metrics = posttrain.sft({**cfg, "max_steps": 2, "batch_size": 4, "max_length": 64})
    assert metrics["step"] == 2 and metrics["loss"] > 0
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()


def test_a_run_with_checkpoints_resumes_only_under_its_own_settings(tiny_dir, tmp_path, capsys):
    data = write_chats(tmp_path / "chats.jsonl")
    out = tmp_path / "run"
    assert main(base_args(tiny_dir, data, out, "max_steps=2")) == 0
    before = (out / "config.yaml").read_text()
    capsys.readouterr()
    for changed in (["lr=3e-2"], ["lora.r=8"], ["adapter_args={use_rslora: true}"]):
        assert main(base_args(tiny_dir, data, out, "max_steps=2", *changed)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "choose another output_dir" in err, err
        assert f"started with {changed[0].split('=')[0]}=" in err
    assert (out / "config.yaml").read_text() == before  # nothing rewritten
    (out / "config.yaml").write_text(before + "lr: [\n")  # a damaged config.yaml
    assert main(base_args(tiny_dir, data, out, "max_steps=2")) == 2
    assert "not valid YAML" in capsys.readouterr().err
    (out / "config.yaml").write_text("- lr\n")  # valid YAML, but no settings
    assert main(base_args(tiny_dir, data, out, "max_steps=2")) == 2
    assert "not a mapping of settings" in capsys.readouterr().err
    (out / "config.yaml").write_text(before.replace("data:", "data: x\nold_data:"))
    assert main(base_args(tiny_dir, data, out, "max_steps=2")) == 2  # a section that is a string
    assert "started with data='x'" in capsys.readouterr().err
    (out / "config.yaml").write_text(before)
    # what is logged or kept may change: the finished run resumes at its last step
    assert main(base_args(tiny_dir, data, out, "max_steps=2", "log_every=5")) == 0
