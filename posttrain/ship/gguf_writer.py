"""Write a Hugging Face causal LM and its tokenizer as one GGUF file (llama.cpp / Ollama).

Our own converter on the `gguf` package: hyper-parameters under llama.cpp's keys, tensor names
from gguf's tensor name map, the Q/K row permutation llama.cpp's rotary kernel expects for the
Llama family (Llama, Mistral; Qwen2/Qwen3 use the HF layout as is), byte-level BPE tokenizer
metadata (tokens, token types normal/control/user-defined/unused, merges, pre-tokenizer name,
bos/eos/pad/eot ids, the chat template), in F32, F16 or Q8_0 (`gguf.quants`).

Simplified on purpose: one file (no split GGUF), dense decoder-only models only, byte-level
BPE tokenizers only (SentencePiece vocabularies are refused), rope scaling `default`/`linear`
only, and Mistral's sliding window is dropped as llama.cpp's own converter does. A
pre-tokenizer regex llama.cpp does not know (such as the tiny world's) is written as
`default`, where llama.cpp's converter refuses; verification then warns that text is split
differently (the weights themselves are still checked on the source tokenizer's ids).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from posttrain.errors import UserError


@dataclass(frozen=True)
class Family:
    arch: gguf.MODEL_ARCH  # llama.cpp architecture the file declares
    permute_qk: bool  # llama.cpp's Llama graph wants Q/K rows in its rotary order


FAMILIES = {
    "llama": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": Family(gguf.MODEL_ARCH.QWEN2, permute_qk=False),
    "qwen3": Family(gguf.MODEL_ARCH.QWEN3, permute_qk=False),
}
QUANTS = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
# end-of-turn markers of common chat templates; llama.cpp also stops on these
TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
# pre-tokenizer split regexes of known vocabularies -> llama.cpp's `tokenizer.ggml.pre` name
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KNOWN_SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}


# ----------------------------------------------------------------------------- checks


def check_supported(config) -> Family:
    """The family of `config`, or a UserError naming its architecture and the supported ones."""
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise UserError(
            f"GGUF export does not support architecture {config.model_type!r}; "
            f"supported: {', '.join(FAMILIES)}"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise UserError(
            f"GGUF export supports rope_type default and linear, got {rope['rope_type']!r}"
        )
    return family


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# ----------------------------------------------------------------------------- tensors


def permute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half row order -> llama.cpp's interleaved pairs, per head (as convert_hf_to_gguf)."""
    half = weight.shape[0] // n_head // 2
    out = weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2)
    return out.reshape(weight.shape)


def tensor_type(name: str, array: np.ndarray, quant: str) -> gguf.GGMLQuantizationType:
    """Norms and biases stay F32; Q8_0 needs rows divisible by its 32-value block (else F16)."""
    wanted = QUANTS[quant][1]
    if array.ndim < 2:
        return gguf.GGMLQuantizationType.F32
    if wanted == gguf.GGMLQuantizationType.Q8_0 and array.shape[-1] % 32:
        return gguf.GGMLQuantizationType.F16
    return wanted


def encode_tensor(array: np.ndarray, ggml_type: gguf.GGMLQuantizationType) -> np.ndarray:
    if ggml_type == gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32)
    if ggml_type == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array.astype(np.float32), ggml_type)


def gguf_tensors(model, family: Family, quant: str):
    """(gguf name, encoded array, ggml type) for every weight, Q/K rows permuted when needed."""
    config = model.config
    name_map = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"tensor {hf_name} has no GGUF name for {config.model_type}")
        array = tensor.detach().to(torch.float32).cpu().numpy()
        if family.permute_qk and ".attn_q." in name:
            array = permute_rows(array, config.num_attention_heads)
        elif family.permute_qk and ".attn_k." in name:
            array = permute_rows(array, config.num_key_value_heads)
        ggml_type = tensor_type(name, array, quant)
        yield name, encode_tensor(array, ggml_type), ggml_type


# ----------------------------------------------------------------------------- metadata


