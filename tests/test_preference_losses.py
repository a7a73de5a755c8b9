"""Preference losses: hand-computed values, Plackett-Luce = Bradley-Terry at K=2, TRL 1.16 parity.

The TRL parity tests call TRL's own code: `CPOTrainer.cpo_loss` and `ORPOTrainer.odds_ratio_loss`
directly, and `DPOTrainer._compute_loss`, `KTOTrainer._compute_loss` and
`RewardTrainer.compute_loss` on a trainer built with `object.__new__` and a stand-in model that
returns the chosen per-token log-probs (their losses live inside these methods, with no separate
loss function to call).
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from posttrain.losses.preference import (
    bradley_terry,
    center_penalty,
    cpo,
    dpo,
    hinge,
    implicit_rewards,
    ipo,
    kto,
    kto_kl_baseline,
    orpo,
    plackett_luce,
    reward_metrics,
    robust,
    simpo,
)

B = 6
TOL = {"atol": 1e-5, "rtol": 1e-5}


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x), written out."""
    return math.log(1 + math.exp(x))


def close(actual: torch.Tensor, expected: list[float] | float, tol: float = 1e-12) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.double(), expected.reshape(actual.shape), atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- hand-computed


def test_bradley_terry_and_center_penalty():
    close(bradley_terry(t(1.0, -2.0), t(0.5, -1.0)), [softplus(-0.5), softplus(1.0)])
    close(bradley_terry(t(1.0), t(0.5), margin=t(0.2)), [softplus(-0.3)])
    close(center_penalty(t(1.0, -2.0), t(0.5, 1.0), coef=0.01), [0.01 * 1.5**2, 0.01 * 1.0])


def test_plackett_luce_hand():
    # Ranking 2 > 1 > 0: -[(2 - log(e^2 + e^1 + e^0)) + (1 - log(e^1 + e^0))].
    lse3 = math.log(math.exp(2) + math.exp(1) + math.exp(0))
    lse2 = math.log(math.exp(1) + math.exp(0))
    close(plackett_luce(t(2.0, 1.0, 0.0)[None]), [-((2 - lse3) + (1 - lse2))])


def test_plackett_luce_k2_equals_bradley_terry():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(64, 2, generator=g) * 3
    torch.testing.assert_close(plackett_luce(r), bradley_terry(r[:, 0], r[:, 1]), atol=1e-6, rtol=0)


# Pair used below: h = (-10 - -11) - (-12 - -11) = 2.
PAIR = (t(-10.0), t(-12.0), t(-11.0), t(-11.0))


def test_dpo_hand():
    close(dpo(*PAIR, beta=0.1), [softplus(-0.2)])
    cdpo = 0.9 * softplus(-0.2) + 0.1 * softplus(0.2)
    close(dpo(*PAIR, beta=0.1, label_smoothing=0.1), [cdpo])


def test_robust_hand():
    close(robust(*PAIR, beta=0.1, label_smoothing=0.0), [softplus(-0.2)])
    rdpo = (0.9 * softplus(-0.2) - 0.1 * softplus(0.2)) / (1 - 2 * 0.1)
    close(robust(*PAIR, beta=0.1, label_smoothing=0.1), [rdpo])
    with pytest.raises(ValueError):
        robust(*PAIR, beta=0.1, label_smoothing=0.5)


def test_ipo_hand():
    close(ipo(*PAIR, beta=0.5), [(2 - 1 / (2 * 0.5)) ** 2])  # 1
    close(ipo(*PAIR, beta=0.1), [(2 - 5) ** 2])


def test_hinge_hand():
    close(hinge(*PAIR, beta=0.1), [1 - 0.1 * 2])
    close(hinge(*PAIR, beta=1.0), [0.0])
    # Reference-free SLiC form max(0, delta - log pi_w + log pi_l) with delta = 1/beta, times beta.
    zero = t(0.0)
    close(hinge(t(-10.0), t(-12.0), zero, zero, beta=0.25), [0.25 * max(0.0, 4 - 2)])


def test_simpo_hand():
    # beta (avg_w - avg_l) - gamma = 2 * 0.5 - 0.5 = 0.5
    close(simpo(t(-0.5), t(-1.0), beta=2.0, gamma=0.5), [softplus(-0.5)])
    smoothed = 0.8 * softplus(-0.5) + 0.2 * softplus(0.5)
    close(simpo(t(-0.5), t(-1.0), beta=2.0, gamma=0.5, label_smoothing=0.2), [smoothed])


def test_cpo_hand():
    close(cpo(t(-10.0), t(-12.0), beta=0.1), [softplus(-0.2)])


