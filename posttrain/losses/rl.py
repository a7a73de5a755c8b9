"""Online-RL math as small pure functions: masking, GAE, KL estimators, PPO and GRPO objectives.

Shapes: B sequences (completions), T completion positions, right-padded; `mask` is (B, T) with 1
on real completion tokens. A "logp" is log pi(y_t | x, y_<t) of the *sampled* token, (B, T).
Every loss returns a scalar to minimise plus detached metrics; nothing here calls a model.

Where the KL to the reference goes (Tang & Munos, 2025, "On a few pitfalls in KL divergence
gradient estimation for RL", arXiv:2506.09477). Target: the sequence-level reverse KL
KL(pi || ref) = E_{y~pi}[sum_t log pi(y_t|s_t) - log ref(y_t|s_t)], whose gradient is

    grad KL = E_{y~pi}[ sum_t grad log pi(y_t|s_t) * sum_{s>=t} (log pi(y_s|s_s) - log ref(y_s|s_s)) ].

- **k1 in the reward (the default, `DEFAULT_KL_ESTIMATOR = "k1"`, `DEFAULT_KL_PLACEMENT =
  "reward"`)**: subtract beta * k1_t from the per-token reward (InstructGPT; Ziegler et al. 2019)
  and let the returns carry it. With gamma = lam = 1 and no value baseline the policy-gradient
  term is exactly the estimator above, so it is unbiased for the gradient of the sequence KL; a
  critic / lam < 1 changes only the variance-bias trade-off the reward term already has.
  Tested exactly in tests/test_rl_losses.py::test_k1_in_reward_gives_the_sequence_kl_gradient.
- Any estimator **differentiated as a loss** (added to the loss with gradient, on-policy samples):
  k1 has gradient zero in expectation (E_pi[grad log pi] = 0); k2 = (log r)^2 / 2 has expected
  gradient E[k1 * grad log pi], the gradient of the reverse KL for one step but, per token in a
  sequence, only the partial gradient that ignores the effect of token t on later tokens' KL;
  k3 = (r - 1) - log r with r = ref/pi has expected gradient -E_pi[ref/pi * grad log pi] = grad
  KL(ref || pi): the *forward* KL of each next-token distribution (Tang & Munos), again
  per state visited by pi. So "k3 in the loss" as in GRPO (DeepSeekMath, Shao et al. 2024, Eq. 4)
  minimises a different divergence; it is offered because GRPO defines it, not as the default.
  (As *values*, k1 and k3 are unbiased estimates of the reverse KL and k2 is biased.)

Simplified on purpose: no distributed reductions (masked means are over the local batch), no
importance-sampling corrections for a stale sampler (vLLM), a fixed group size for the group
advantages, and KL estimators take log-probs of the sampled tokens only (no full-vocab KL).
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_KL_ESTIMATOR = "k1"  # with DEFAULT_KL_PLACEMENT: the unbiased sequence-KL gradient
DEFAULT_KL_PLACEMENT = "reward"  # "reward" (detached, in the returns) or "loss" (differentiated)
AGGREGATIONS = ("sequence", "token", "constant")

# ----------------------------------------------------------------------------- masked statistics


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over positions where `mask` is 1 (over all of them, or along `dim`)."""
    return masked_sum(x, mask, dim) / masked_sum(torch.ones_like(x), mask, dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over the masked positions (Bessel-corrected when `unbiased`)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over masked positions; padded positions come back as 0.

    Advantage normalisation as in OpenAI baselines PPO2 and TRL's old PPOTrainer (unbiased
    variance). With `shift_mean=False` the mean is added back (used for rewards, which keep their
    sign). (B, T) -> (B, T).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Shannon entropy in nats of softmax(logits) along the last axis: (..., V) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ----------------------------------------------------------------------------- GAE


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation", Eq. 16), per right-padded sequence.

    delta_t = r_t + gamma * V_{t+1} - V_t, with V = 0 after the last real token (the episode ends
    there); A_t = sum_l (gamma * lam)^l delta_{t+l}, returns R_t = A_t + V_t (the value targets).
    rewards, values, mask: (B, T). Returns (advantages, returns), both (B, T), zero on padding.
    """
    rewards, values, mask = rewards.float(), values.float(), mask.float()
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    carry = torch.zeros_like(rewards[:, 0])  # A_{t+1}, (B,)
    for t in reversed(range(T)):
        alive_next = mask[:, t + 1] if t + 1 < T else torch.zeros_like(carry)
        next_value = values[:, t + 1] * alive_next if t + 1 < T else torch.zeros_like(carry)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        carry = (delta + gamma * lam * carry * alive_next) * mask[:, t]
        advantages[:, t] = carry
    return advantages, (advantages + values) * mask


# ----------------------------------------------------------------------------- KL estimators


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log pi(y) - log ref(y): unbiased for KL(pi || ref) on y ~ pi, high variance, can be < 0.

    Schulman, 2020, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html). (B, T).
    """
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = (log pi(y) - log ref(y))^2 / 2: biased (exact to second order), low variance, >= 0."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = (r - 1) - log r with r = ref(y) / pi(y): unbiased for KL(pi || ref) on y ~ pi, >= 0.

    The estimator GRPO puts in its loss (Shao et al., 2024, Eq. 4); see the module docstring for
    what its *gradient* estimates. (B, T).
    """
    log_ratio = ref_logp - logp
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str = DEFAULT_KL_ESTIMATOR) -> Tensor:
    """Per-token KL estimate by name ("k1", "k2", "k3"). (B, T)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose from {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logp, ref_logp)


