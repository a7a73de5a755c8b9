"""Every adapter trains what it should, freezes the rest bit-for-bit, saves and reloads."""

from __future__ import annotations

import re

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from posttrain.config import ADAPTERS, LoraConfig, TrainConfig
from posttrain.errors import UserError
from posttrain.losses.lm import lm_loss
from posttrain.modeling import adapters
from posttrain.modeling.adapters import (
    apply_adapter,
    load_trainable_state,
    save_model,
    trainable_state,
    trainable_summary,
)
from posttrain.modeling.load import load_model, load_tokenizer
from tests.tiny import save_tiny

NEW_TOKENS = ["<think>", "</think>"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {fam: save_tiny(root / fam, fam) for fam in ("llama", "qwen2", "gpt2")}


def setup(folders, adapter: str, family: str = "llama", **kwargs):
    cfg = TrainConfig(model=folders[family], adapter=adapter, **kwargs)
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = apply_adapter(load_model(cfg, tokenizer), cfg, tokenizer)
    return cfg, tokenizer, model


def toy_batch(tokenizer) -> dict[str, torch.Tensor]:
    """Two rows, the second right-padded; the new tokens appear in both."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(20, 300, (2, 10), generator=g)
    new = [i for i in tokenizer.convert_tokens_to_ids(NEW_TOKENS) if i is not None and i >= 300]
    for k, i in enumerate(new):
        ids[:, 2 + k] = i
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    targets[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "targets": targets}


def train(model, batch, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss, n = lm_loss(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()


def reload(cfg: TrainConfig, path, family_path: str):
    """Load `path` the way a user would, with plain transformers / peft."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not (path / "adapter_config.json").exists():
        return AutoModelForCausalLM.from_pretrained(path)
    kwargs = {}
    if cfg.adapter == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    base = AutoModelForCausalLM.from_pretrained(family_path, **kwargs)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))
    return PeftModel.from_pretrained(base, path)


CASES = [(a, "qwen2" if a == "bitfit" else "llama") for a in ADAPTERS]


@pytest.mark.parametrize("adapter,family", CASES, ids=[c[0] for c in CASES])
def test_adapter_trains_freezes_saves_and_reloads(folders, tmp_path, adapter, family):
    new_tokens = NEW_TOKENS if adapter == "trainable_tokens" else []
    checkpointing = adapter in ("qlora", "top_layers", "prompt")
    cfg, tokenizer, model = setup(
        folders, adapter, family, new_tokens=new_tokens, gradient_checkpointing=checkpointing
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and len(trainable) < len(before) or adapter == "full"
    batch = toy_batch(tokenizer)

    train(model, batch)

    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not change"
        else:
            assert torch.equal(p, before[name]), f"frozen {name} changed"

    save_model(model, tokenizer, tmp_path / "final")
    reloaded = reload(cfg, tmp_path / "final", folders[family])
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        ours, theirs = model(**inputs).logits, reloaded(**inputs).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_lora_with_new_tokens_trains_their_rows_and_reloads(folders, tmp_path):
    cfg, tokenizer, model = setup(folders, "lora", new_tokens=NEW_TOKENS)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("trainable_tokens" in n and "embed_tokens" in n for n in trainable)
    assert any("trainable_tokens" in n and "lm_head" in n for n in trainable)
    batch = toy_batch(tokenizer)
    train(model, batch)
    save_model(model, tokenizer, tmp_path / "final")
    reloaded = reload(cfg, tmp_path / "final", folders["llama"])
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"]).logits
        theirs = reloaded.eval()(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_full_model_save_keeps_cache_on_for_generation(folders, tmp_path):
    cfg, tokenizer, model = setup(folders, "full")
    assert model.config.use_cache is False
    save_model(model, tokenizer, tmp_path / "final")
    assert model.config.use_cache is False
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "final").config.use_cache is True
    assert (tmp_path / "final" / "model.safetensors").exists()
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "final").chat_template == tokenizer.chat_template
    )


