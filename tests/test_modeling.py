"""Tokenizer and model loading: pad tokens, new tokens, dtypes, attention, 4-bit, errors."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from posttrain.config import TrainConfig
from posttrain.errors import UserError
from posttrain.modeling import load
from posttrain.modeling.load import load_model, load_tokenizer, resolve_attention, resolve_dtype
from tests.tiny import save_tiny, tiny_tokenizer

cuda = torch.cuda.is_available()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("llama") / "model", "llama")


def config(model: str, **kwargs) -> TrainConfig:
    return TrainConfig(model=model, **kwargs)


def test_resolve_dtype():
    assert resolve_dtype("auto") == (torch.bfloat16 if cuda else torch.float32)
    assert resolve_dtype("float16") == torch.float16
    assert resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(UserError, match="dtype"):
        resolve_dtype("float8")


def test_resolve_attention():
    assert resolve_attention("eager", torch.float32) == "eager"
    assert resolve_attention("flash_attention_2", torch.bfloat16) == "flash_attention_2"
    assert (
        resolve_attention("auto", torch.float32) == "sdpa"
    )  # flash-attention needs half precision
    if not cuda:
        assert resolve_attention("auto", torch.bfloat16) == "sdpa"


def test_tokenizer_gets_eos_as_pad_and_new_tokens(tmp_path):
    tok = tiny_tokenizer("chatml")
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(config(str(tmp_path), new_tokens=["<think>", "</think>"]))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert len(loaded) == len(tok) + 2
    ids = loaded("a <think> b</think>")["input_ids"]
    assert (
        loaded.convert_tokens_to_ids("<think>") in ids
        and loaded.convert_tokens_to_ids("</think>") in ids
    )
    assert "<think>" not in loaded.all_special_tokens  # regular added tokens
    assert loaded.chat_template == tok.chat_template


def test_tokenizer_without_pad_or_eos_gets_a_pad_token(tmp_path):
    tok = tiny_tokenizer(None)
    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer)
    bare.save_pretrained(tmp_path)
    loaded = load_tokenizer(config(str(tmp_path)))
    assert loaded.pad_token == "<|pad|>"


def test_existing_tokens_are_not_added_twice(folder):
    loaded = load_tokenizer(config(folder, new_tokens=["<|im_start|>"]))
    assert len(loaded) == len(load_tokenizer(config(folder)))


def test_bad_new_tokens_name_the_key(folder):
    with pytest.raises(UserError, match="new_tokens"):
        load_tokenizer(config(folder, new_tokens=[""]))


@pytest.mark.parametrize("name", ["/no/such/folder", "nobody/no-such-model-xyz"])
def test_missing_model_is_a_user_error(name):
    with pytest.raises(UserError, match=r"^model: cannot load '.*' \(.+\)$"):
        load_tokenizer(config(name, offline=True))
    tok = tiny_tokenizer()
    with pytest.raises(UserError, match=r"^model: cannot load"):
        load_model(config(name, offline=True), tok)


def test_load_model_defaults(folder):
    cfg = config(folder)
    model = load_model(cfg, load_tokenizer(cfg))
    assert model.dtype == (torch.bfloat16 if cuda else torch.float32)
    assert model.config._attn_implementation == "sdpa"
    assert model.config.use_cache is False
    assert not model.is_activation_checkpointing


def test_hub_kernels_run_only_when_asked(folder):
    script = (
        "import sys, posttrain; from transformers import AutoModelForCausalLM;"
        "print(AutoModelForCausalLM.from_pretrained(sys.argv[1]).use_kernels)"
    )
    env = {k: v for k, v in os.environ.items() if k != "USE_HUB_KERNELS"}
    for asked, want in ((None, "False"), ("YES", "True")):
        extra = {} if asked is None else {"USE_HUB_KERNELS": asked}
        out = subprocess.run([sys.executable, "-c", script, str(folder)], env={**env, **extra},
                             capture_output=True, text=True, check=True)  # fmt: skip
        assert out.stdout.split()[-1] == want


def test_explicit_dtype_is_honoured(folder):
    cfg = config(folder, dtype="bfloat16", attn_implementation="eager")
    model = load_model(cfg, load_tokenizer(cfg))
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"


def test_hub_arguments_are_passed(folder, monkeypatch):
    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(name, **kwargs):
        seen.update(kwargs)
        return real(name, **{k: v for k, v in kwargs.items() if k != "revision"})

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    cfg = config(folder, offline=True, revision="v1")
    load_model(cfg, tiny_tokenizer())
    assert seen["trust_remote_code"] is False and seen["local_files_only"] is True
    assert seen["revision"] == "v1"
    seen.clear()
    load_model(config(folder), tiny_tokenizer())
    assert "revision" not in seen


def test_new_tokens_grow_embeddings_to_the_mean_row(folder):
    cfg = config(folder, new_tokens=["<think>", "</think>"])
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    base = AutoModelForCausalLM.from_pretrained(folder)
    rows = base.get_input_embeddings().weight.shape[0]
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == rows + 2
    assert model.config.vocab_size == len(tok)
    for ours, theirs in [
        (model.get_input_embeddings(), base.get_input_embeddings()),
        (model.get_output_embeddings(), base.get_output_embeddings()),
    ]:
        torch.testing.assert_close(ours.weight[:rows], theirs.weight)
        mean = theirs.weight.mean(0)
        torch.testing.assert_close(ours.weight[rows:], mean.expand(2, -1))


def test_no_resize_when_the_embeddings_are_already_big_enough(folder):
    cfg = config(folder)
    model = load_model(cfg, load_tokenizer(cfg))
    assert model.get_input_embeddings().weight.shape[0] == 400


def test_gradient_checkpointing_lets_a_frozen_base_backprop(folder):
    cfg = config(folder, gradient_checkpointing=True)
    model = load_model(cfg, load_tokenizer(cfg))
    assert model.is_activation_checkpointing
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)
    out = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.sum()
    out.backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None


def test_qlora_loads_nf4_on_cpu(folder):
    cfg = config(folder, adapter="qlora")
    model = load_model(cfg, load_tokenizer(cfg))
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit"
    assert layer.weight.quant_type == "nf4" and layer.weight.compress_statistics  # double quant
    assert model.config.quantization_config.bnb_4bit_compute_dtype == model.dtype
    assert type(model.lm_head) is torch.nn.Linear  # the head stays in full precision


def test_qlora_without_bitsandbytes_says_how_to_install(folder, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        load.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name, *a),
    )
    cfg = config(folder, adapter="qlora")
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        load_model(cfg, tiny_tokenizer())


@pytest.mark.parametrize("attention", ["bogus", "flash_attention_2"])
def test_unusable_attention_names_the_key(folder, attention):
    if attention == "flash_attention_2" and cuda:
        pytest.skip("flash-attention may be installed on CUDA machines")
    with pytest.raises(UserError, match=f"^attn_implementation: '{attention}'"):
        load_model(config(folder, attn_implementation=attention), tiny_tokenizer())


def test_an_adapter_run_as_model_loads_merged_into_its_base(folder, tmp_path, monkeypatch):
    """`model=RUN` of a LoRA run (e.g. DPO from SFT) starts from base + adapter, merged."""
    from peft import LoraConfig, get_peft_model

    from posttrain.modeling.inference import load_for_inference

    torch.manual_seed(0)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(folder),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    run = tmp_path / "run"
    peft_model.save_pretrained(run / "final")
    load_tokenizer(config(folder)).save_pretrained(run / "final")
    cfg = config(str(run))
    model = load_model(cfg, load_tokenizer(cfg))
    ids = torch.tensor([[5, 9, 17, 3]])
    expected = peft_model.eval()(input_ids=ids).logits
    assert torch.allclose(model.eval()(input_ids=ids).logits, expected, atol=1e-5)
    reference, _ = load_for_inference(str(run))
    assert torch.allclose(reference(input_ids=ids).logits, expected, atol=1e-5)
    with pytest.raises(UserError, match="adapter"):
        load_model(config(str(run), adapter="qlora"), load_tokenizer(cfg))

    # a second adapter trained on the merged model records that run as its base: chains load
    second = get_peft_model(
        model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    second.save_pretrained(tmp_path / "run2" / "final")
    load_tokenizer(cfg).save_pretrained(tmp_path / "run2" / "final")
    assert load.model_folder(str(tmp_path / "run2"))[1] == str(run / "final")
    monkeypatch.chdir(tmp_path)  # a relative path comes back absolute: bases load from anywhere
    assert load.model_folder("run2")[0] == str((tmp_path / "run2" / "final").resolve())
    chained, _ = load_for_inference(str(tmp_path / "run2"))
    assert torch.allclose(
        chained(input_ids=ids).logits, second.eval()(input_ids=ids).logits, atol=1e-5
    )
    from transformers import AutoModelForSequenceClassification  # a reward model from an SFT run

    scorer = load_model(cfg, load_tokenizer(cfg), AutoModelForSequenceClassification)
    assert torch.equal(
        scorer.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight
    )