def test_orpo_hand():
    # -0.5 is above -log 2 and -1.0 below it: both branches of log(1 - e^x).
    log_odds_w = -0.5 - math.log(1 - math.exp(-0.5))
    log_odds_l = -1.0 - math.log(1 - math.exp(-1.0))
    close(orpo(t(-0.5), t(-1.0), beta=0.1), [0.1 * softplus(-(log_odds_w - log_odds_l))])


def test_kto_hand():
    # r = [1, -1]; z0 = 0.5
    loss = kto(
        t(-5.0, -5.0),
        t(-6.0, -4.0),
        torch.tensor([True, False]),
        kl=0.5,
        beta=0.1,
        desirable_weight=1.0,
        undesirable_weight=2.0,
    )
    desirable = 1 - 1 / (1 + math.exp(-0.1 * (1 - 0.5)))
    undesirable = 2 * (1 - 1 / (1 + math.exp(-0.1 * (0.5 + 1))))
    close(loss, [desirable, undesirable])


def test_kto_kl_is_a_constant():
    kl = torch.tensor(0.3, requires_grad=True)
    policy = torch.tensor([-5.0, -4.0], requires_grad=True)
    kto(
        policy, torch.tensor([-6.0, -4.0]), torch.tensor([True, False]), kl, beta=0.1
    ).sum().backward()
    assert kl.grad is None and policy.grad is not None


def test_kto_kl_baseline_hand():
    close(kto_kl_baseline(t(-3.0, -3.0), t(-4.0, -5.0)), 1.5)  # mean(1, 2)
    close(kto_kl_baseline(t(-5.0, -5.0), t(-4.0, -4.0)), 0.0)  # mean -1, clamped
    assert not kto_kl_baseline(t(-3.0).requires_grad_(), t(-4.0)).requires_grad


def test_implicit_rewards_and_metrics():
    close(implicit_rewards(t(-10.0, -12.0), t(-11.0, -11.0), beta=0.1), [0.1, -0.1])
    m = reward_metrics(t(1.0, 2.0, 3.0), t(0.0, 2.0, 4.0))  # a tie counts as wrong
    assert m == pytest.approx({"accuracy": 1 / 3, "margin": 0.0, "chosen": 2.0, "rejected": 2.0})
    assert all(isinstance(v, float) for v in m.values())


# ----------------------------------------------------------------------------- TRL parity


class _Accelerator:
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather


class _FusedLM:
    """Stands in for a model called with `fused_lm_head=True`: returns fixed per-token log-probs.

    Rows whose input_ids are all 1 are KTO's mismatched KL sequences and get `kl_per_token`.
    """

    training = True

    def __init__(self, per_token, kl_per_token=None):
        self.per_token, self.kl_per_token = per_token, kl_per_token

    def __call__(self, input_ids, **kwargs):
        is_kl = self.kl_per_token is not None and bool((input_ids == 1).all())
        lp = self.kl_per_token if is_kl else self.per_token
        zeros = torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _per_token(logps: torch.Tensor, width: int) -> torch.Tensor:
    """(N, width) per-token log-probs whose row sums are `logps`."""
    out = torch.zeros(len(logps), width, dtype=logps.dtype)
    out[:, -1] = logps
    return out


def _bare(cls, **attrs):
    trainer = object.__new__(cls)
    trainer.accelerator = _Accelerator()
    trainer._metrics = defaultdict(lambda: defaultdict(list))
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    trainer.aux_loss_enabled = False
    for k, v in attrs.items():
        setattr(trainer, k, v)
    return trainer


def trl_dpo(loss_type, beta, pc, pr, rc, rr, label_smoothing=0.0, lengths=None):
    """Per-pair losses from TRL's DPOTrainer._compute_loss (it returns the batch mean; one pair at
    a time gives the per-pair values). `lengths` (B, 2) sets the completion lengths TRL's IPO
    divides by."""
    from trl.trainer.dpo_trainer import DPOTrainer

    trainer = _bare(
        DPOTrainer,
        beta=beta,
        label_smoothing=label_smoothing,
        loss_types=[loss_type],
        loss_weights=[1.0],
        f_divergence_type="reverse_kl",
        ld_alpha=None,
        precompute_ref_logps=True,
        use_weighting=False,
    )
    width = 8
    out = []
    for i in range(len(pc)):
        completion_mask = torch.zeros(2, width + 1, dtype=torch.long)
        for row, n in enumerate(lengths[i].tolist() if lengths is not None else (3, 3)):
            completion_mask[row, -n:] = 1
        inputs = {
            "input_ids": torch.zeros(2, width + 1, dtype=torch.long),
            "attention_mask": torch.ones(2, width + 1, dtype=torch.long),
            "completion_mask": completion_mask,  # batch is [chosen, rejected]
            "ref_chosen_logps": rc[i : i + 1],
            "ref_rejected_logps": rr[i : i + 1],
        }
        trainer.model = model = _FusedLM(_per_token(torch.stack([pc[i], pr[i]]), width))
        out.append(trainer._compute_loss(model, inputs, return_outputs=False))
    return torch.stack(out)