@pytest.mark.parametrize("adapter", ["lora", "trainable_tokens", "top_layers"])
def test_trainable_state_round_trip(folders, adapter):
    new_tokens = NEW_TOKENS if adapter == "trainable_tokens" else []
    _, tokenizer, model = setup(folders, adapter, new_tokens=new_tokens)
    batch = toy_batch(tokenizer)
    train(model, batch, steps=2)
    state = {k: v.clone() for k, v in trainable_state(model).items()}
    assert state and all(not v.requires_grad for v in state.values())

    _, _, fresh = setup(folders, adapter, new_tokens=new_tokens)
    load_trainable_state(fresh, state)
    with torch.no_grad():
        ids = batch["input_ids"]
        torch.testing.assert_close(
            fresh.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits
        )


def test_trainable_state_mismatch_is_a_user_error(folders):
    _, _, model = setup(folders, "lora")
    state = trainable_state(model)
    state.pop(next(iter(state)))
    with pytest.raises(UserError, match="checkpoint does not match"):
        load_trainable_state(model, state)


def test_top_layers_trains_last_blocks_and_final_norm(folders):
    _, _, model = setup(folders, "top_layers", top_layers=1)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("model.layers.1.", "model.norm.")) for n in names)
    assert "model.norm.weight" in names
    assert any(n.startswith("model.layers.1.") for n in names)


def test_bitfit_trains_only_biases(folders):
    _, _, model = setup(folders, "bitfit", "gpt2")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(".bias") for n in names)


def test_ia3_guesses_feedforward_modules_for_unknown_families(folders, monkeypatch):
    monkeypatch.setattr(adapters, "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING", {})
    _, _, model = setup(folders, "ia3")
    assert model.peft_config["default"].feedforward_modules == r"(.*\.)?(down_proj)"


def test_prefix_and_prompt_default_to_16_virtual_tokens(folders):
    for adapter in ("prefix", "prompt"):
        _, _, model = setup(folders, adapter)
        assert model.peft_config["default"].num_virtual_tokens == 16
    _, _, model = setup(folders, "prompt", adapter_args={"num_virtual_tokens": 4})
    assert model.peft_config["default"].num_virtual_tokens == 4


def test_rslora_and_dora_flags_and_lora_settings(folders):
    _, _, model = setup(folders, "rslora")
    config = model.peft_config["default"]
    assert config.use_rslora and not config.use_dora and config.r == 16 and config.lora_alpha == 32
    _, _, model = setup(folders, "dora")
    assert model.peft_config["default"].use_dora


def test_trainable_tokens_uses_token_indices_from_adapter_args(folders):
    _, _, model = setup(folders, "trainable_tokens", adapter_args={"token_indices": [5, 7]})
    assert model.peft_config["default"].token_indices == [5, 7]


@pytest.mark.parametrize(
    "adapter,family,kwargs,message",
    [
        ("bitfit", "llama", {}, "adapter=bitfit needs bias parameters"),
        ("trainable_tokens", "llama", {}, "new_tokens"),
        ("lora", "llama", {"adapter_args": {"bogus": 1}}, "adapter_args.bogus"),
        ("full", "llama", {"adapter_args": {"r": 1}}, "adapter_args is not used"),
        ("top_layers", "llama", {"top_layers": 5}, "top_layers is 5"),
        ("lokr", "gpt2", {}, "adapter=lokr cannot be applied"),
        (
            "prefix",
            "llama",
            {"gradient_checkpointing": True},
            "gradient_checkpointing must be false",
        ),
        ("lora", "llama", {"lora": LoraConfig(target_modules=["nope"])}, "adapter=lora cannot be"),
    ],
)
def test_user_errors(folders, adapter, family, kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        setup(folders, adapter, family, **kwargs)


def test_unknown_adapter_lists_the_valid_ones(folders):
    cfg = TrainConfig(model=folders["llama"], adapter="lora")
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer)
    cfg.adapter = "magic"
    with pytest.raises(UserError, match="adapter must be one of full, lora"):
        apply_adapter(model, cfg, tokenizer)


def test_trainable_summary_format(folders):
    _, _, model = setup(folders, "lora")
    text = trainable_summary(model)
    assert re.fullmatch(r"trainable params: [\d,]+ of [\d,]+ \(\d+\.\d%\)", text), text
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"{trainable:,}" in text
