"""Direct preference optimisation and its family: `posttrain dpo loss=...`.

Losses (`posttrain.losses.preference`): `dpo` (sigmoid; `label_smoothing` > 0 is cDPO),
`robust`, `ipo` (on length-averaged log-probs, as TRL), `hinge`, and the reference-free
`simpo` (averaged log-probs, margin `gamma`), `cpo` and `orpo` (both add the chosen response's
mean NLL, as their papers and TRL do), and `kto` on unpaired prompt/completion/label rows
(pairs are split into a desirable and an undesirable row). A KTO example is its labelled
completion plus a mismatched one (`data.preference.tokenize_unpaired`); the batch mean of the
mismatched log-ratios is KTO's reference point z0 (detached, clamped at 0, averaged over ranks).

Each step runs chosen and rejected through the model in one forward pass: one row per pair
holding the shared prompt once, then chosen, then rejected, with a 4D mask that keeps the two
responses apart (`data.shared_prompt`), where the attention takes such a mask (sdpa, eager);
otherwise (flash-attention, prompt/prefix tuning) a concatenated (2B, T) batch. Sequence
log-probs come from the final hidden states through the LM head in chunks
(`losses.lm.token_logprobs`), so the (B, T, V) logits never exist.

The reference model: with an adapter, the same model with the adapter disabled (no second
copy). Otherwise its log-probs are computed once before training and cached in
`output_dir/reference_logps.json` with a fingerprint of the data and model; a resumed run
reuses the cache, a changed data file or model recomputes it.

Metrics: loss, rewards_chosen/rejected (beta x log-ratio; beta x mean log-prob for the
reference-free losses), reward accuracy and margin, and the chosen/rejected log-probs.

`sft_weight` > 0 adds the chosen response's mean NLL to the pair losses: RPO (Pang et al.
2024, "Iterative Reasoning Preference Optimization"), which keeps DPO from lowering the
likelihood of the chosen answers; TRL: `loss_type=["sigmoid", "sft"]`, `loss_weights=[1, w]`,
except that TRL averages the NLL over all chosen tokens of the batch, we per response.

For KTO, rewards_chosen/rejected are the mean implicit rewards of the batch's desirable and
undesirable examples (absent when a batch has none), and `kl` is z0.

Simplified on purpose: no packing; KTO's z0 comes from the micro-batch (as TRL), not the step.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from peft import PeftModel

from posttrain.config import TrainConfig, build_config, check, opt
from posttrain.data.load import load_rows
from posttrain.data.preference import tokenize_unpaired
from posttrain.data.shared_prompt import collate_shared, row_length
from posttrain.errors import UserError
from posttrain.io import write_json
from posttrain.losses import preference as P
from posttrain.losses.lm import final_hidden, output_head, row_logprobs
from posttrain.modeling.load import attention_of
from posttrain.train import dist
from posttrain.train.reward import collate_ranked, load_examples, longest_response, ranked_job
from posttrain.train.run import begin_run, load_splits, load_trainable_model, run_job

LOSSES = ("dpo", "robust", "ipo", "hinge", "simpo", "cpo", "orpo", "kto")
REFERENCE_FREE = ("simpo", "cpo", "orpo")
CACHE = "reference_logps.json"


@dataclass
class DPOConfig(TrainConfig):
    """`posttrain dpo`: the shared training keys plus the loss and its constants."""

    loss: str = opt("dpo", "loss: " + ", ".join(LOSSES))
    beta: float = opt(0.1, "inverse temperature (IPO's tau; ORPO's lambda)")
    label_smoothing: float = opt(
        0.0, "assumed label-noise rate (cdpo via loss=dpo, robust, simpo, cpo)"
    )
    gamma: float = opt(0.5, "SimPO target margin")
    sft_weight: float = opt(
        0.0, "weight of the chosen response's mean NLL added to dpo/robust/ipo/hinge/simpo (RPO)"
    )
    desirable_weight: float = opt(1.0, "KTO lambda_D: weight of desirable examples")
    undesirable_weight: float = opt(1.0, "KTO lambda_U: weight of undesirable examples")

    def validate(self) -> None:
        super().validate()
        check(self.loss in LOSSES, "loss", f"must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        check(self.beta > 0, "beta", "must be > 0")
        check(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        check(self.sft_weight >= 0, "sft_weight", "must be >= 0")
        no_sft = ("cpo", "orpo", "kto")
        check(
            not (self.sft_weight and self.loss in no_sft),
            "sft_weight",
            f"not used by loss={self.loss} (cpo and orpo add their own NLL term; kto is unpaired)",
        )
        check(self.desirable_weight > 0, "desirable_weight", "must be > 0")
        check(self.undesirable_weight > 0, "undesirable_weight", "must be > 0")


def sequence_logps(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(target), trained tokens) per response, both (2B,) float32, pairs adjacent."""
    hidden, head, targets = final_hidden(model, batch), output_head(model), batch["targets"]
    if targets.ndim == 2:  # (2B, T): a row per response
        return row_logprobs(hidden, head, targets)
    sides = [row_logprobs(hidden, head, targets[:, side]) for side in (0, 1)]  # (B, 2, T)
    return tuple(torch.stack(parts, 1).reshape(-1) for parts in zip(*sides))


