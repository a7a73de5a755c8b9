"""Reward models: `posttrain reward` trains one, `posttrain reward score` uses one.

The model is the base LM loaded as `AutoModelForSequenceClassification` with one label: a
linear `score` head on the hidden state of each sequence's last non-pad token, so the result
loads with plain transformers (or as a peft adapter that saves the head with it).

Loss per row (`posttrain.losses.preference`): Bradley-Terry `-log sigmoid(r_w - r_l - margin)`
for pairs (margin from the row's optional `margin` field), Plackett-Luce for ranked lists (the
same thing at K=2), plus `center_coef * (r_w + r_l)^2` when set (keeps rewards near zero).
Metrics: pairwise accuracy (the best response scores highest) and the mean margin r_1 - r_2.

`readout=last+loglik` (`modeling.loglik_reward`) adds a learned weight times the response's
log-likelihood under the frozen model to the head: a last-token head cannot tell right
answers from wrong ones in the tiny world; the SFT model's likelihood can.

Simplified on purpose: no packing (each response is its own right-padded row), and the
reward is read at the last non-pad token (so a tokenizer whose pad is its eos scores the
token before a final eos).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from functools import partial

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from posttrain.config import TrainConfig, build_config, check, opt
from posttrain.data.batching import plan_batches
from posttrain.data.load import load_rows
from posttrain.data.preference import encode_responses, tokenize_ranked
from posttrain.data.tokenize import IGNORE
from posttrain.errors import UserError
from posttrain.losses.preference import bradley_terry, center_penalty, plackett_luce
from posttrain.modeling import loglik_reward
from posttrain.modeling.adapters import (
    apply_adapter,
    load_trainable_state,
    save_model,
    trainable_state,
    trainable_summary,
)
from posttrain.modeling.load import load_model, sequence_classifier
from posttrain.modeling.loglik_reward import LoglikReward
from posttrain.train import dist
from posttrain.train.loop import Job
from posttrain.train.run import begin_run, load_splits, run_job

READOUTS = ("last", "last+loglik")


@dataclass
class RewardConfig(TrainConfig):
    """`posttrain reward`: the shared training keys plus the reward-centering coefficient."""

    center_coef: float = opt(0.0, "weight of the reward-centering term (r_w + r_l)^2; 0 = off")
    readout: str = opt("last", "last: a score head on the last token; last+loglik: plus a "
                               "learned weight x the response's log-likelihood under the frozen "
                               "model (start from an SFT model; only the head trains, the adapter "
                               "key is ignored)")  # fmt: skip

    def validate(self) -> None:
        super().validate()
        check(self.readout in READOUTS, "readout", f"must be one of {', '.join(READOUTS)}")


def collate_ranked(examples: list[dict], spec: list[list[int]], pad_id: int) -> dict:
    """(B*K, T) right-padded rows (input_ids, targets, attention_mask), the K responses of each
    example together; margins (B,), and reference log-probs (B, K) when examples carry them."""
    rows = [examples[i] for group in spec for i in group]
    responses = [r for row in rows for r in row["responses"]]
    width = max(len(r["input_ids"]) for r in responses)
    ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    targets = torch.full((len(responses), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(responses), width), dtype=torch.long)
    for n, r in enumerate(responses):
        ids[n, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        targets[n, : len(r["targets"])] = torch.tensor(r["targets"])
        mask[n, : len(r["input_ids"])] = 1
    k = len(rows[0]["responses"])
    margins = torch.tensor([row["margin"] for row in rows], dtype=torch.float32)
    batch = {"input_ids": ids, "targets": targets, "attention_mask": mask, "k": torch.tensor(k)}
    batch["margin"] = margins
    if "label" in rows[0]:  # KTO: desirable or not
        batch["label"] = torch.tensor([row["label"] for row in rows], dtype=torch.bool)
    if "ref_logps" in rows[0]:
        batch["ref_logps"] = torch.tensor([row["ref_logps"] for row in rows], dtype=torch.float32)
    return batch


def rewards_of(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """(B, K) rewards, best response first."""
    if isinstance(model, LoglikReward):
        return model(batch).view(-1, int(batch["k"]))
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits.float().squeeze(-1).view(-1, int(batch["k"]))


def reward_loss(model: torch.nn.Module, batch: dict, center_coef: float = 0.0):
    rewards = rewards_of(model, batch)
    if rewards.shape[1] == 2:
        per_row = bradley_terry(rewards[:, 0], rewards[:, 1], batch["margin"])
    else:
        per_row = plackett_luce(rewards)
    if center_coef:
        per_row = per_row + center_penalty(rewards[:, 0], rewards[:, 1], center_coef)
    best_wins = (rewards[:, 0] > rewards[:, 1:].max(dim=1).values).float()
    metrics = {
        "accuracy": float(best_wins.mean().detach()),
        "margin": float((rewards[:, 0] - rewards[:, 1]).mean().detach()),
    }
    return per_row.sum(), metrics


def count_rows(batch: dict) -> int:
    return len(batch["margin"])  # one margin per example, in either collate


def count_tokens(batch: dict) -> int:
    """Real tokens of every response's full sequence (`tokens` when one row holds a pair)."""
    return int(batch["tokens"]) if "tokens" in batch else int(batch["attention_mask"].sum())


