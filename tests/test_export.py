"""Export: GGUF round trips per family and weight type, safetensors, Ollama, bad input, llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from posttrain.errors import UserError
from posttrain.ship import export, gguf_writer, ollama, verify
from tests.tiny import save_tiny, tiny_model, tiny_tokenizer

WORLD_BASE = Path(__file__).resolve().parents[1] / "posttrain" / "world" / "base"
PROMPT = "Translate cheese from English to French, please!"


def family_model(family: str, vocab_size: int):
    if family != "qwen3":
        model = tiny_model(family, vocab_size=vocab_size)
    else:  # transformers' GGUF reader assumes Qwen3's head_dim of 128 (it ignores key_length)
        torch.manual_seed(0)
        config = AutoConfig.for_model(
            "qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=128,
            max_position_embeddings=256, vocab_size=vocab_size, tie_word_embeddings=True,
        )  # fmt: skip
        model = AutoModelForCausalLM.from_config(config).float()
    for name, param in model.named_parameters():  # Qwen2's q/k/v biases must survive too
        if name.endswith("bias"):
            torch.nn.init.normal_(param, std=0.5)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_gguf_round_trip_through_transformers(tmp_path, family):
    tok = tiny_tokenizer("chatml")
    model = family_model(family, len(tok))
    text = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text)["input_ids"]
    source = logits(model, ids)
    for quant in ("f32", "f16", "q8_0"):
        path = gguf_writer.write_gguf(model, tok, tmp_path / f"{quant}.gguf", quant)
        back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
        diff = (logits(back, ids) - source).abs().max().item()
        top1 = (logits(back, ids).argmax(-1) == source.argmax(-1)).float().mean().item()
        if quant == "f32":
            assert diff < 1e-4, (family, quant, diff)
        elif quant == "f16":
            assert diff < 1e-2, (family, quant, diff)
        else:
            assert top1 >= 0.9 and diff < 0.1, (family, quant, top1, diff)
    read_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="f32.gguf")
    assert read_tok(text, add_special_tokens=False)["input_ids"] == ids


def test_gguf_metadata_has_token_types_special_ids_and_template(tmp_path):
    tok = tiny_tokenizer("chatml")
    tok.add_tokens(["<think>"])  # a user-defined (not special) added token
    model = tiny_model("llama", vocab_size=len(tok) + 3)  # 3 padded embedding rows
    path = gguf_writer.write_gguf(model, tok, tmp_path / "m.gguf", "f16")
    reader = gguf.GGUFReader(path)

    def field(key):
        return reader.fields[key].contents()

    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    vocab = tok.get_vocab()
    assert len(tokens) == len(tok) + 3
    assert types[vocab["<|im_end|>"]] == gguf.TokenType.CONTROL
    assert types[vocab["<think>"]] == gguf.TokenType.USER_DEFINED
    assert types[vocab["Ġthe"]] == gguf.TokenType.NORMAL
    assert types[-1] == gguf.TokenType.UNUSED and tokens[-1] == f"[PAD{len(tok) + 2}]"
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.eos_token_id") == vocab["<|im_end|>"]
    assert field("tokenizer.ggml.padding_token_id") == vocab["<|pad|>"]
    assert field("tokenizer.chat_template") == tok.chat_template
    assert len(field("tokenizer.ggml.merges")) > 100
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "blk.1.attn_q.weight"} <= names


def test_qk_permutation_matches_llama_cpp_layout():
    # one head of dim 4: HF rotates halves (0,2),(1,3); llama.cpp wants pairs adjacent
    rows = np.arange(4, dtype=np.float32).reshape(4, 1)
    assert gguf_writer.permute_rows(rows, n_head=1)[:, 0].tolist() == [0, 2, 1, 3]
    two_heads = np.arange(8, dtype=np.float32).reshape(8, 1)
    assert gguf_writer.permute_rows(two_heads, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def rope_hf(q: np.ndarray, pos: int, base: float = 10000.0) -> np.ndarray:
    """transformers' rotate-half rotary embedding of one head vector (dims i and i + d/2)."""
    half = q.shape[0] // 2
    angle = pos * base ** (-np.arange(half) / half)
    first, second = q[:half], q[half:]
    return np.concatenate(
        [
            first * np.cos(angle) - second * np.sin(angle),
            second * np.cos(angle) + first * np.sin(angle),
        ]
    )


