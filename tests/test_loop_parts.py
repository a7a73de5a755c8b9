"""Loop pieces: the learning-rate schedule and the optimizer-state round trip."""

import math

import pytest
import torch

from posttrain.config import TrainConfig
from posttrain.train import checkpoint
from posttrain.train.loop import lr_at, total_steps


def cfg(**kw):
    return TrainConfig(model="m", **kw)


def test_schedules():
    c = cfg(lr=1.0, warmup=2, schedule="cosine")
    assert [lr_at(s, 10, c) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, 10, c) == 1.0
    assert lr_at(6, 10, c) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    lin = cfg(lr=1.0, warmup=0, schedule="linear")
    assert lr_at(5, 10, lin) == pytest.approx(0.5)
    assert lr_at(7, 10, cfg(lr=0.3, warmup=0.0, schedule="constant")) == 0.3
    assert lr_at(0, 100, cfg(lr=1.0, warmup=0.1)) == pytest.approx(0.1)


def test_total_steps():
    assert total_steps(cfg(max_steps=7), 100) == 7
    assert total_steps(cfg(epochs=2, grad_accum=4), 10) == 5


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.sum().backward()
    opt.step()
    tensors, meta = checkpoint.flatten_optimizer(opt.state_dict())
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=0.5)
    opt2.load_state_dict(checkpoint.unflatten_optimizer(tensors, meta))
    a, b = opt.state_dict(), opt2.state_dict()
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(a["state"][0][key], b["state"][0][key])
    assert b["param_groups"][0]["lr"] == 0.1
