"""Chunked LM losses equal the plain full-logits path, and never build the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM

from posttrain.errors import UserError
from posttrain.losses.lm import (
    OutputHead,
    final_hidden,
    linear_cross_entropy,
    lm_loss,
    output_head,
    right_padded,
    token_logprobs,
)
from tests.tiny import FAMILIES, tiny_model

VOCAB = 400


def make_batch(batch: int = 3, length: int = 11, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows with a few ignored targets."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    targets[:, :2] = -100  # a "prompt"
    targets[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "targets": targets}


def reference_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, -batch["input_ids"].shape[1] :]  # prompt tuning prepends virtual tokens
    return F.cross_entropy(
        logits.flatten(0, 1).float(), batch["targets"].flatten(), reduction="sum"
    )


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_loss_and_grads(model, batch, chunk_size: int = 7) -> None:
    loss, n = lm_loss(model, batch, chunk_size=chunk_size)
    loss.backward()
    ours = grads(model)
    ref = reference_loss(model, batch)
    ref.backward()
    theirs = grads(model)
    assert n == int((batch["targets"] != -100).sum())
    torch.testing.assert_close(loss / n, ref / n, rtol=0, atol=1e-5)  # per token: fp32 sums of ~100
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)


def model_of(family: str):
    """A tiny model in eval mode (GPT-2's dropout would make two forwards differ)."""
    return tiny_model(family, VOCAB).eval().eval()


def lora(model):
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config)


# ----------------------------------------------------------------------------- the model side


@pytest.mark.parametrize("family", FAMILIES)
def test_final_hidden_through_the_head_gives_the_model_logits(family):
    model = model_of(family)
    batch = make_batch()
    hidden = final_hidden(model, batch)
    assert hidden.shape == (3, 11, 64)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()  # pad positions are unconstrained (no mask is passed)
    torch.testing.assert_close(output_head(model)(hidden)[real], logits[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("adapter", [None, "lora"])
def test_lm_loss_and_grads_equal_the_full_logits_path(family, adapter):
    model = model_of(family)
    if adapter:
        model = lora(model)
    assert_same_loss_and_grads(model, make_batch())


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_prompt_learning_adapters(family, kind):
    cls = PrefixTuningConfig if kind == "prefix" else PromptTuningConfig
    model = get_peft_model(model_of(family), cls(task_type="CAUSAL_LM", num_virtual_tokens=4))
    batch = make_batch()
    hidden = final_hidden(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(
        output_head(model)(hidden)[real], logits[:, -11:][real], rtol=0, atol=1e-5
    )
    assert_same_loss_and_grads(model, batch)


def test_prompt_tuning_refuses_packed_rows():
    model = get_peft_model(
        model_of("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    batch = make_batch()
    packed = {"input_ids": batch["input_ids"], "position_ids": torch.arange(11).repeat(3, 1)}
    with pytest.raises(UserError, match="packing"):
        final_hidden(model, packed)


def test_packed_rows_equal_the_examples_run_alone():
    """transformers only separates packed examples without a KV cache: lm_loss passes use_cache=False."""
    model = model_of("llama")
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    targets = ids.roll(-1, 1)
    targets[0, [4, 11]] = -100  # last token of each example
    loss, n = lm_loss(model, {"input_ids": ids, "position_ids": positions, "targets": targets})
    alone = 0.0
    for part in (slice(0, 5), slice(5, 12)):
        logits = model(input_ids=ids[:, part]).logits[0]
        alone += F.cross_entropy(logits, targets[0, part], reduction="sum")
    assert n == 10
    torch.testing.assert_close(loss / n, alone / n, rtol=0, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_grads():
    model = lora(model_of("qwen2")).train()  # checkpointing only runs in training mode
    base = model.get_base_model()
    base.activation_checkpointing_enable({"use_reentrant": False})
    calls = []
    base.model.layers[0].mlp.register_forward_pre_hook(lambda *args: calls.append(1))
    loss, _ = lm_loss(model, make_batch())
    loss.backward()
    assert len(calls) == 2  # forward, then the recomputation in backward
    model.zero_grad()
    assert_same_loss_and_grads(model, make_batch())


def transformed_model(kind: str):
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    extra = {
        "gemma2": dict(final_logit_softcapping=0.5, head_dim=16),  # a tight cap changes everything
        "cohere": dict(logit_scale=0.25),
        "granite": dict(logits_scaling=3.0),
    }[kind]
    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, **common, **extra)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
def test_family_logit_transforms(kind):
    model = transformed_model(kind)
    batch = make_batch()
    head = output_head(model)
    assert head.scale != 1.0 or head.softcap
    assert_same_loss_and_grads(model, batch)


def test_an_unreproduced_logit_transform_fails_loudly():
    model = model_of("llama")
    model.config.final_logit_softcapping = 0.5  # our head would cap; Llama's forward does not
    with pytest.raises(UserError, match="does not reproduce"):
        lm_loss(model, make_batch())


def test_no_targets_gives_a_zero_loss_that_backprops():
    model = model_of("llama")
    batch = make_batch()
    batch["targets"] = torch.full_like(batch["targets"], -100)
    loss, n = lm_loss(model, batch)
    loss.backward()
    assert n == 0 and loss.item() == 0.0


def test_autocast_bf16_is_close_to_fp32():
    model = model_of("llama")
    batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = lm_loss(model, batch)
    ref = reference_loss(model, batch)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=0)


# ----------------------------------------------------------------------------- the head side


def random_problem(n=37, h=16, v=50, bias=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    head = nn.Linear(h, v, bias=bias, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g, dtype=dtype))
        if bias:
            head.bias.copy_(torch.randn(v, generator=g, dtype=dtype))
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, head, targets


def leaf_grads(*tensors):
    out = [None if t is None or t.grad is None else t.grad.clone() for t in tensors]
    for t in tensors:
        if t is not None:
            t.grad = None
    return out


@pytest.mark.parametrize("chunk_size", [1, 8, 37, 4096])
@pytest.mark.parametrize("transform", [(1.0, None), (0.3, None), (1.0, 2.0), (1.7, 3.0)])
def test_fused_linear_cross_entropy_matches_float64_reference(chunk_size, transform):
    hidden, linear, targets = random_problem()
    head = OutputHead(linear, *transform)
    loss = linear_cross_entropy(hidden, head, targets, chunk_size)
    (2.5 * loss).backward()  # a non-unit upstream gradient
    ours = leaf_grads(hidden, linear.weight, linear.bias)
    ref = F.cross_entropy(head(hidden), targets, reduction="sum")
    (2.5 * ref).backward()
    theirs = leaf_grads(hidden, linear.weight, linear.bias)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)


def test_fused_path_skips_frozen_heads_and_bias_free_heads():
    hidden, linear, targets = random_problem(bias=False)
    linear.weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, linear, targets, 5)
    loss.backward()
    assert linear.weight.grad is None and hidden.grad is not None
    ref_hidden = hidden.detach().clone().requires_grad_()
    F.cross_entropy(linear(ref_hidden), targets, reduction="sum").backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad)


def test_fallback_for_wrapped_heads_matches():
    hidden, linear, targets = random_problem()
    wrapped = nn.Sequential(linear)  # not a plain nn.Linear: per-chunk checkpointing
    loss = linear_cross_entropy(hidden, wrapped, targets, 6)
    loss.backward()
    ours = leaf_grads(hidden, linear.weight, linear.bias)
    ref = F.cross_entropy(linear(hidden), targets, reduction="sum")
    ref.backward()
    theirs = leaf_grads(hidden, linear.weight, linear.bias)
    torch.testing.assert_close(loss.double(), ref)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_no_grad_path_matches():
    hidden, linear, targets = random_problem()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, linear, targets, 6)
        ref = F.cross_entropy(linear(hidden), targets, reduction="sum")
    torch.testing.assert_close(loss.double(), ref)


