"""The fused layers compute what transformers and peft compute, and step aside where they would not."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

from posttrain.modeling.fused import FusedLoraLinear, fuse, fuse_lora, merged_lora, rotate
from tests.tiny import tiny_model


class Block(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.proj = nn.Linear(24, 40, bias=bias)

    def forward(self, x):
        return self.proj(x)


def lora_block(bias: bool, seed: int = 0, **config) -> nn.Module:
    torch.manual_seed(seed)
    model = get_peft_model(
        Block(bias), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], **config)
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: make the LoRA term count
            nn.init.normal_(p, std=0.5)
    return model


def forward_backward(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), {"x": x.grad, **grads}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
def test_fused_equals_peft(bias, rslora):
    x = torch.randn(3, 5, 24)
    peft_model = lora_block(bias, use_rslora=rslora)
    fused = lora_block(bias, use_rslora=rslora)
    assert fuse_lora(fused) == 1 and isinstance(fused.base_model.model.proj, FusedLoraLinear)
    assert fused.base_model.model.proj.plain_adapter(x, (), {}) == "default"
    y0, g0 = forward_backward(peft_model, x)
    y1, g1 = forward_backward(fused, x)
    torch.testing.assert_close(y1, y0, rtol=0, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) == 3  # x, lora_A, lora_B
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=1e-5)


def test_no_input_gradient_when_input_is_frozen():
    model = lora_block(True)
    fuse_lora(model)
    model(torch.randn(2, 24)).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_falls_back_to_peft_where_not_exact():
    x = torch.randn(2, 24)
    layer = lora_block(True).base_model.model.proj
    fuse_lora(layer)
    assert layer.plain_adapter(x, (), {}) == "default"
    with layer_disabled(layer):
        assert layer.plain_adapter(x, (), {}) is None
        torch.testing.assert_close(layer(x), layer.base_layer(x))
    assert layer.plain_adapter(x.double(), (), {}) is None
    assert layer.plain_adapter(x, (), {"adapter_names": ["default"] * 2}) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.plain_adapter(x, (), {}) is None
    layer.base_layer.weight.requires_grad_(True)
    assert layer.plain_adapter(x, (), {}) is None
    dropout = lora_block(True, lora_dropout=0.1).base_model.model.proj
    dora = lora_block(True, use_dora=True).base_model.model.proj
    for other in (dropout, dora):
        fuse_lora(other)
        assert isinstance(other, FusedLoraLinear) and other.plain_adapter(x, (), {}) is None


class layer_disabled:
    def __init__(self, layer):
        self.layer = layer

    def __enter__(self):
        self.layer.enable_adapters(False)

    def __exit__(self, *exc):
        self.layer.enable_adapters(True)


def test_merged_lora_equals_peft_without_grad_only():
    x = torch.randn(3, 5, 24)
    peft_layer = lora_block(True).base_model.model.proj
    model = lora_block(True)
    fuse_lora(model)
    layer = model.base_model.model.proj
    weight = layer.base_layer.weight.clone()
    with merged_lora(model) as merged:
        assert merged == 1
        with torch.no_grad():
            torch.testing.assert_close(layer(x), peft_layer(x), rtol=0, atol=1e-5)
            with layer_disabled(layer):  # the reference model: the base alone, not W + s B A
                torch.testing.assert_close(layer(x), layer.base_layer(x))
            layer.merged_for = (layer.merged_for[0], torch.zeros_like(weight))  # a wrong copy
            bias_only = layer.base_layer.bias.expand(3, 5, 40)
            torch.testing.assert_close(layer(x), bias_only)  # the merged copy is what computes
            assert layer.merged_still_applies(x, (), {})
            assert not layer.merged_still_applies(x.double(), (), {})
            assert not layer.merged_still_applies(x, (), {"adapter_names": ["default"] * 3})
        y, grads = forward_backward(model, x)  # with grad: the autograd path, not the copy
        torch.testing.assert_close(y, peft_layer(x).detach(), rtol=0, atol=1e-5)
        assert grads["x"] is not None
    assert layer.merged_for is None
    assert torch.equal(layer.base_layer.weight, weight)  # never written into the base


def test_fuses_only_plain_linear_bases():
    llama = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear"))
    gpt2 = get_peft_model(tiny_model("gpt2"), LoraConfig(r=4, target_modules="all-linear"))
    linears = [m for m in llama.modules() if type(m) is PeftLoraLinear]
    assert fuse_lora(llama) == len(linears) > 0
    assert fuse_lora(gpt2) == 0  # GPT-2's Conv1D layers keep peft's forward
    assert not any(type(m) is PeftLoraLinear for m in llama.modules())


def loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    out = model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]]))
    loss = (out.logits.log_softmax(-1)[..., :7] * torch.linspace(-1, 1, 7)).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_fused_norms_and_rotary_equal_transformers(family, monkeypatch):
    model = tiny_model(family)
    code = sys.modules[type(model).__module__]
    original = getattr(code.apply_rotary_pos_emb, "__wrapped__", code.apply_rotary_pos_emb)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 400, (1, 12))
    with monkeypatch.context() as patched:
        patched.setattr(code, "apply_rotary_pos_emb", original)
        loss0, grads0 = loss_and_grads(reference, ids)
    done = fuse(model)
    norms = 5 if family != "qwen3" else 9  # 2 per block + final; Qwen3 adds q/k norms
    assert done == {"lora": 0, "rms_norm": norms, "rope": [family]}
    assert code.apply_rotary_pos_emb is not original
    loss1, grads1 = loss_and_grads(model, ids)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-5)
    for name, grad in grads0.items():
        torch.testing.assert_close(grads1[name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["gemma", "gpt2"])
def test_other_families_are_left_alone(family):
    model = tiny_model(family)
    assert fuse(model) == {"lora": 0, "rms_norm": 0, "rope": []}


def test_rotate_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])  # halves (1, 2) and (3, 4)
    cos, sin = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])  # 90 degrees, then 0
    torch.testing.assert_close(rotate(x, cos, sin, 1.0), torch.tensor([-3.0, 2.0, 1.0, 4.0]))
    torch.testing.assert_close(rotate(rotate(x, cos, sin, 1.0), cos, sin, -1.0), x)