def rope_llama_cpp(q: np.ndarray, pos: int, base: float = 10000.0) -> np.ndarray:
    """llama.cpp's LLAMA_ROPE_TYPE_NORM: adjacent pairs (2i, 2i+1) rotated by the same angles."""
    half = q.shape[0] // 2
    angle = pos * base ** (-np.arange(half) / half)
    even, odd = q[0::2], q[1::2]
    out = np.empty_like(q)
    out[0::2] = even * np.cos(angle) - odd * np.sin(angle)
    out[1::2] = even * np.sin(angle) + odd * np.cos(angle)
    return out


def test_permuted_rows_under_llama_cpp_rope_give_the_same_attention_scores():
    rng = np.random.default_rng(0)
    n_head, head_dim, hidden = 2, 8, 16
    wq, wk = rng.normal(size=(2, n_head * head_dim, hidden))
    x_q, x_k = rng.normal(size=(2, hidden))
    for head in range(n_head):
        rows = slice(head * head_dim, (head + 1) * head_dim)
        hf = rope_hf((wq @ x_q)[rows], 5) @ rope_hf((wk @ x_k)[rows], 2)
        pq, pk = gguf_writer.permute_rows(wq, n_head), gguf_writer.permute_rows(wk, n_head)
        ours = rope_llama_cpp((pq @ x_q)[rows], 5) @ rope_llama_cpp((pk @ x_k)[rows], 2)
        assert abs(hf - ours) < 1e-9
        unpermuted = rope_llama_cpp((wq @ x_q)[rows], 5) @ rope_llama_cpp((wk @ x_k)[rows], 2)
        assert abs(hf - unpermuted) > 1e-3  # the permutation is what makes them agree


def test_verification_catches_a_missing_permutation(tmp_path, monkeypatch):
    tok = tiny_tokenizer("chatml")
    model = tiny_model("llama", vocab_size=len(tok)).eval()
    monkeypatch.setattr(gguf_writer, "permute_rows", lambda weight, n_head: weight)
    path = gguf_writer.write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    with pytest.raises(verify.VerificationError, match="differs from the source"):
        verify.verify_gguf(model, tok, path, "f32")


def test_export_cli_gguf_writes_report_and_verifies(tmp_path):
    src = save_tiny(tmp_path / "src", "qwen2")
    out = tmp_path / "out"
    export.main([src, "format=gguf", "quant=f16", f"output_dir={out}"])
    report = json.loads((out / "export.json").read_text())
    assert (out / report["file"]).is_file() and report["file"].endswith("-F16.gguf")
    check = report["verification"]["transformers"]
    assert check["tokenization_match"] and check["top1_agreement"] == 1.0
    assert check["max_logit_diff"] < 1e-2


def test_adapter_is_merged_before_export(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = save_tiny(tmp_path / "base", "llama")
    tok = AutoTokenizer.from_pretrained(base)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    tuned = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)
    tuned.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    merged = tuned.merge_and_unload().eval()
    out = tmp_path / "out"
    export.main([str(tmp_path / "adapter"), "quant=f32", f"output_dir={out}"])
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file="adapter-F32.gguf").eval()
    ids = tok(PROMPT)["input_ids"]
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    assert (logits(back, ids) - logits(merged, ids)).abs().max() < 1e-4
    assert (logits(back, ids) - logits(plain, ids)).abs().max() > 1e-3