@pytest.mark.parametrize("wrap", [False, True])
def test_token_logprobs_match_log_softmax(wrap):
    hidden, linear, targets = random_problem()
    head = nn.Sequential(linear) if wrap else OutputHead(linear, 0.5, 4.0)
    upstream = torch.randn(hidden.shape[0], dtype=torch.float64)
    ours = token_logprobs(hidden, head, targets, chunk_size=10)
    (ours.double() * upstream).sum().backward()
    ours_grads = leaf_grads(hidden, linear.weight, linear.bias)
    ref = torch.log_softmax(head(hidden), -1).gather(1, targets[:, None]).squeeze(1)
    (ref * upstream).sum().backward()
    ref_grads = leaf_grads(hidden, linear.weight, linear.bias)
    assert ours.shape == (hidden.shape[0],)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- memory


class LargestVocabTensor(TorchDispatchMode):
    """Records the most rows of any new (..., V) tensor an aten op produces (views excluded)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [*args, *(kwargs or {}).values()]
        inputs = {a.untyped_storage().data_ptr() for a in flat if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[-1] != self.vocab:
                continue
            if (
                t.untyped_storage().data_ptr() not in inputs
            ):  # a view of the head weight is no logits
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("adapter", [None, "lora"])
def test_no_tensor_holds_more_than_a_chunk_of_logits(adapter):
    model = model_of("llama")
    if adapter:
        model = lora(model)
    batch = make_batch(batch=4, length=40)
    n = int((batch["targets"] != -100).sum())
    assert n > 4 * 16

    spy = LargestVocabTensor(VOCAB)
    with spy:
        loss, _ = lm_loss(model, batch, chunk_size=16)
        loss.backward()
    assert spy.rows <= 16, spy.rows

    plain = LargestVocabTensor(VOCAB)
    with plain:
        reference_loss(model, batch).backward()
    assert plain.rows >= n  # the instrument does see full logits when they exist


def test_right_padded_masks_are_recognised():
    assert right_padded(torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))
    assert not right_padded(torch.tensor([[0, 1, 1]]))  # left padding keeps its mask
    assert not right_padded(torch.tensor([[1, 0, 1]]))
    assert not right_padded(None)