def pair_layout(model: torch.nn.Module):
    """(collate, row length): one row per pair (`collate_shared`) where the attention takes a
    4D mask, else a row per response (`collate_ranked`)."""
    config = getattr(model, "active_peft_config", None)
    prompt_learning = config is not None and config.is_prompt_learning
    if attention_of(model) in ("sdpa", "eager") and not prompt_learning:
        return collate_shared, row_length
    return collate_ranked, longest_response


def reference_logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """(B, 2) reference sums: cached in the batch, or the model with its adapter disabled."""
    if "ref_logps" in batch:
        return batch["ref_logps"]
    with torch.no_grad(), model.disable_adapter():
        return sequence_logps(model, batch)[0].view(-1, 2)


def pair_losses(cfg: DPOConfig, pol: torch.Tensor, count: torch.Tensor, ref: torch.Tensor | None):
    """Per-pair loss (plus `sft_weight` x the chosen mean NLL) and the implicit rewards."""
    loss, chosen, rejected = preference_losses(cfg, pol, count, ref)
    if cfg.sft_weight:
        loss = loss - cfg.sft_weight * pol[:, 0] / count[:, 0]
    return loss, chosen, rejected


def preference_losses(cfg: DPOConfig, pol: torch.Tensor, count: torch.Tensor, ref):
    """Per-pair loss and the implicit rewards (chosen, rejected) for logging; (B, 2) inputs."""
    c, r = pol[:, 0], pol[:, 1]
    avg = pol / count  # (B, 2) mean log-prob per trained token
    if cfg.loss in REFERENCE_FREE:
        ac, ar = avg[:, 0], avg[:, 1]
        if cfg.loss == "simpo":
            loss = P.simpo(ac, ar, cfg.beta, cfg.gamma, cfg.label_smoothing)
        elif cfg.loss == "cpo":
            loss = P.cpo(c, r, cfg.beta, cfg.label_smoothing) - ac  # + NLL of chosen
        else:
            loss = P.orpo(ac, ar, cfg.beta) - ac  # + NLL of chosen
        return loss, cfg.beta * ac.detach(), cfg.beta * ar.detach()
    rc, rr = ref[:, 0], ref[:, 1]
    if cfg.loss == "ipo":
        ref_avg = ref / count
        loss = P.ipo(avg[:, 0], avg[:, 1], ref_avg[:, 0], ref_avg[:, 1], cfg.beta)
    elif cfg.loss == "robust":
        loss = P.robust(c, r, rc, rr, cfg.beta, cfg.label_smoothing)
    elif cfg.loss == "hinge":
        loss = P.hinge(c, r, rc, rr, cfg.beta)
    else:
        loss = P.dpo(c, r, rc, rr, cfg.beta, cfg.label_smoothing)
    chosen = P.implicit_rewards(c.detach(), rc, cfg.beta)
    return loss, chosen, P.implicit_rewards(r.detach(), rr, cfg.beta)


def kto_losses(cfg: DPOConfig, pol: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor):
    """Per-example KTO loss and metrics; column 0 is the labelled completion, 1 the mismatched."""
    kl_ratios = dist.mean_over_ranks(pol[:, 1] - ref[:, 1])  # (B,) averaged over ranks, then:
    z0 = P.kto_kl_baseline(kl_ratios, torch.zeros_like(kl_ratios))  # batch mean, clamped at 0
    weights = (cfg.desirable_weight, cfg.undesirable_weight)
    loss = P.kto(pol[:, 0], ref[:, 0], labels, z0, cfg.beta, *weights)
    rewards = P.implicit_rewards(pol[:, 0].detach(), ref[:, 0], cfg.beta)
    good, bad = labels.bool(), ~labels.bool()
    metrics = {"kl": float(z0)}
    for name, rows in (("chosen", good), ("rejected", bad)):
        if rows.any():  # a batch without one kind logs nothing for it
            metrics[f"rewards_{name}"] = float(rewards[rows].mean())
            metrics[f"logps_{name}"] = float(pol[rows, 0].detach().mean())
    if good.any() and bad.any():
        metrics["margin"] = metrics["rewards_chosen"] - metrics["rewards_rejected"]
    return loss, metrics