def add_hparams(writer: gguf.GGUFWriter, config, quant: str, name: str) -> None:
    writer.add_name(name)
    writer.add_file_type(QUANTS[quant][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("GGUF export needs a fast tokenizer (tokenizer.json)")
    return json.loads(backend.to_str())


def check_byte_level(tok_json: dict) -> None:
    model = tok_json.get("model", {})
    decoder = tok_json.get("decoder") or {}
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or decoder.get("type") != "ByteLevel"
    ):
        raise UserError(
            "GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2 style); "
            f"this one is {model.get('type')} with a {decoder.get('type')} decoder"
        )


def pre_tokenizer_name(tok_json: dict) -> str:
    """llama.cpp's name for how text is split before BPE (`gpt-2` for plain ByteLevel)."""
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    for part in parts:
        if part.get("type") == "Split":
            return KNOWN_SPLITS.get(part.get("pattern", {}).get("Regex", ""), "default")
    if any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts):
        return "gpt-2"
    return "default"


def merges_of(tok_json: dict) -> list[str]:
    """Merges as 'a b' strings; a space inside a part is written as U+0120 like llama.cpp."""
    merges = tok_json["model"].get("merges") or []
    if merges and isinstance(merges[0], list):
        return [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]
    return list(merges)


def is_control(token) -> bool:
    """Special added tokens, and `<|...|>` ones some repos forget to mark (as llama.cpp does)."""
    text = token.content
    return token.special or (text.startswith("<|") and text.endswith("|>"))


def vocab_entries(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and types for ids 0..vocab_size-1 (embedding rows beyond the tokenizer
    become unused `[PAD{i}]` tokens, as in llama.cpp's converter)."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise UserError(f"tokenizer has id {max(by_id)} but the model's vocab_size is {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(
                gguf.TokenType.CONTROL if is_control(added[i]) else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def stop_tokens(tokenizer, eos_ids: list[int] | None = None) -> list[str]:
    """Tokens that end a reply: eos, the generation config's eos ids, and the chat template's
    end-of-turn marker(s) present in the vocabulary."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids += [i for i in eos_ids or [] if i not in ids]
    names = [tokenizer.convert_ids_to_tokens(i) for i in ids]
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    vocab = tokenizer.get_vocab()
    names += [t for t in TURN_END_TOKENS if t in vocab and t in template and t not in names]
    return names


def adds_token(tokenizer, token_id: int | None, first: bool) -> bool:
    if token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0 if first else -1] == token_id


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, eos_ids: list[int]) -> None:
    tok_json = tokenizer_json(tokenizer)
    check_byte_level(tok_json)
    tokens, types = vocab_entries(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tok_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges_of(tok_json))
    vocab = tokenizer.get_vocab()
    stops = [vocab[t] for t in stop_tokens(tokenizer, eos_ids)]
    if stops:
        writer.add_eos_token_id(stops[0])
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    turn_end = [i for i in stops[1:] if tokens[i] in template]  # the template's end of turn
    if turn_end:
        writer.add_eot_token_id(turn_end[0])
    for kind in ("bos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(adds_token(tokenizer, tokenizer.bos_token_id, first=True))
    writer.add_add_eos_token(adds_token(tokenizer, tokenizer.eos_token_id, first=False))
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


# ----------------------------------------------------------------------------- writing


def write_gguf(
    model, tokenizer, path: str | Path, quant: str = "f16", name: str = "model", eos_ids=None
) -> Path:
    """Write `model` + `tokenizer` to one GGUF file at `path` in F32, F16 or Q8_0."""
    if quant not in QUANTS:
        raise UserError(f"quant must be one of {', '.join(QUANTS)} here, got {quant!r}")
    family = check_supported(model.config)
    path = Path(path)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[family.arch])
    add_hparams(writer, model.config, quant, name)
    add_tokenizer(writer, tokenizer, model.config.vocab_size, list(eos_ids or []))
    for name_, data, ggml_type in gguf_tensors(model, family, quant):
        raw = (
            None
            if ggml_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            else ggml_type
        )
        writer.add_tensor(name_, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