def kl_penalized_rewards(
    scores: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    beta: float,
    estimator: str = DEFAULT_KL_ESTIMATOR,
) -> tuple[Tensor, Tensor]:
    """Per-token rewards for PPO with the KL in the reward (InstructGPT, Ouyang et al. 2022, Eq. 2).

    r_t = -beta * KL_t on every real token, plus the sequence score on the last real token.
    Detached: the KL acts through the returns (the placement that is unbiased with k1; see the
    module docstring). scores: (B,); logp, ref_logp, mask: (B, T). Returns (rewards, kl), (B, T).
    """
    mask = mask.float()
    kl = kl_estimate(logp.detach().float(), ref_logp.detach().float(), estimator) * mask
    rewards = -beta * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,) index of the last real token
    rewards[torch.arange(len(scores)), last] += scores.float() * (mask.sum(1) > 0)
    return rewards, kl


# ----------------------------------------------------------------------------- PPO


def ppo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate (Schulman et al., 2017, "Proximal Policy Optimization Algorithms",
    Eq. 7), per token, averaged over all real tokens of the batch.

    loss = mean_t -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t), rho_t = pi(y_t) / pi_old(y_t).
    Returns (loss, clip_fraction: share of tokens where the clipped term was the smaller one,
    approx_kl: mean k3 estimate of KL(pi_old || pi) on the old policy's samples). All (B, T) in.
    """
    log_ratio = logp - old_logp  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    return loss, clip_fraction, approx_kl


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Clipped value loss (PPO2 in OpenAI baselines; as in TRL's old PPOTrainer), per token.

    loss = 0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old - eps, V_old + eps) - R_t)^2).
    Returns (loss, clip_fraction). (B, T) in.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    return loss, clip_fraction


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(R - V) / Var(R) over real tokens (1 = perfect critic, <= 0 = useless)."""
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-12)


# ----------------------------------------------------------------------------- group advantages


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (N*G,) with G={group_size}, got {tuple(rewards.shape)}")
    return rewards.float().view(-1, group_size)  # (N, G): the G completions of each prompt together


def grpo_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """Group-normalised advantages (Shao et al., 2024, DeepSeekMath, Sec. 4.1.2):
    A_i = (r_i - mean(r_group)) / (std(r_group) + eps), std unbiased as in TRL's GRPOTrainer.

    rewards: (N*G,), consecutive groups of G completions of one prompt. Returns (N*G,).
    """
    grouped = _groups(rewards, group_size)
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
    return ((grouped - grouped.mean(1, keepdim=True)) / (std + eps)).view(-1)


def dr_grpo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO advantages (Liu et al., 2025, "Understanding R1-Zero-Like Training", Sec. 3.2):
    A_i = r_i - mean(r_group), no division by the group std (which up-weights easy/hard prompts).
    (N*G,) -> (N*G,)."""
    grouped = _groups(rewards, group_size)
    return (grouped - grouped.mean(1, keepdim=True)).view(-1)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out (Kool et al., 2019; Ahmadian et al., 2024, "Back to Basics", Eq. 5):
    A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r_group)). (N*G,) -> (N*G,)."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 completions per prompt")
    grouped = _groups(rewards, group_size)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).view(-1)


# ----------------------------------------------------------------------------- GRPO objective


def aggregate(per_token: Tensor, mask: Tensor, how: str, max_tokens: int | None = None) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar.

    - "sequence": mean over each sequence's tokens, then over sequences (GRPO, Shao et al. 2024
      Eq. 3; long sequences weigh less per token, the length bias Dr. GRPO points out);
    - "token": sum over all tokens / number of tokens (DAPO, Yu et al. 2025, Eq. 8; TRL "bnpo");
    - "constant": sum over all tokens / (B * max_tokens) (Dr. GRPO, Liu et al. 2025, Sec. 3.2; a
      constant normaliser, no length bias). `max_tokens` defaults to T.
    """
    if how == "sequence":
        return masked_mean(per_token, mask, dim=1).mean()
    if how == "token":
        return masked_mean(per_token, mask)
    if how == "constant":
        return masked_sum(per_token, mask) / (per_token.shape[0] * (max_tokens or mask.shape[1]))
    raise ValueError(f"unknown aggregation {how!r}; choose from {AGGREGATIONS}")


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: str = "sequence",
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    max_tokens: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Token-level clipped objective of GRPO (Shao et al., 2024, Eq. 3) and its variants.

    per-token loss = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + kl_coef * kl_t,
    rho_t = pi(y_t) / pi_old(y_t), A the sequence's advantage broadcast over its tokens
    (eps_high > eps_low is DAPO's clip-higher). `kl` is an optional per-token KL *with gradient*
    (GRPO uses `kl_k3(logp, ref_logp)`; see the module docstring for what that optimises). Reduced
    by `aggregate(.., aggregation)`: "sequence" = GRPO, "constant" = Dr. GRPO, "token" = DAPO.
    logp, old_logp, mask: (B, T); advantages: (B,) or (B, T). Returns (loss, clip_fraction).
    """
    if advantages.ndim == 1:
        advantages = advantages[:, None]  # (B, 1)
    ratio = torch.exp(logp - old_logp)  # (B, T)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    if kl is not None and kl_coef:
        per_token = per_token + kl_coef * kl
    loss = aggregate(per_token, mask, aggregation, max_tokens)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float().expand_as(mask), mask)
    return loss, clip_fraction
