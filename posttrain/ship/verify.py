"""Read an exported GGUF back and compare its next-token predictions with the source model.

Two readers: transformers' GGUF loader (always; it needs the `gguf` package) and llama.cpp
through `llama-cpp-python` when it is importable. Each gets the same few prompts (chat-templated
when the tokenizer has a template) as token ids from the source tokenizer, so weights are compared
on equal inputs; separately, the GGUF's own tokenizer must produce the same ids. The report gives
the max absolute logit difference over every prompt position, top-1 agreement, and (llama.cpp)
whether a greedy reply to the first prompt matches transformers token for token.

F32 and F16 exports must agree within a tolerance relative to the logit scale, or
`VerificationError` is raised; quantised exports (Q8_0, K-quants) are reported, not judged.

Simplified on purpose: a handful of short prompts on CPU in fp32, not a perplexity benchmark.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

PROMPTS = (
    "Translate cheese from English to French.",
    "What is 12 plus 30?",
    "Write one short sentence about the sea.",
)
# allowed max |logit difference| as a fraction of max(1, max |logit|), per exported weight type
TOLERANCE = {"f32": 1e-3, "f16": 2e-2}
GREEDY_TOKENS = 16


class VerificationError(RuntimeError):
    """The exported file does not reproduce the source model (a converter bug: report it)."""


def prompt_texts(tokenizer) -> list[str]:
    if not tokenizer.chat_template:
        return list(PROMPTS)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in PROMPTS
    ]


def encode(tokenizer, text: str) -> list[int]:
    """Ids as the model sees them: templated text carries its own special tokens."""
    return tokenizer(text, add_special_tokens=not tokenizer.chat_template)["input_ids"]


@torch.inference_mode()
def hf_logits(model, ids: list[int]) -> np.ndarray:
    """(T, V) fp32 logits for every position of one sequence."""
    device = next(model.parameters()).device
    out = model(torch.tensor([ids], device=device)).logits[0]
    return out.float().cpu().numpy()


def compare(reference: list[np.ndarray], other: list[np.ndarray]) -> dict:
    """Max |difference|, the logit scale and top-1 agreement over all positions of all prompts."""
    diffs = [np.abs(a - b[:, : a.shape[1]]).max() for a, b in zip(reference, other)]
    agree = np.concatenate(
        [a.argmax(-1) == b[:, : a.shape[1]].argmax(-1) for a, b in zip(reference, other)]
    )
    return {
        "max_logit_diff": float(max(diffs)),
        "logit_scale": float(max(np.abs(a).max() for a in reference)),
        "top1_agreement": float(agree.mean()),
        "positions": int(agree.size),
    }


@torch.inference_mode()
def hf_greedy(model, ids: list[int], stop_ids: list[int], n: int = GREEDY_TOKENS) -> list[int]:
    out = []
    for _ in range(n):
        token = int(hf_logits(model, ids + out)[-1].argmax())
        out.append(token)
        if token in stop_ids:
            break
    return out


# ----------------------------------------------------------------------------- readers


Texts = list[tuple[str, list[int]]]  # (prompt text, its ids without added bos/eos)


def check_transformers(gguf_path: Path, texts: Texts, ids: list[list[int]], reference) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    result = compare(reference, [hf_logits(model.eval(), seq) for seq in ids])
    result["tokenization_match"] = all(
        tokenizer(t, add_special_tokens=False)["input_ids"] == plain for t, plain in texts
    )
    return result


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def open_llama_cpp(gguf_path: Path, n_ctx: int = 512):
    from llama_cpp import Llama

    return Llama(
        model_path=str(gguf_path), n_ctx=n_ctx, logits_all=True, n_threads=1, verbose=False
    )


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_cpp_greedy(llm, ids: list[int], stop_ids: list[int], n: int = GREEDY_TOKENS) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        if token in stop_ids:
            break
        llm.eval([token])
    return out


def check_llama_cpp(
    gguf_path: Path, texts: Texts, ids: list[list[int]], reference, source_model, stop_ids
) -> dict:
    llm = open_llama_cpp(gguf_path, n_ctx=max(len(s) for s in ids) + GREEDY_TOKENS + 8)
    result = compare(reference, [llama_cpp_logits(llm, seq) for seq in ids])
    result["tokenization_match"] = all(
        llm.tokenize(t.encode(), add_bos=False, special=True) == plain for t, plain in texts
    )
    ours = hf_greedy(source_model, ids[0], stop_ids)
    theirs = llama_cpp_greedy(llm, ids[0], stop_ids)
    result["greedy_match"] = ours == theirs
    if hasattr(llm, "close"):
        llm.close()
    return result


# ----------------------------------------------------------------------------- verdict


def tokenization_warning(reader: str, result: dict) -> str | None:
    """A warning (not a failure: the weights are fine) when the file's tokenizer splits text
    differently, which happens when the source pre-tokenizer is not one llama.cpp knows."""
    if result["tokenization_match"]:
        return None
    return (
        f"{reader}: the GGUF's tokenizer splits the prompts differently from the source "
        "tokenizer (its pre-tokenizer regex is not one llama.cpp knows), so text sent to "
        "llama.cpp/Ollama is tokenized differently than in training"
    )


def judge(reader: str, result: dict, quant: str) -> None:
    """Raise VerificationError when F32/F16 logits are further off than the tolerance."""
    tolerance = TOLERANCE.get(quant)
    if tolerance is None:
        return
    allowed = tolerance * max(1.0, result["logit_scale"])
    if result["max_logit_diff"] > allowed:
        raise VerificationError(
            f"{reader}: {quant} export differs from the source model by "
            f"{result['max_logit_diff']:.3g} in the logits (allowed {allowed:.3g})"
        )


def verify_gguf(model, tokenizer, gguf_path: str | Path, quant: str, stop_ids=()) -> dict:
    """Compare `gguf_path` with the source `model` through every available reader."""
    gguf_path = Path(gguf_path)
    prompts = prompt_texts(tokenizer)
    ids = [encode(tokenizer, t) for t in prompts]
    # (text, ids without added bos/eos): what each reader's own tokenizer must reproduce
    texts = [(t, tokenizer(t, add_special_tokens=False)["input_ids"]) for t in prompts]
    reference = [hf_logits(model, seq) for seq in ids]
    report = {"prompts": len(prompts), "quant": quant}
    report["transformers"] = check_transformers(gguf_path, texts, ids, reference)
    if llama_cpp_available():
        report["llama_cpp"] = check_llama_cpp(
            gguf_path, texts, ids, reference, model, list(stop_ids)
        )
    else:
        report["llama_cpp"] = "skipped: llama-cpp-python is not installed"
    readers = [(r, report[r]) for r in ("transformers", "llama_cpp") if isinstance(report[r], dict)]
    for reader, result in readers:
        judge(reader, result, quant)
    warnings = [tokenization_warning(reader, result) for reader, result in readers]
    report["warnings"] = [w for w in warnings if w]
    return report