def dpo_loss(model: torch.nn.Module, batch: dict, cfg: DPOConfig):
    """Summed pair losses of one concatenated pass, and the per-pair metrics."""
    sums, count = sequence_logps(model, batch)
    pol, count = sums.view(-1, 2), count.view(-1, 2)
    if cfg.loss == "kto":
        loss, metrics = kto_losses(cfg, pol, reference_logps(model, batch), batch["label"])
        return loss.sum(), metrics
    ref = None if cfg.loss in REFERENCE_FREE else reference_logps(model, batch)
    loss, chosen, rejected = pair_losses(cfg, pol, count, ref)
    metrics = P.reward_metrics(chosen, rejected)
    metrics = {f"rewards_{k}" if k in ("chosen", "rejected") else k: v for k, v in metrics.items()}
    metrics["logps_chosen"] = float(pol[:, 0].detach().mean())
    metrics["logps_rejected"] = float(pol[:, 1].detach().mean())
    return loss.sum(), metrics


# ----------------------------------------------------------------------------- reference cache


def fingerprint(cfg: DPOConfig, examples: list[dict]) -> str:
    """Hash of the model name and every token of the data: a changed file never reuses a cache."""
    digest = hashlib.sha256(f"{cfg.model}|{cfg.revision}|{cfg.max_length}".encode())
    for e in examples:
        for r in e["responses"]:
            digest.update(json.dumps([r["input_ids"], r["targets"]]).encode())
    return digest.hexdigest()


@torch.no_grad()
def compute_reference(model, examples: list[dict], pad_id: int, batch_size: int) -> list:
    """[[chosen, rejected] summed log-probs] per example, from the model as loaded."""
    model.eval()
    out, (collate, _) = [], pair_layout(model)
    for start in range(0, len(examples), batch_size):
        spec = [list(range(start, min(start + batch_size, len(examples))))]
        batch = collate(examples, spec, pad_id)
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        out += sequence_logps(model, batch)[0].view(-1, 2).tolist()
    return out


def attach_reference(cfg: DPOConfig, model, tokenizer, sets: dict[str, list[dict]]) -> None:
    """Give every example its `ref_logps`, from the cache when its fingerprint matches."""
    path = Path(cfg.output_dir) / CACHE
    cached = json.loads(path.read_text()) if path.is_file() else {}
    fresh = {}
    for name, examples in sets.items():
        key = fingerprint(cfg, examples)
        entry = cached.get(name, {})
        if entry.get("fingerprint") == key:
            values = entry["logps"]
        else:
            if entry and dist.is_main():
                print(f"{CACHE}: {name} data or model changed; recomputing", file=sys.stderr)
            values = compute_reference(model, examples, tokenizer.pad_token_id, cfg.batch_size)
        fresh[name] = {"fingerprint": key, "logps": values}
        for e, v in zip(examples, values):
            e["ref_logps"] = v
    if dist.is_main() and fresh != cached:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, fresh)


# ----------------------------------------------------------------------------- the method


def load_unpaired(source: str, split: str, tokenizer, cfg: DPOConfig, label: str) -> list[dict]:
    """KTO examples from prompt/completion/label rows (or pairs), with a one-line summary."""
    examples, stats = tokenize_unpaired(load_rows(source, split=split), tokenizer, cfg.max_length)
    if dist.is_main():
        good = sum(e["label"] for e in examples)
        print(
            f"{label}: {stats['examples']} KTO examples ({good} desirable) from {stats['rows']} "
            f"rows; dropped {stats['dropped_no_target']} with nothing left after "
            f"max_length={cfg.max_length}; truncated: {stats['truncated']}",
            file=sys.stderr,
        )
    return examples


def dpo(cfg: DPOConfig | dict) -> dict[str, float]:
    """Preference-tune `cfg.model` on prompt/chosen/rejected pairs; writes `output_dir`."""
    cfg = build_config(DPOConfig, cfg)
    device, tokenizer = begin_run(cfg)
    load = load_unpaired if cfg.loss == "kto" else load_examples
    train, evals = load_splits(
        cfg, lambda source, split, label: load(source, split, tokenizer, cfg, label)
    )
    if len(train[0]["responses"]) != 2:
        raise UserError("dpo needs pairs (prompt/chosen/rejected), not ranked lists")
    model = load_trainable_model(cfg, tokenizer, device)
    if cfg.loss not in REFERENCE_FREE and not isinstance(model, PeftModel):
        attach_reference(cfg, model, tokenizer, {"train": train, "eval": evals})
    loss = partial(dpo_loss, cfg=cfg)
    job = ranked_job(cfg, model, tokenizer, train, evals, loss, pair_layout(model))
    return run_job(job, cfg, device)
