"""Preference losses from per-sequence log-probabilities or rewards; no model calls here.

Contents:

- reward models: `bradley_terry` (+ optional margin), `center_penalty`, `plackett_luce` (K-wise);
- DPO family (policy and reference log-probs): `dpo` (with cDPO label smoothing), `robust`, `ipo`,
  `hinge`;
- reference-free: `simpo`, `cpo`, `orpo`;
- unpaired: `kto` with its baseline `kto_kl_baseline`;
- logging helpers: `implicit_rewards`, `reward_metrics`.

Conventions:

- Inputs are per-sequence tensors of shape (B,) (one entry per pair or per example; `plackett_luce`
  takes (B, K)). A "logp" is log pi(y | x) summed over the completion tokens unless the name says
  `avg` (mean over completion tokens). Which one to pass is the caller's choice; each docstring says
  what the paper / TRL use.
- Every loss returns the per-example loss, a tensor of shape (B,), and nothing else. The caller
  (the trainer) takes the mean over pairs/examples and adds any extra terms (SFT NLL for CPO/ORPO,
  `center_penalty` for reward models). Metrics come from `implicit_rewards` / `reward_metrics`.
- `beta` is the inverse temperature (for IPO the regulariser tau); the pair log-ratio margin is
  h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)).
- Definitions follow TRL 1.16 wherever TRL has the loss (checked in
  tests/test_preference_losses.py); where TRL differs from the paper the docstring says so.

Simplified on purpose: no reduction or distributed all-reduce here (the KTO KL baseline is the
local batch mean; average it across ranks before passing it if you want TRL's gathered estimate);
no f-divergence variants, no length-desensitised (LD-DPO) or WPO weighting, no AlphaPO reward
transform; inputs are assumed finite and, for ORPO, strictly negative (log-probs of a proper
distribution).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------------------- reward models


def bradley_terry(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None) -> Tensor:
    """Bradley-Terry reward-model loss, -log sigmoid(r_w - r_l - m), per pair.

    InstructGPT (Ouyang et al., 2022, "Training language models to follow instructions with human
    feedback"), Eq. 1: loss(theta) = -E log sigma(r(x, y_w) - r(x, y_l)). The optional `margin` m
    (Llama 2, Touvron et al., 2023, Eq. 2) is subtracted inside the sigmoid, as in TRL's
    RewardTrainer.
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def center_penalty(r_chosen: Tensor, r_rejected: Tensor, coef: float) -> Tensor:
    """Reward-centering auxiliary term coef * (r_w + r_l)^2, per pair.

    Eisenstein et al., 2023, "Helping or Herding? Reward Model Ensembles Mitigate but do not
    Eliminate Reward Hacking", auxiliary centering loss (pushes the rewards of each pair towards
    mean zero). Same as TRL's `center_rewards_coefficient`; the caller adds its mean to the mean
    `bradley_terry` loss.
    """
    return coef * (r_chosen + r_rejected) ** 2


def plackett_luce(rewards: Tensor) -> Tensor:
    """Plackett-Luce negative log-likelihood of a full ranking, per example.

    Zhu, Jordan & Jiao, 2023, "Principled Reinforcement Learning with Human Feedback from Pairwise
    or K-wise Comparisons", the Plackett-Luce MLE for K-wise rankings:
    -sum_{k=1}^{K-1} log( exp(r_k) / sum_{j>=k} exp(r_j) ).
    `rewards` is (B, K) with the best response first. With K=2 this is `bradley_terry`.
    """
    # logsumexp over the remaining responses j >= k, for every k.
    remaining = torch.logcumsumexp(rewards.flip(-1), dim=-1).flip(-1)
    return -(rewards - remaining)[..., :-1].sum(-1)


# ----------------------------------------------------------------------------- DPO family


def implicit_rewards(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """DPO implicit reward beta * (log pi(y|x) - log ref(y|x)); Rafailov et al., 2023, Eq. 5."""
    return beta * (policy_logps - ref_logps)


def _logratio_margin(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
) -> Tensor:
    """h = log(pi(y_w)/ref(y_w)) - log(pi(y_l)/ref(y_l))."""
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def _smoothed_logistic(logits: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): logistic loss, label flip prob eps."""
    loss = -F.logsigmoid(logits)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def dpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """DPO sigmoid loss -log sigmoid(beta * h), per pair; summed logps.

    Rafailov et al., 2023, "Direct Preference Optimization", Eq. 7. With `label_smoothing` eps > 0
    this is conservative DPO (cDPO; Mitchell, 2023, "A note on DPO with noisy preferences"):
    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).

    TRL 1.16's DPOTrainer "sigmoid" no longer applies label smoothing (its `label_smoothing` only
    feeds "robust", "exo_pair" and "aot"); eps = 0 here equals TRL's "sigmoid". The eps > 0 form is
    the one TRL keeps in CPOTrainer ("sigmoid") and in DPO "aot", and that TRL's DPO "sigmoid" used
    before 1.0.
    """
    h = _logratio_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return _smoothed_logistic(beta * h, label_smoothing)


def robust(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float,
) -> Tensor:
    """Robust DPO (rDPO), unbiased under preference flips with probability eps, per pair.

    Chowdhury et al., 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback",
    rDPO loss: [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps), with
    eps in [0, 0.5). Same as TRL's DPO loss_type "robust" (eps = `label_smoothing`). Unlike cDPO
    the flipped term has a plus sign, so the loss can be negative.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs label_smoothing in [0, 0.5), got {label_smoothing}")
    z = beta * _logratio_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def ipo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> Tensor:
    """IPO squared loss (h - 1/(2 beta))^2, per pair; beta is the paper's tau.

    Azar et al., 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", Eq. 17. This function uses whatever log-probs it is given. TRL's DPOTrainer "ipo"
    divides each log-ratio by its completion length (mean over tokens, "confirmed with the IPO
    authors"), so to match TRL the caller passes length-averaged logps (policy and reference both
    averaged over the same completion tokens).
    """
    h = _logratio_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return (h - 1 / (2 * beta)) ** 2


