"""Supervised fine-tuning: `posttrain sft` and `posttrain.sft(cfg)`.

The method is one loss: cross-entropy on the trained tokens (assistant turns, completions,
or every token of plain text), computed from the final hidden states in chunks so the
(batch, seq, vocab) logits never exist (`posttrain.losses.lm`). Everything else (batching,
accumulation, checkpoints) is the shared loop's.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial

import torch

from posttrain.config import TrainConfig, build_config
from posttrain.data.batching import collate, plan_batches
from posttrain.data.load import load_rows
from posttrain.data.tokenize import tokenize_sft
from posttrain.losses.lm import lm_loss
from posttrain.modeling.adapters import load_trainable_state, save_model, trainable_state
from posttrain.modeling.load import attention_of
from posttrain.train import dist
from posttrain.train.loop import Job
from posttrain.train.run import begin_run, load_splits, load_trainable_model, run_job


@dataclass
class SFTConfig(TrainConfig):
    """`posttrain sft`: the shared training keys; SFT adds none of its own."""


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    loss, _ = lm_loss(model, batch)
    return loss, {}


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["targets"] != -100).sum())


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real tokens in the batch (packed rows count their short tail of padding)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def tokenize_source(source: str, split: str, tokenizer, cfg: SFTConfig, label: str):
    rows = load_rows(source, split=split)
    examples, stats = tokenize_sft(rows, tokenizer, cfg.max_length, fmt=cfg.data.format)
    if dist.is_main():
        print(
            f"{label}: {stats['examples']} examples, {stats['tokens']} tokens "
            f"({stats['target_tokens']} trained); truncated to max_length={cfg.max_length}: "
            f"{stats['truncated']}; dropped with no trained token: {stats['dropped_no_target']}",
            file=sys.stderr,
        )
    return examples


def sft_job(cfg: SFTConfig, model, tokenizer, train, evals) -> Job:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lengths = [len(e["input_ids"]) for e in train]

    def plan(epoch: int):
        return plan_batches(lengths, cfg.batch_size, cfg.max_length, cfg.packing, cfg.seed, epoch)

    # flash-attention keeps packed examples apart only in one padding-free row (batching.py)
    flat = cfg.packing and attention_of(model) == "flash_attention_2"
    eval_lengths = [len(e["input_ids"]) for e in evals]
    eval_specs = plan_batches(
        eval_lengths, cfg.batch_size, cfg.max_length, cfg.packing, cfg.seed, 0
    )
    return Job(
        model=model,
        plan=plan,
        collate=partial(collate, train, pad_id=pad, flat=flat),
        loss=sft_loss,
        units=count_targets,
        tokens=count_tokens,
        save_final=lambda m, path: save_model(m, tokenizer, path),
        eval_specs=eval_specs if evals else None,
        eval_collate=partial(collate, evals, pad_id=pad, flat=flat),
        trainable=trainable_state,
        load_trainable=load_trainable_state,
    )


def sft(cfg: SFTConfig | dict) -> dict[str, float]:
    """Fine-tune `cfg.model` on `cfg.data.train`; returns the last metrics. Writes `output_dir`."""
    cfg = build_config(SFTConfig, cfg)
    device, tokenizer = begin_run(cfg)
    train, evals = load_splits(
        cfg, lambda source, split, label: tokenize_source(source, split, tokenizer, cfg, label)
    )
    model = load_trainable_model(cfg, tokenizer, device)
    return run_job(sft_job(cfg, model, tokenizer, train, evals), cfg, device)
