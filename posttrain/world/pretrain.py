"""`posttrain world pretrain`: train the tiny world's base model from scratch.

Steps: train the tokenizer on a corpus sample, write the corpus as plain-text JSONL, save a
randomly initialised Llama-architecture model, then run the ordinary SFT trainer on it
(`adapter=full`, `format=text`, packing at 512 tokens), so pretraining is just the one
training loop on documents. The result is a normal model folder (weights, config,
tokenizer, chat template) plus `pretrain.json` with params, tokens seen, time and loss.

The package ships the result in `posttrain/world/base/` (fp16 weights, about 2 MB), so the
demo and the tests never pretrain; `posttrain world pretrain output_dir=posttrain/world/base`
rebuilds it (about 10 minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.config import build_config, check, opt
from posttrain.errors import UserError
from posttrain.io import atomic_dir, write_json
from posttrain.world.datasets import write_corpus
from posttrain.world.tokenizer import build_tokenizer

BASE_DIR = Path(__file__).parent / "base"


@dataclass
class PretrainConfig:
    """`posttrain world pretrain`: size, data and schedule of the base model."""

    output_dir: str = opt(
        "world-base", "folder for the base model (must not exist unless overwrite)"
    )
    overwrite: bool = opt(False, "replace output_dir if it exists")
    seed: int = opt(0, "corpus, tokenizer and init seed")
    tokens: int = opt(5_500_000, "pretraining tokens (one pass over a corpus this size)")
    hidden: int = opt(128, "hidden size")
    layers: int = opt(4, "transformer blocks")
    heads: int = opt(2, "attention heads (head dim = hidden / heads)")
    context: int = opt(512, "context length (packed rows and max_position_embeddings)")
    batch_size: int = opt(8, "packed rows per step")
    lr: float = opt(2e-3, "peak learning rate (cosine, 3% warm-up)")
    work_dir: str = opt("", "keep the corpus and training run here (default: a temp folder)")

    def validate(self) -> None:
        check(self.tokens > 0, "tokens", "must be > 0")
        check(
            min(self.hidden, self.layers, self.heads, self.batch_size) > 0,
            "hidden",
            "hidden, layers, heads and batch_size must be > 0",
        )
        check(self.hidden % self.heads == 0, "heads", f"must divide hidden ({self.hidden})")
        check(self.context >= 16, "context", "must be at least 16 tokens")


def init_model(cfg: PretrainConfig, tokenizer, path: Path) -> int:
    """Save a randomly initialised Llama model with the tokenizer; returns its parameter count."""
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=cfg.hidden * 3,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.context,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def train_config(cfg: PretrainConfig, init: Path, corpus: dict, run: Path) -> dict:
    return {
        "model": str(init),
        "data": {
            "train": str(corpus["corpus_train"]),
            "eval": str(corpus["corpus_valid"]),
            "format": "text",
        },
        "output_dir": str(run),
        "adapter": "full",
        "packing": True,
        "max_length": cfg.context,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "weight_decay": 0.1,
        "warmup": 0.03,
        "seed": cfg.seed,
        "log_every": 25,
        "save_every": 200,
        "dtype": "float32",
        "offline": True,
    }


def pretrain(cfg: PretrainConfig | dict) -> dict:
    """Build the tokenizer, corpus and model, train, and write the base model folder."""
    from posttrain.train.sft import sft

    cfg = build_config(PretrainConfig, cfg)
    out = Path(cfg.output_dir)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"output_dir {out} exists; pass overwrite=true to replace it")
    work = Path(cfg.work_dir or tempfile.mkdtemp(prefix="posttrain-pretrain-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(work / "init", seed=cfg.seed)
    params = init_model(cfg, tokenizer, work / "init")
    corpus = write_corpus(work, seed=cfg.seed, n_tokens=cfg.tokens)
    print(f"pretraining {params} parameters on {corpus['corpus_train']}", file=sys.stderr)
    start = time.time()
    metrics = sft(train_config(cfg, work / "init", corpus, work / "run"))
    tokens = count_tokens(tokenizer, corpus["corpus_train"])
    report = summary(params, tokens, metrics, time.time() - start, work / "run")
    save_base(work / "run" / "final", out, report)
    if not cfg.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return report


def count_tokens(tokenizer, path: Path) -> int:
    """Tokens in a text JSONL file (one pass = the tokens pretraining sees), EOS included."""
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line]
    return sum(len(ids) + 1 for ids in tokenizer(texts)["input_ids"])


def summary(params: int, tokens: int, metrics: dict, seconds: float, run: Path) -> dict:
    """Params, tokens seen, wall time and final train/held-out loss of the pretraining run."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    train_losses = [x["loss"] for x in lines if "loss" in x]
    return {
        "params": params,
        "tokens_seen": tokens,
        "seconds": round(seconds, 1),
        "final_train_loss": train_losses[-1] if train_losses else None,
        "final_eval_loss": metrics.get("eval_loss"),
    }


def save_base(final: Path, out: Path, report: dict) -> None:
    """Copy the trained model to `out` with fp16 weights (small enough to ship)."""
    model = LlamaForCausalLM.from_pretrained(final, dtype=torch.float32)
    with atomic_dir(out) as tmp:
        model.to(torch.float16).save_pretrained(tmp)
        for name in final.iterdir():
            if name.name.startswith(("tokenizer", "chat_template", "special_tokens")):
                shutil.copy(name, tmp / name.name)
        write_json(tmp / "pretrain.json", report)


def main(argv: list[str]) -> None:
    from posttrain.config import load_config

    if "-h" in argv or "--help" in argv:
        from posttrain.config import help_text

        print(help_text(PretrainConfig, "world pretrain"))
        return
    cfg = load_config(PretrainConfig, None, argv)
    print(json.dumps(pretrain(cfg), indent=2))
