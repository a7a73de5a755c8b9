"""posttrain.losses.rl against hand-worked values, exact expectations and TRL's GRPO loss."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from posttrain.losses import rl


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a).float(), torch.as_tensor(b).float(), atol=tol)


# ----------------------------------------------------------------------------- masked stats


def test_masked_mean_and_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert close(rl.masked_mean(x, mask), 2.0)
    # mean 2, unbiased variance (1 + 0 + 1) / 2 = 1 -> [-1, 0, 1], padding 0.
    assert close(rl.masked_whiten(x, mask), [[-1.0, 0.0, 1.0, 0.0]], 1e-6)
    assert close(rl.masked_whiten(x, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]], 1e-6)


def test_entropy_from_logits_by_hand():
    assert close(rl.entropy_from_logits(torch.zeros(2, 4)), [math.log(4)] * 2)
    logits = torch.tensor([0.0, math.log(3.0)])  # p = (1/4, 3/4)
    want = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert close(rl.entropy_from_logits(logits), want)


# ----------------------------------------------------------------------------- GAE


def test_gae_on_a_hand_worked_trajectory():
    """gamma = 0.9, lam = 0.8 (gamma * lam = 0.72); row 1 is right-padded (garbage on the pad).

    Row 0, r = (0, 0, 1), V = (0.5, 0.6, 0.7):
      d2 = 1 - 0.7 = 0.3                     A2 = 0.3
      d1 = 0 + 0.9 * 0.7 - 0.6 = 0.03        A1 = 0.03 + 0.72 * 0.3   = 0.246
      d0 = 0 + 0.9 * 0.6 - 0.5 = 0.04        A0 = 0.04 + 0.72 * 0.246 = 0.21712
      returns = A + V = (0.71712, 0.846, 1.0)
    Row 1, r = (0, 2 | 5), V = (1.0, 1.5 | 9.0), length 2:
      d1 = 2 - 1.5 = 0.5                     A1 = 0.5
      d0 = 0 + 0.9 * 1.5 - 1.0 = 0.35        A0 = 0.35 + 0.72 * 0.5 = 0.71
      returns = (1.71, 2.0 | 0)
    """
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert close(adv, [[0.21712, 0.246, 0.3], [0.71, 0.5, 0.0]])
    assert close(ret, [[0.71712, 0.846, 1.0], [1.71, 2.0, 0.0]])


def test_gae_with_gamma_lam_one_and_no_values_is_reward_to_go():
    rewards = torch.tensor([[1.0, -2.0, 4.0]])
    adv, _ = rl.gae(rewards, torch.zeros(1, 3), torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert close(adv, [[3.0, 2.0, 4.0]])


def test_kl_penalized_rewards_put_the_score_on_the_last_real_token():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards, kl = rl.kl_penalized_rewards(torch.tensor([1.0, 2.0]), logp, ref, mask, beta=0.1)
    assert close(kl, [[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]])
    assert close(rewards, [[-0.05, 0.1, 1.0], [-0.1 + 2.0, 0.0, 0.0]])


# ----------------------------------------------------------------------------- KL estimators


def kl(p_logits, q_logits):
    """Exact KL(p || q) of two categoricals given by logits."""
    lp, lq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return (lp.exp() * (lp - lq)).sum()


def expected(q_logits, per_x):
    """E_{x~q}[per_x(x)] by enumeration, with q's weights detached: the expectation of a
    Monte-Carlo loss (its gradient is the expected gradient of the estimator)."""
    return (torch.softmax(q_logits, -1).detach() * per_x).sum()


@pytest.fixture
def two_categoricals():
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(5, generator=gen).requires_grad_(True)  # policy pi = softmax(theta)
    ref = torch.randn(5, generator=gen) * 1.5
    return theta, ref


def test_kl_estimator_values_against_exact_kl(two_categoricals):
    theta, ref = two_categoricals
    logp, ref_logp = torch.log_softmax(theta, -1), torch.log_softmax(ref, -1)
    exact = kl(theta, ref)
    assert close(expected(theta, rl.kl_k1(logp, ref_logp)), exact, 1e-6)
    assert close(expected(theta, rl.kl_k3(logp, ref_logp)), exact, 1e-6)
    k2 = expected(theta, rl.kl_k2(logp, ref_logp))
    assert abs(float((k2 - exact).detach())) > 1e-2  # k2 is biased away from p = q
    assert (rl.kl_k3(logp, ref_logp) >= 0).all() and (rl.kl_k2(logp, ref_logp) >= 0).all()
    assert (rl.kl_k1(logp, ref_logp) < 0).any()


def grad(value, theta):
    return torch.autograd.grad(value, theta)[0]


def test_kl_estimator_gradients_single_step(two_categoricals):
    """Differentiated as losses on pi's samples: k1 -> 0, k2 -> grad KL(pi||ref),
    k3 -> grad KL(ref||pi) (forward KL, Tang & Munos 2025); k1 in the reward -> grad KL(pi||ref)."""
    theta, ref = two_categoricals
    ref_logp = torch.log_softmax(ref, -1)

    def estimator_grad(fn):
        return grad(expected(theta, fn(torch.log_softmax(theta, -1), ref_logp)), theta)

    reverse, forward = grad(kl(theta, ref), theta), grad(kl(ref, theta), theta)
    assert not close(reverse, forward, 1e-2)
    assert close(estimator_grad(rl.kl_k1), torch.zeros(5), 1e-6)
    assert close(estimator_grad(rl.kl_k2), reverse, 1e-6)
    assert close(estimator_grad(rl.kl_k3), forward, 1e-6)
    logp = torch.log_softmax(theta, -1)
    reinforce = expected(theta, logp * rl.kl_k1(logp, ref_logp).detach())
    assert close(grad(reinforce, theta), reverse, 1e-6)


def test_k1_in_reward_gives_the_sequence_kl_gradient():
    """Two-token sequences over 3 symbols, tabular policy: the default pipeline (k1 in the reward
    -> GAE with gamma = lam = 1, V = 0 -> PPO surrogate at ratio 1), in exact expectation over
    all 9 sequences, equals grad KL(pi || ref) of the sequence distribution. Per-token k2 or k3
    differentiated in the loss do not (partial gradient / forward KL)."""
    V = 3
    gen = torch.Generator().manual_seed(1)
    first = torch.randn(V, generator=gen).requires_grad_(True)  # logits of y1
    second = torch.randn(V, V, generator=gen).requires_grad_(True)  # logits of y2 given y1
    ref_first, ref_second = torch.randn(V, generator=gen), torch.randn(V, V, generator=gen)
    params = [first, second]
    seqs = torch.tensor(list(itertools.product(range(V), repeat=2)))  # (9, 2)

    def token_logps(a, b):  # (9, 2) log-probs of the sampled tokens
        l1 = torch.log_softmax(a, -1)[seqs[:, 0]]
        l2 = torch.log_softmax(b, -1)[seqs[:, 0], seqs[:, 1]]
        return torch.stack([l1, l2], 1)

    logp, ref_logp = token_logps(first, second), token_logps(ref_first, ref_second)
    prob = logp.sum(1).exp().detach()  # (9,) pi(y)
    exact = (logp.sum(1).exp() * (logp - ref_logp).sum(1)).sum()  # sequence KL(pi || ref)
    want = torch.autograd.grad(exact, params, retain_graph=True)

    mask = torch.ones(9, 2)
    rewards, _ = rl.kl_penalized_rewards(torch.zeros(9), logp, ref_logp, mask, beta=1.0)
    adv, _ = rl.gae(rewards, torch.zeros(9, 2), mask, gamma=1.0, lam=1.0)
    weighted = adv * prob[:, None] * mask.sum()  # exact expectation through the batch mean
    loss, _, _ = rl.ppo_policy_loss(logp, logp.detach(), weighted, mask)
    # minimising (-reward) = minimising KL: the PPO loss gradient is +grad KL.
    got = torch.autograd.grad(loss, params, retain_graph=True)
    for g, w in zip(got, want):
        assert close(g, w, 1e-5)

    for estimator in (rl.kl_k2, rl.kl_k3):
        in_loss = (prob[:, None] * estimator(logp, ref_logp)).sum()
        got = torch.autograd.grad(in_loss, params, retain_graph=True)
        assert not all(close(g, w, 1e-3) for g, w in zip(got, want))


# ----------------------------------------------------------------------------- PPO


def test_ppo_policy_loss_by_hand():
    """ratios (1.5, 0.5, 1.0 | pad), A = (1, 1, -1), eps = 0.2:
    token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: 1.0.
    loss = (-1.2 - 0.5 + 1.0) / 3; clip fraction 1/3; approx KL = mean(r - 1 - log r)."""
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0, 7.0]])).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clip_frac, approx_kl = rl.ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    assert close(loss, -0.7 / 3)
    assert close(clip_frac, 1 / 3)
    assert close(approx_kl, ((0.5 - math.log(1.5)) + (-0.5 + math.log(2.0))) / 3)
    # d/dlogp of -A * r / 3: token 0 clipped (0), token 1 -0.5/3, token 2 +1/3, pad 0.
    assert close(grad(loss, logp), [[0.0, -0.5 / 3, 1 / 3, 0.0]])


def test_ppo_value_loss_by_hand():
    """V = (1, 0), V_old = (0.5, 0.5), R = (2, 0), eps = 0.2: clipped V = (0.7, 0.3);
    max((1-2)^2, (0.7-2)^2) = 1.69, max(0, 0.09) = 0.09; loss = 0.5 * (1.69 + 0.09) / 2."""
    values = torch.tensor([[1.0, 0.0]])
    loss, frac = rl.ppo_value_loss(values, torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, 0.0]]),
                                   torch.ones(1, 2), clip_eps=0.2)  # fmt: skip
    assert close(loss, 0.445)
    assert close(frac, 1.0)


def test_explained_variance():
    returns, mask = torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3)
    assert close(rl.explained_variance(returns, returns, mask), 1.0)
    assert close(rl.explained_variance(torch.full((1, 3), 2.0), returns, mask), 0.0)


# ----------------------------------------------------------------------------- group advantages


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    a = 0.5 / (std + 1e-4)
    assert close(rl.grpo_advantages(rewards, 4), [a, -a, -a, a, 0, 0, 0, 0], 1e-6)
    assert close(rl.dr_grpo_advantages(rewards, 4), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    # leave-one-out: 1 - (0 + 0 + 1) / 3 = 2/3; 0 - 2/3.
    third = 2 / 3
    assert close(rl.rloo_advantages(rewards, 4), [third, -third, -third, third, 0, 0, 0, 0])
    with pytest.raises(ValueError):
        rl.grpo_advantages(rewards, 3)


def test_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert close(rl.aggregate(per_token, mask, "sequence"), (2.0 + 4.0) / 2)
    assert close(rl.aggregate(per_token, mask, "token"), 10.0 / 4)
    assert close(rl.aggregate(per_token, mask, "constant", max_tokens=5), 10.0 / 10)


# ----------------------------------------------------------------------------- TRL parity


def trl_grpo_loss(loss_type, logp, old_logp, ref_logp, adv, mask, beta, eps, max_len):
    """TRL 1.16's GRPOTrainer._compute_loss (an inline method, not a standalone function) run on
    a stand-in `self` whose model forward returns our log-probs."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    acc = SimpleNamespace(
        reduce=lambda t, reduction="sum": t,
        gather=lambda t: t,
        gather_for_metrics=lambda t: t,
        num_processes=1,
        sync_gradients=True,
    )
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        loss_type=loss_type,
        epsilon_low=eps,
        epsilon_high=eps,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_len,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        accelerator=acc,
        _metrics={"train": defaultdict(list)},
    )
    B, T = mask.shape
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old_logp,
        "ref_per_token_logps": ref_logp,
    }
    return GRPOTrainer._compute_loss(stub, None, inputs)