def hinge(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> Tensor:
    """Hinge (SLiC) loss max(0, 1 - beta * h), per pair.

    SLiC-HF (Zhao et al., 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback"),
    calibration loss is max(0, delta - log pi(y_w) + log pi(y_l)) without a reference model.
    TRL's "hinge" (followed here) uses the reference-normalised form of Liu et al., 2023 (RSO,
    "Statistical Rejection Sampling Improves Preference Optimization", hinge-norm):
    relu(1 - beta h) = beta * relu(1/beta - h), i.e. the margin delta = 1/beta in log-ratio units.
    Zero reference logps give the paper's form with delta = 1/beta, scaled by beta.
    """
    h = _logratio_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return torch.relu(1 - beta * h)


# ----------------------------------------------------------------------------- reference-free


def simpo(
    chosen_avg_logps: Tensor,
    rejected_avg_logps: Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """SimPO loss -log sigmoid(beta * (avg_w - avg_l) - gamma), per pair; no reference model.

    Meng, Xia & Chen, 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    Eq. 6, with length-normalised (token-mean) log-probs. TRL (CPOTrainer loss_type "simpo",
    `simpo_gamma`) writes it as beta * ((avg_w - avg_l) - gamma/beta), the same value; its optional
    label smoothing is the cDPO form, as in `dpo`.
    """
    return _smoothed_logistic(
        beta * (chosen_avg_logps - rejected_avg_logps) - gamma, label_smoothing
    )


def cpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """CPO preference term -log sigmoid(beta * (log pi(y_w) - log pi(y_l))), per pair; summed logps.

    Xu et al., 2024, "Contrastive Preference Optimization", Eq. 3 (DPO with the reference dropped).
    The full CPO loss adds the NLL of the chosen completion; the caller adds it (TRL:
    `cpo_alpha` * NLL, default 1). Same as TRL's CPOTrainer loss_type "sigmoid", including its
    optional cDPO label smoothing.
    """
    return _smoothed_logistic(beta * (policy_chosen_logps - policy_rejected_logps), label_smoothing)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler, 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, beta: float) -> Tensor:
    """ORPO odds-ratio term -beta * log sigmoid(log odds(y_w) - log odds(y_l)), per pair.

    Hong, Lee & Thorne, 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
    Eqs. 4 and 7 (as TRL cites them) with odds(y) = P(y) / (1 - P(y)) and P the token-mean
    likelihood (pass average logps, which must be < 0). The full ORPO loss is
    NLL(y_w) + lambda * L_OR, with beta = lambda here; the caller adds the SFT NLL term. TRL's
    ORPOTrainer.odds_ratio_loss returns +beta * log sigmoid(...) and subtracts its mean from the
    NLL; this function returns the loss with the sign already applied.
    """
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (
        _log1mexp(chosen_avg_logps) - _log1mexp(rejected_avg_logps)
    )
    return -beta * F.logsigmoid(log_odds)


# ----------------------------------------------------------------------------- KTO


def kto_kl_baseline(kl_policy_logps: Tensor, kl_ref_logps: Tensor) -> Tensor:
    """KTO reference point z0: detached batch mean of log pi - log ref, clamped at 0 (a scalar).

    Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect Theoretic Optimization": z0
    estimates KL(pi || ref) from mismatched pairs (x, y') within the batch, and no gradient flows
    through it. As TRL's KTOTrainer (which also averages it across ranks before clamping).
    """
    return (kl_policy_logps - kl_ref_logps).mean().detach().clamp(min=0)


def kto(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    kl: Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO loss lambda_y - v(x, y), per example (unpaired, `labels` True for desirable).

    Ethayarajh et al., 2024, "KTO", Eq. 7 (as TRL cites it): with r = log pi(y|x) - log ref(y|x)
    and z0 = `kl` (see `kto_kl_baseline`; treated as a constant, detached here), the loss is
    lambda_D (1 - sigmoid(beta (r - z0))) for desirable and lambda_U (1 - sigmoid(beta (z0 - r)))
    for undesirable examples. Same as TRL's KTOTrainer loss_type "kto"; TRL returns desirable
    examples first, this keeps the input order.
    """
    kl = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    r = policy_logps - ref_logps
    labels = labels.bool()
    z = torch.where(labels, r - kl, kl - r)
    weight = torch.where(labels, desirable_weight, undesirable_weight).to(policy_logps.dtype)
    return weight * (1 - torch.sigmoid(beta * z))


# ----------------------------------------------------------------------------- metrics


@torch.no_grad()
def reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """Accuracy (fraction chosen > rejected; ties count as wrong), mean margin, mean rewards."""
    return {
        "accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
        "margin": (chosen_rewards - rejected_rewards).float().mean().item(),
        "chosen": chosen_rewards.float().mean().item(),
        "rejected": rejected_rewards.float().mean().item(),
    }
