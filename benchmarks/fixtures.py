"""What the benchmarks train on, built locally (nothing downloads): made-up words, chats and
preference pairs whose answers are functions of the questions, a byte-level BPE tokenizer trained
on them with a ChatML template, and a Llama-shaped model with random weights from a config.
"""

from __future__ import annotations

import random
from pathlib import Path

PAD, EOS = "<|pad|>", "<|im_end|>"
SPECIALS = [PAD, "<|im_start|>", EOS]

# ChatML, as posttrain renders it (the assistant mask is derived from prefix renders).
CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The same rendering with `{% generation %}` markers around what is trained (the assistant
# content and its <|im_end|>, not the newline after it), for peers that need the markers.
CHATML_GENERATION = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------- data


def make_words(n: int, seed: int = 0) -> list[str]:
    """n distinct pronounceable made-up words."""
    rng = random.Random(seed)
    onsets = [*"bcdfghjklmnprstvwz", "br", "cl", "dr", "fl", "gr", "pl", "st", "tr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "oo", "ou"]
    words: set[str] = set()
    while len(words) < n:
        syllables = rng.choice((1, 2, 2, 3))
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables)))
    return sorted(words)


def make_turn(rng: random.Random, words: list[str], max_words: int) -> tuple[str, str]:
    """A (user, assistant) pair whose answer is a function of the question."""
    k = rng.randint(2, max_words)
    items = [rng.choice(words) for _ in range(k)]
    listed = " ".join(items)
    task = rng.randrange(4)
    if task == 0:
        return f"Reverse the words: {listed}", " ".join(reversed(items))
    if task == 1:
        return f"Sort the words: {listed}", " ".join(sorted(items))
    if task == 2:
        return f"Repeat each word twice: {listed}", " ".join(w + " " + w for w in items)
    first = ", ".join(f"{i + 1}. {w}" for i, w in enumerate(items))
    return f"Number the words: {listed}", f"There are {k} words: {first}."


def make_chats(n: int, seed: int, words: list[str], max_words: int = 24) -> list[dict]:
    """n rows `{"messages": [...]}`: 1-3 turns, a system prompt on a third of them."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = []
        if rng.random() < 1 / 3:
            messages.append({"role": "system", "content": "You are a careful word assistant."})
        for _ in range(rng.choice((1, 1, 2, 3))):
            user, assistant = make_turn(rng, words, max_words)
            messages += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": assistant},
            ]
        rows.append({"messages": messages})
    return rows


def corrupt(rng: random.Random, answer: str, words: list[str]) -> str:
    """The answer with two words swapped, one dropped or one replaced (never unchanged)."""
    tokens = answer.split(" ")
    while True:
        out = list(tokens)
        kind = rng.randrange(3)
        i, j = rng.randrange(len(out)), rng.randrange(len(out))
        if kind == 0:
            out[i], out[j] = out[j], out[i]
        elif kind == 1 and len(out) > 1:
            del out[i]
        else:
            out[i] = rng.choice(words)
        if out != tokens:
            return " ".join(out)


def make_pairs(n: int, seed: int, words: list[str], max_words: int) -> list[dict]:
    """n rows {prompt: messages, chosen: [assistant], rejected: [assistant]}."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = []
        if rng.random() < 1 / 3:
            prompt.append({"role": "system", "content": "You are a careful word assistant."})
        for _ in range(rng.choice((0, 0, 1))):
            user, assistant = make_turn(rng, words, max_words)
            prompt += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": assistant},
            ]
        user, answer = make_turn(rng, words, max_words)
        prompt.append({"role": "user", "content": user})
        rejected = corrupt(rng, answer, words)
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return rows


# ----------------------------------------------------------------------------- model


def train_tokenizer(texts: list[str], vocab_size: int, template: str = CHATML):
    """A byte-level BPE trained on `texts`, eos <|im_end|>, pad <|pad|> (distinct ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    fast.chat_template = template
    return fast


def save_llama(
    path: Path,
    tokenizer,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int,
    max_positions: int,
    seed: int = 0,
) -> int:
    """Write a Llama-shaped model with random weights and `tokenizer` to `path`; returns its
    parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())