@pytest.mark.parametrize(
    "loss_type,aggregation", [("grpo", "sequence"), ("bnpo", "token"), ("dr_grpo", "constant")]
)
def test_grpo_loss_matches_trl(loss_type, aggregation):
    pytest.importorskip("trl")
    gen = torch.Generator().manual_seed(3)
    B, T, max_len = 4, 5, 7
    old = -torch.rand(B, T, generator=gen) * 3
    logp = (old + 0.3 * torch.randn(B, T, generator=gen)).requires_grad_(True)
    ref = old + 0.2 * torch.randn(B, T, generator=gen)
    adv = torch.randn(B, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    beta, eps = 0.04, 0.2
    ours, _ = rl.grpo_loss(logp, old, adv, mask, eps, eps, aggregation,
                           kl=rl.kl_k3(logp, ref), kl_coef=beta, max_tokens=max_len)  # fmt: skip
    theirs = trl_grpo_loss(loss_type, logp, old, ref, adv, mask, beta, eps, max_len)
    assert close(ours, theirs, 1e-6)
    assert close(grad(ours, logp), grad(theirs, logp), 1e-6)


def test_entropy_matches_trl():
    pytest.importorskip("trl")
    from trl.trainer.utils import entropy_from_logits

    logits = torch.randn(3, 4, 11, generator=torch.Generator().manual_seed(0))
    assert close(rl.entropy_from_logits(logits), entropy_from_logits(logits), 1e-6)