def load_examples(source: str, split: str, tokenizer, cfg: RewardConfig, label: str):
    examples, stats = tokenize_ranked(load_rows(source, split=split), tokenizer, cfg.max_length)
    if dist.is_main():
        print(
            f"{label}: {stats['examples']} rows of {stats['rows']}; dropped: "
            f"{stats['dropped_equal']} with equal responses, {stats['dropped_no_target']} with "
            f"nothing left after max_length={cfg.max_length}; truncated responses: "
            f"{stats['truncated']}",
            file=sys.stderr,
        )
    return examples


def longest_response(example: dict) -> int:
    """The row length `collate_ranked` pads an example to: its longest response."""
    return max(len(r["input_ids"]) for r in example["responses"])


def ranked_job(
    cfg: TrainConfig, model, tokenizer, train: list, evals: list, loss, layout=None
) -> Job:
    """The loop's Job for ranked-response data (reward models, the DPO family); `layout` is
    (collate, length): how examples become a batch and the row length batches are grouped by
    (`collate_ranked`, `longest_response` by default; DPO's one-row pairs use
    `data.shared_prompt`'s `collate_shared` and `row_length`)."""
    pad = tokenizer.pad_token_id
    collate, length = layout or (collate_ranked, longest_response)

    def lengths(examples):
        return [length(e) for e in examples]

    def plan(epoch: int):
        return plan_batches(lengths(train), cfg.batch_size, cfg.max_length, False, cfg.seed, epoch)

    eval_specs = plan_batches(lengths(evals), cfg.batch_size, cfg.max_length, False, cfg.seed, 0)
    return Job(
        model=model,
        plan=plan,
        collate=partial(collate, train, pad_id=pad),
        loss=loss,
        units=count_rows,
        tokens=count_tokens,
        save_final=lambda m, path: save_model(m, tokenizer, path),
        eval_specs=eval_specs if evals else None,
        eval_collate=partial(collate, evals, pad_id=pad),
        trainable=trainable_state,
        load_trainable=load_trainable_state,
    )


def load_reward_model(cfg: RewardConfig, tokenizer, device: torch.device) -> torch.nn.Module:
    """Base LM with a one-label score head, the adapter applied, the head always trained."""
    if cfg.readout == "last+loglik":
        return LoglikReward(load_model(cfg, tokenizer, AutoModelForCausalLM)).to(device)
    if cfg.adapter in ("prefix", "prompt", "trainable_tokens", "qlora"):
        raise UserError(f"adapter={cfg.adapter} is not supported for reward models")
    model = load_model(cfg, tokenizer, AutoModelForSequenceClassification).to(device)
    model = apply_adapter(model, cfg, tokenizer, task_type="SEQ_CLS")
    for name, param in model.named_parameters():
        if name.split(".")[-2:-1] == ["score"] or ".score." in name:
            param.requires_grad_(True)
    if dist.is_main():
        print(trainable_summary(model), file=sys.stderr)
    return model


