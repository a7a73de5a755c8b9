"""FSDP2 under torchrun (gloo on CPU): same weights as one process, loadable `final/`, exact resume.

Two ranks at batch B with `fsdp=true` take the same batches as one process with grad_accum=2
at batch B; FSDP sums the reduce-scattered gradients like the plain all-reduce does, so the
weights must agree up to float summation order. A run resumed from a mid-way checkpoint
(full tensors gathered on rank 0, scattered back to shards) ends bit-identical to the run
that went straight through. The per-rank RNG round trip is checked without processes.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from posttrain.cli import main
from posttrain.train import checkpoint
from tests.test_sft import base_args, write_chats
from tests.tiny import save_tiny

FINAL = {"full": "model.safetensors", "lora": "adapter_model.safetensors"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    tiny = save_tiny(root / "tiny")
    data = write_chats(root / "chats.jsonl", n=32)
    evals = write_chats(root / "eval.jsonl", n=5)  # 3 eval batches: rank 1 runs a spare one
    return tiny, data, evals


def args_for(world, out, adapter, *extra):
    tiny, data, evals = world
    lr = "lr=1e-3" if adapter == "full" else "lr=1e-2"
    return base_args(
        tiny, data, out, f"data.eval={evals}", f"adapter={adapter}", lr,
        "max_steps=4", "batch_size=2", "seed=3", *extra,
    )  # fmt: skip


def torchrun(args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, "-m", "posttrain.cli", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def last_eval(out):
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in records if "eval_loss" in r][-1]


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_fsdp_two_ranks_equal_one_process_and_resume_exactly(world, tmp_path, adapter):
    sharded = tmp_path / "fsdp"
    torchrun(args_for(world, sharded, adapter, "fsdp=true", "save_every=2"))
    assert (sharded / "checkpoints" / "step-2" / "state.json").is_file()

    one = tmp_path / "one"
    assert main(args_for(world, one, adapter, "grad_accum=2")) == 0
    a = load_file(one / "final" / FINAL[adapter])
    b = load_file(sharded / "final" / FINAL[adapter])
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
    assert last_eval(sharded) == pytest.approx(last_eval(one), abs=1e-4)

    base = AutoModelForCausalLM.from_pretrained(world[0])
    ids = torch.tensor([[1, 5, 9, 30]])
    before = base(ids).logits
    if adapter == "lora":
        loaded = PeftModel.from_pretrained(base, sharded / "final")  # injects into base
    else:
        loaded = AutoModelForCausalLM.from_pretrained(sharded / "final")
    assert not torch.allclose(loaded(ids).logits, before)

    if adapter != "full":
        return  # one resume is enough: the checkpoint path is the same for every adapter
    resumed = tmp_path / "resumed"  # the same run, cut after its step-2 checkpoint
    shutil.copytree(sharded, resumed, ignore=shutil.ignore_patterns("step-4", "final"))
    proc = torchrun(args_for(world, resumed, adapter, "fsdp=true", "save_every=2"))
    assert "resuming" in proc.stderr
    c = load_file(resumed / "final" / FINAL[adapter])
    for key in b:
        assert torch.equal(b[key], c[key]), key


def test_checkpoint_keeps_each_ranks_rng_and_optimizer_keys_by_name(tmp_path):
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        random.seed(seed)
        states.append(checkpoint.rng_state())
    optimizer_state = {
        "state": {"model.layers.0.w": {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
        "param_groups": [{"lr": 0.1, "params": ["model.layers.0.w"]}],
    }
    params = {"model.layers.0.w": torch.zeros(2)}
    path = checkpoint.save(tmp_path, 5, params, optimizer_state, {"micro": 5}, 1, states)
    torch.manual_seed(99)
    _, opt, state = checkpoint.load(path, rank=1)
    assert torch.equal(torch.get_rng_state(), states[1]["torch"])
    assert random.getstate() == states[1]["python"]
    assert state["step"] == 5 and opt["param_groups"] == optimizer_state["param_groups"]
    assert torch.equal(opt["state"]["model.layers.0.w"]["exp_avg"], torch.ones(2))
    checkpoint.load(path, rank=0)
    assert torch.equal(torch.get_rng_state(), states[0]["torch"])
    checkpoint.load(path, rank=3)  # more ranks than saved: rank 0's
    assert random.getstate() == states[0]["python"]
