"""Data parallel under torchrun (gloo on CPU): ranks stay identical and match one process.

Two ranks at batch B each take the same batches, in the same order, as one process with
grad_accum=2 at batch B, and the loss is normalised by the step's total target tokens in
both, so the weights after training must agree (up to float summation order).
"""

from __future__ import annotations

import subprocess
import sys

import torch
from safetensors.torch import load_file

from tests.test_sft import base_args, run_cli, write_chats
from tests.tiny import save_tiny

DUMP_RANKS = (
    "import os, sys\n"
    "from safetensors.torch import save_file\n"
    "from posttrain.train import loop\n"
    "orig = loop.Loop.finish\n"
    "def finish(self):\n"
    "    state = {k: v.contiguous() for k, v in self.trainable_state().items()}\n"
    "    save_file(state, os.path.join(self.cfg.output_dir, f'rank{self.rank}.safetensors'))\n"
    "    orig(self)\n"
    "loop.Loop.finish = finish\n"
    "from posttrain.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_torchrun_two_ranks_identical_and_equal_to_one_process(tmp_path):
    tiny = save_tiny(tmp_path / "tiny")
    data = write_chats(tmp_path / "chats.jsonl", n=32)
    script = tmp_path / "dump.py"
    script.write_text(DUMP_RANKS)
    args = base_args(tiny, data, tmp_path / "ddp", "max_steps=4", "batch_size=2", "seed=3")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(script),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = load_file(tmp_path / "ddp" / "rank0.safetensors")
    r1 = load_file(tmp_path / "ddp" / "rank1.safetensors")
    assert r0.keys() == r1.keys() and r0
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key

    single = base_args(
        tiny, data, tmp_path / "one", "max_steps=4", "batch_size=2", "seed=3", "grad_accum=2"
    )
    assert run_cli(single).returncode == 0
    one = load_file(tmp_path / "one" / "final" / "adapter_model.safetensors")
    ddp = load_file(tmp_path / "ddp" / "final" / "adapter_model.safetensors")
    for key in one:
        torch.testing.assert_close(one[key], ddp[key], atol=1e-5, rtol=1e-4)