def test_safetensors_export_loads_and_has_eos_ids(tmp_path):
    src = save_tiny(tmp_path / "src", "llama", template="llama3")
    out = tmp_path / "out"
    export.main([src, "format=safetensors", "dtype=float16", "max_shard_size=100KB",
                 f"output_dir={out}"])  # fmt: skip
    assert (out / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float16
    tok = AutoTokenizer.from_pretrained(out)
    generation = json.loads((out / "generation_config.json").read_text())
    # the tokenizer's eos first, then the eos the model config declares (LlamaConfig's 2)
    assert generation["eos_token_id"] == [tok.convert_tokens_to_ids("<|eot_id|>"), 2]
    assert tok.chat_template == tiny_tokenizer("llama3").chat_template


def test_ollama_modelfile_for_chatml(tmp_path):
    src = save_tiny(tmp_path / "src", "llama")
    out = tmp_path / "out"
    export.main([src, "format=ollama", "quant=q8_0", f"output_dir={out}", "verify=false"])
    assert (out / "Modelfile").read_text() == (
        "FROM ./src-Q8_0.gguf\n\n"
        'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n'
        "{{ .Content }}<|im_end|>\n"
        '{{ end }}<|im_start|>assistant\n"""\n'
        'PARAMETER stop "<|im_end|>"\n'
    )
    assert (out / "src-Q8_0.gguf").is_file()


def test_ollama_llama3_keeps_literal_bos_and_unknown_templates_fall_back():
    llama3 = ollama.modelfile("m.gguf", tiny_tokenizer("llama3"), ["<|eot_id|>"])
    assert 'TEMPLATE """<|begin_of_text|>{{- range .Messages }}<|start_header_id|>' in llama3
    assert 'PARAMETER stop "<|eot_id|>"' in llama3
    gemma = ollama.modelfile("m.gguf", tiny_tokenizer("gemma"), ["<end_of_turn>"])
    assert "TEMPLATE" not in gemma.replace("no TEMPLATE", "") and "tokenizer.chat_template" in gemma


def test_unsupported_architecture_names_it_and_leaves_nothing(tmp_path):
    src = save_tiny(tmp_path / "src", "gpt2")
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"'gpt2'.*supported: llama, mistral, qwen2, qwen3"):
        export.main([src, "format=gguf", f"output_dir={out}"])
    assert not out.exists()


def test_failed_export_leaves_no_partial_output(tmp_path, monkeypatch):
    src = save_tiny(tmp_path / "src", "llama")
    out = tmp_path / "out"

    def broken(*args, **kwargs):
        raise verify.VerificationError("simulated disagreement")

    monkeypatch.setattr(verify, "verify_gguf", broken)
    with pytest.raises(verify.VerificationError):
        export.main([src, "format=gguf", "quant=f32", f"output_dir={out}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no out/, no temp folder
    out.mkdir()
    (out / "keep.txt").write_text("earlier export")
    with pytest.raises(verify.VerificationError):
        export.main([src, "format=gguf", "quant=f32", f"output_dir={out}"])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_k_quant_needs_llama_cpp(tmp_path):
    if verify.llama_cpp_available():
        pytest.skip("llama-cpp-python is installed; see test_world_model_through_llama_cpp")
    src = save_tiny(tmp_path / "src", "llama")
    with pytest.raises(UserError, match="pip install llama-cpp-python"):
        export.main([src, "quant=q4_k_m", f"output_dir={tmp_path / 'out'}"])


def test_world_model_through_llama_cpp(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional)")
    out = tmp_path / "out"
    export.main([str(WORLD_BASE), "format=gguf", "quant=f32", f"output_dir={out}"])
    report = json.loads((out / "export.json").read_text())["verification"]["llama_cpp"]
    assert report["greedy_match"], report
    assert report["top1_agreement"] == 1.0 and report["max_logit_diff"] < 1e-2
    export.main([str(WORLD_BASE), "quant=q4_k_m", f"output_dir={tmp_path / 'q4'}"])
    q4 = json.loads((tmp_path / "q4" / "export.json").read_text())["verification"]["llama_cpp"]
    assert q4["top1_agreement"] > 0.5