def random_pairs(seed=0, avg=False):
    """Policy/ref chosen/rejected logps: summed (around -20) or token-averaged (in (-3, 0))."""
    g = torch.Generator().manual_seed(seed)
    if avg:
        return [-(torch.rand(B, generator=g) * 2.9 + 0.05) for _ in range(4)]
    return [-(torch.rand(B, generator=g) * 30 + 5) for _ in range(4)]


@pytest.fixture(scope="module")
def trl_installed():
    trl = pytest.importorskip("trl")
    assert trl.__version__ == "1.16.0", trl.__version__


@pytest.mark.usefixtures("trl_installed")
class TestTRLParity:
    @pytest.mark.parametrize("beta", [0.1, 0.5])
    def test_dpo_sigmoid(self, beta):
        x = random_pairs(1)
        torch.testing.assert_close(dpo(*x, beta=beta), trl_dpo("sigmoid", beta, *x), **TOL)

    def test_dpo_sigmoid_ignores_label_smoothing_in_trl(self):
        # TRL 1.16 "sigmoid" has no label smoothing: ours with eps > 0 (cDPO) differs from it...
        x = random_pairs(2)
        trl_loss = trl_dpo("sigmoid", 0.1, *x, label_smoothing=0.2)
        torch.testing.assert_close(dpo(*x, beta=0.1), trl_loss, **TOL)
        assert (dpo(*x, beta=0.1, label_smoothing=0.2) - trl_loss).abs().min() > 1e-3

    def test_cdpo_matches_trl_smoothed_sigmoid(self):
        # ...and equals TRL's smoothed sigmoid, run through CPOTrainer.cpo_loss with the policy
        # log-ratios log(pi/ref) as its "policy logps" (its logits are their difference).
        from trl.experimental.cpo.cpo_trainer import CPOTrainer

        pc, pr, rc, rr = random_pairs(3)
        trainer = _bare(CPOTrainer, alpha=0.0, loss_type="sigmoid", beta=0.1, label_smoothing=0.2)
        trl_loss = trainer.cpo_loss(pc - rc, pr - rr)[0]
        ours = dpo(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
        torch.testing.assert_close(ours, trl_loss, **TOL)

    @pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
    def test_robust(self, eps):
        x = random_pairs(4)
        torch.testing.assert_close(
            robust(*x, beta=0.1, label_smoothing=eps),
            trl_dpo("robust", 0.1, *x, label_smoothing=eps),
            **TOL,
        )

    def test_ipo_takes_length_averaged_logps(self):
        x = random_pairs(5)
        lengths = torch.randint(1, 8, (B, 2), generator=torch.Generator().manual_seed(5))
        trl_loss = trl_dpo("ipo", 0.1, *x, lengths=lengths)
        pc, pr, rc, rr = x
        n_w, n_l = lengths[:, 0].double(), lengths[:, 1].double()
        averaged = ipo(pc / n_w, pr / n_l, rc / n_w, rr / n_l, beta=0.1)
        torch.testing.assert_close(averaged.float(), trl_loss, **TOL)
        # Summed logps give a different loss: TRL length-normalises inside, we do not.
        assert (ipo(*x, beta=0.1) - trl_loss).abs().max() > 1e-3

    @pytest.mark.parametrize("beta", [0.05, 0.5])
    def test_hinge(self, beta):
        x = random_pairs(6)
        ours = hinge(*x, beta=beta)
        torch.testing.assert_close(ours, trl_dpo("hinge", beta, *x), **TOL)

    @pytest.mark.parametrize("eps", [0.0, 0.2])
    def test_simpo(self, eps):
        from trl.experimental.cpo.cpo_trainer import CPOTrainer

        c, r, _, _ = random_pairs(7, avg=True)
        attrs = {"alpha": 0.0, "beta": 2.0, "simpo_gamma": 0.5, "label_smoothing": eps}
        trainer = _bare(CPOTrainer, loss_type="simpo", **attrs)
        ours = simpo(c, r, beta=2.0, gamma=0.5, label_smoothing=eps)
        torch.testing.assert_close(ours, trainer.cpo_loss(c, r)[0], **TOL)

    @pytest.mark.parametrize("eps", [0.0, 0.2])
    def test_cpo(self, eps):
        from trl.experimental.cpo.cpo_trainer import CPOTrainer

        c, r, _, _ = random_pairs(8)
        trainer = _bare(CPOTrainer, alpha=0.0, loss_type="sigmoid", beta=0.1, label_smoothing=eps)
        ours = cpo(c, r, beta=0.1, label_smoothing=eps)
        torch.testing.assert_close(ours, trainer.cpo_loss(c, r)[0], **TOL)

    def test_orpo_sign(self):
        # TRL returns +beta * log sigmoid(log odds) and computes NLL - mean(it); ours is the loss.
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer

        c, r, _, _ = random_pairs(9, avg=True)
        trl_term = _bare(ORPOTrainer, beta=0.1).odds_ratio_loss(c, r)[0]
        torch.testing.assert_close(orpo(c, r, beta=0.1), -trl_term, **TOL)

    @pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
    def test_kto(self, weights):
        from trl.trainer.kto_trainer import KTOTrainer

        g = torch.Generator().manual_seed(10)
        policy, ref = -(torch.rand(B, generator=g) * 30 + 5), -(torch.rand(B, generator=g) * 30 + 5)
        labels = torch.tensor([True, False, True, True, False, False])
        kl_ref = -(torch.rand(B, generator=g) * 30 + 20)
        kl_policy = kl_ref + torch.randn(B, generator=g) + 0.5  # baseline > 0, not clamped
        dw, uw = weights
        trainer = _bare(
            KTOTrainer,
            beta=0.1,
            loss_type="kto",
            calculate_KL=True,
            precompute_ref_logps=True,
            desirable_weight=dw,
            undesirable_weight=uw,
        )
        width = 4
        trl_losses = []
        for i in range(B):  # one example at a time, the same mismatched KL batch each time
            inputs = {
                "input_ids": torch.zeros(1, width + 1, dtype=torch.long),
                "attention_mask": torch.ones(1, width + 1, dtype=torch.long),
                "completion_mask": torch.ones(1, width + 1, dtype=torch.long),
                "label": labels[i : i + 1],
                "ref_logps": ref[i : i + 1],
                "KL_input_ids": torch.ones(B, width + 1, dtype=torch.long),
                "KL_attention_mask": torch.ones(B, width + 1, dtype=torch.long),
                "KL_completion_mask": torch.ones(B, width + 1, dtype=torch.long),
                "ref_KL_logps": kl_ref,
            }
            model = _FusedLM(_per_token(policy[i : i + 1], width), _per_token(kl_policy, width))
            trainer.model = model
            trl_losses.append(trainer._compute_loss(model, inputs, return_outputs=False))
        kl = kto_kl_baseline(kl_policy, kl_ref)
        assert kl > 0
        assert trainer._metrics["train"]["kl"][-1] == pytest.approx(kl.item(), abs=1e-5)
        ours = kto(policy, ref, labels, kl, beta=0.1, desirable_weight=dw, undesirable_weight=uw)
        torch.testing.assert_close(ours, torch.stack(trl_losses), **TOL)

    @pytest.mark.parametrize("with_margin", [False, True])
    @pytest.mark.parametrize("coef", [None, 0.01])
    def test_reward_model(self, with_margin, coef):
        from trl.trainer.reward_trainer import RewardTrainer

        g = torch.Generator().manual_seed(11)
        r_w, r_l, margin = (torch.randn(B, generator=g) * 2 for _ in range(3))
        trainer = _bare(RewardTrainer, args=SimpleNamespace(center_rewards_coefficient=coef))
        trl_losses = []
        for i in range(B):
            logits = torch.stack([r_w[i], r_l[i]])[:, None]  # batch is [chosen, rejected]
            trainer.model = model = lambda **kw: SimpleNamespace(logits=logits)  # noqa: B023
            model.training = True
            inputs = {"attention_mask": torch.ones(2, 3, dtype=torch.long)}
            if with_margin:
                inputs["margin"] = margin[i : i + 1]
            trl_losses.append(trainer.compute_loss(model, inputs))
        ours = bradley_terry(r_w, r_l, margin if with_margin else None)
        if coef is not None:
            ours = ours + center_penalty(r_w, r_l, coef)
        torch.testing.assert_close(ours, torch.stack(trl_losses), **TOL)