def reward(cfg: RewardConfig | dict) -> dict[str, float]:
    """Train a reward model on `cfg.data.train` (pairs or ranked lists); writes `output_dir`."""
    cfg = build_config(RewardConfig, cfg)
    device, tokenizer = begin_run(cfg)
    train, evals = load_splits(
        cfg, lambda source, split, label: load_examples(source, split, tokenizer, cfg, label)
    )
    model = load_reward_model(cfg, tokenizer, device)
    loss = partial(reward_loss, center_coef=cfg.center_coef)
    job = ranked_job(cfg, model, tokenizer, train, evals, loss)
    if isinstance(model, LoglikReward):
        job.save_final = lambda m, path: loglik_reward.save(m, tokenizer, path)
    return run_job(job, cfg, device)


# ----------------------------------------------------------------------------- scoring


def check_score_head(where: str) -> None:
    """Refuse a local folder without a trained score head (a causal LM, an SFT adapter): loading
    it as a sequence classifier would score with a freshly initialised, random head."""
    if sequence_classifier(where) is False:
        raise UserError(f"{where}: not a reward model (no trained score head; it would score at "
                        "random); train one with `posttrain reward`")  # fmt: skip


def load_scorer(path: str):
    """(model, tokenizer) of a trained reward model: a full folder, an adapter, or a run (an
    adapter whose base is itself an adapter run, e.g. an SFT run, is merged down the chain)."""
    from transformers import AutoTokenizer

    from posttrain.modeling.inference import resolve_model_path
    from posttrain.modeling.load import merged_chain

    where = resolve_model_path(path)
    tokenizer = AutoTokenizer.from_pretrained(where)
    if loglik_reward.is_loglik_reward(where):
        return loglik_reward.load(where).eval(), tokenizer
    check_score_head(where)

    def load_full(name: str) -> torch.nn.Module:
        return AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=1, pad_token_id=tokenizer.pad_token_id, dtype=torch.float32
        )

    return merged_chain(where, load_full).eval(), tokenizer


@torch.no_grad()
def score(
    model, tokenizer, rows: list[dict], batch_size: int = 32, max_length: int = 2048, first: int = 1
):
    """Rewards of (prompt, completion) rows (strings or message lists), in order; errors name
    the row counting from `first`."""
    items = [(f"row {n}", r["prompt"], r["completion"]) for n, r in enumerate(rows, first)]
    encoded = encode_responses(items, tokenizer, max_length)
    for (where, _, _), e in zip(items, encoded):
        if e is None:
            raise UserError(
                f"{where}: nothing of the completion is left within {max_length} tokens"
            )
    examples = [{"responses": [e], "margin": 0.0} for e in encoded]
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = [[i] for i in range(start, min(start + batch_size, len(examples)))]
        batch = collate_ranked(examples, chunk, tokenizer.pad_token_id)
        with torch.no_grad():
            out += rewards_of(model, {k: v.to(device) for k, v in batch.items()})[:, 0].tolist()
    return out


def score_main(argv: list[str]) -> None:
    """`posttrain reward score MODEL data=FILE [output=FILE]`: one reward per row, as JSONL."""
    from posttrain.io import write_text_atomic

    models = [a for a in argv if "=" not in a]
    keys = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = set(keys) - {"data", "output"}
    if len(models) != 1 or "data" not in keys or unknown:
        raise UserError("usage: posttrain reward score MODEL data=FILE [output=FILE]")
    rows = [row for _, row in load_rows(keys["data"])]
    for n, row in enumerate(rows, 1):
        if "prompt" not in row or "completion" not in row:
            raise UserError(f"{keys['data']}:{n}: needs `prompt` and `completion` fields")
    model, tokenizer = load_scorer(models[0])
    rewards = score(model, tokenizer, rows)
    lines = "".join(json.dumps({**row, "reward": r}) + "\n" for row, r in zip(rows, rewards))
    if "output" in keys:
        write_text_atomic(keys["output"], lines)
    else:
        sys.stdout.write(lines)
