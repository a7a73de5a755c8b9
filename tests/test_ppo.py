"""posttrain ppo on a tiny random model: run directory and metrics, the policy and value head
learning a trivial reward, the adaptive KL controller, bit-exact resume, reward errors, the plan,
and rollout slicing that keeps the sampler's log-probs."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

import posttrain.cli
from posttrain.train.online import completion_logprobs
from posttrain.train.ppo import (
    PolicyWithValueHead,
    PPOConfig,
    Rollouts,
    Spec,
    adaptive_kl_coef,
    make_reference,
    plan_rollouts,
    ppo,
    save_policy_and_value,
)
from tests.online_common import metrics, online_config, reward_fn, write_prompts
from tests.tiny import save_tiny, tiny_model, tiny_tokenizer

ENTRY = ("posttrain.train.ppo", "PPOConfig", "ppo", "RLHF with PPO (value head, KL control)")


# ----------------------------------------------------------------------------- reward functions


def reward_raises(prompts, completions, **_):
    if any("boom" in p for p in prompts):
        raise ValueError("cannot score this prompt")
    return [0.0] * len(completions)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny", family="llama")


def config(tiny_dir, data, out, **extra):
    settings = {"batch_size": 4, "max_steps": 4, "ppo_epochs": 2, "num_minibatches": 2, **extra}
    return online_config(tiny_dir, data, out, **settings)


# ----------------------------------------------------------------------------- end to end


def test_lora_run_writes_the_run_dir_and_metrics(tiny_dir, tmp_path):
    data = write_prompts(tmp_path / "p.jsonl", varied=True)
    out = tmp_path / "run"
    ppo(config(tiny_dir, data, out, save_every=2))  # 8 prompts per rollout: 4 steps on it
    assert (out / "config.yaml").is_file()
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    every = {"loss", "lr", "tokens_per_s", "policy_loss", "value_loss", "clip_fraction",
             "value_clip_fraction", "approx_kl", "entropy", "train_s"}  # fmt: skip
    rollout = {"reward_mean", "reward_std", "reward/reward_fn", "kl", "kl_coef",
               "non_score_reward", "explained_variance", "value_mean", "completion_length",
               "eos_fraction", "generate_s", "score_s", "reference_s", "value_s"}  # fmt: skip
    assert all(every | rollout <= r.keys() for r in records)
    assert len({r["reward_mean"] for r in records}) == 1  # steps 2-4 train on step 1's rollout
    first = records[0]
    assert first["approx_kl"] == 0 and first["clip_fraction"] == 0  # old log-probs = policy's
    assert abs(first["kl"]) < 1e-4  # the reference is the adapter switched off; B starts at 0
    assert first["value_mean"] == 0  # zero-initialised value head
    assert records[-1]["approx_kl"] > 0
    assert 0 < first["completion_length"] <= 8
    for step in (2, 4):
        ckpt = out / "checkpoints" / f"step-{step}"
        assert (ckpt / "state.json").is_file() and (ckpt / "job.safetensors").is_file()
    final = out / "final"
    adapter = load_file(final / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: params moved
    head = load_file(final / "value_head.safetensors")
    assert head.keys() == {"weight", "bias"} and head["weight"].shape == (1, 64)
    assert head["weight"].abs().sum() > 0  # starts at zero: the value head learned
    assert (final / "tokenizer_config.json").is_file()


def test_reward_rises_on_a_trivial_reward(tiny_dir, tmp_path):
    data = write_prompts(tmp_path / "p.jsonl", varied=True, n=32)
    out = tmp_path / "run"
    ppo(config(tiny_dir, data, out, adapter="full", lr=1e-2, batch_size=8, num_minibatches=1,
               ppo_epochs=2, max_steps=30, schedule="constant", beta=0.01,
               target_kl=0))  # fmt: skip
    rewards = [r["reward_mean"] for r in metrics(out)][::2]  # one rollout batch per 2 steps
    assert sum(rewards[-3:]) / 3 > 2 * sum(rewards[:3]) / 3, rewards


def test_resume_is_bit_exact(tiny_dir, tmp_path):
    """Steps 1-6, 4 steps per rollout batch (2 passes x 2 minibatches, grad_accum 2): the
    checkpoint at step 3 sits inside a rollout batch, so resuming needs the cached rollout, the
    generator and the KL coefficient the controller moved."""
    data = write_prompts(tmp_path / "p.jsonl", varied=True)
    out = tmp_path / "run"
    cfg = config(tiny_dir, data, out, adapter="full", lr=1e-3, max_steps=6, save_every=3,
                 batch_size=1, grad_accum=2, top_k=50, top_p=0.95, temperature=0.9,
                 target_kl=0.1, kl_horizon=10, value_lr_mult=3.0)  # fmt: skip
    ppo(cfg)
    straight = {name: load_file(out / "final" / name)
                for name in ("model.safetensors", "value_head.safetensors")}  # fmt: skip
    straight_metrics = metrics(out)
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-6")  # as if killed after the step-3 checkpoint
    ppo(cfg)
    for name, tensors in straight.items():
        resumed = load_file(out / "final" / name)
        assert tensors.keys() == resumed.keys()
        for key in tensors:
            assert torch.equal(tensors[key], resumed[key]), (name, key)
    again = metrics(out)
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5, 6]
    keys = ("loss", "value_loss", "reward_mean", "kl", "kl_coef", "explained_variance")
    for a, b in zip(straight_metrics, again):  # steps 4-6 re-run: same samples, same losses
        assert [a.get(k) for k in keys] == [b.get(k) for k in keys]
    assert again[4]["kl_coef"] < again[0]["kl_coef"]  # KL ~ 0 < target: the controller lowered beta


def test_value_lr_mult_is_a_learning_rate_multiplier(tmp_path):
    """V = m x head with the head's gradients divided by m: one AdamW step at lr moves V as a
    plain head's step at m x lr does, the gradients (so clipping) are the plain head's, and the
    saved head is the effective one."""
    tok = tiny_tokenizer("chatml")
    torch.manual_seed(0)
    policy = tiny_model("llama", vocab_size=len(tok))
    scaled, plain = PolicyWithValueHead(policy, lr_mult=8.0), PolicyWithValueHead(policy)
    with torch.no_grad():
        for a, b in zip(scaled.value_head.parameters(), plain.value_head.parameters()):
            b.copy_(torch.randn_like(b))
            a.copy_(b / 8.0)  # the same value function
    rows, target = torch.randn(5, 64), torch.randn(5)
    assert torch.allclose(scaled.values(rows), plain.values(rows), atol=1e-6)
    opts = [torch.optim.AdamW(m.value_head.parameters(), lr=lr, weight_decay=0.0)
            for m, lr in ((scaled, 1e-3), (plain, 8e-3))]  # fmt: skip
    for model in (scaled, plain):
        ((model.values(rows) - target) ** 2).mean().backward()
    for a, b in zip(scaled.value_head.parameters(), plain.value_head.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)
    for opt in opts:
        opt.step()
    assert torch.allclose(scaled.values(rows), plain.values(rows), atol=1e-5)
    save_policy_and_value(scaled, tok, tmp_path)
    saved = load_file(tmp_path / "value_head.safetensors")
    assert torch.allclose(saved["weight"], plain.value_head.weight.detach(), atol=1e-6)
    assert torch.allclose(saved["bias"], plain.value_head.bias.detach(), atol=1e-6)


def test_kl_in_the_loss_runs(tiny_dir, tmp_path):
    data = write_prompts(tmp_path / "p.jsonl", varied=True, n=8)
    out = tmp_path / "run"
    ppo(config(tiny_dir, data, out, max_steps=2, ppo_epochs=1, kl_placement="loss",
               kl_estimator="k3"))  # fmt: skip
    records = metrics(out)
    assert all("kl_loss" in r for r in records) and "non_score_reward" not in records[0]


# ----------------------------------------------------------------------------- KL controller


def test_adaptive_kl_coef_hand_values():
    # e = clip(KL/target - 1, -0.2, 0.2); beta * (1 + e * n / horizon)
    assert adaptive_kl_coef(0.1, 7.0, 6.0, 10000, 600) == pytest.approx(0.1 * (1 + (1 / 6) * 0.06))
    assert adaptive_kl_coef(0.1, 12.0, 6.0, 100, 50) == pytest.approx(0.1 * 1.1)  # clipped +0.2
    assert adaptive_kl_coef(0.2, 0.0, 6.0, 100, 50) == pytest.approx(0.2 * 0.9)  # clipped -0.2
    assert adaptive_kl_coef(0.2, 6.0, 6.0, 100, 50) == 0.2  # on target
    assert adaptive_kl_coef(0.2, 99.0, 0.0, 100, 50) == 0.2  # target 0: fixed


def test_controller_moves_beta_toward_the_target():
    """A rollout whose policy differs from the reference: beta rises when the measured KL is
    above the target, falls when below, by exactly the controller's step."""
    tok = tiny_tokenizer("chatml")
    torch.manual_seed(0)
    policy = tiny_model("llama", vocab_size=len(tok))
    reference = make_reference(policy, 1.0)  # a frozen copy of the starting weights
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = PolicyWithValueHead(policy)
    examples = [{"where": f"row {i}", "prompt": f"p{i}", "columns": {},
                 "input_ids": tok(f"Hello {i}")["input_ids"]} for i in range(4)]  # fmt: skip
    sources = [type("S", (), {"name": "r", "fn": staticmethod(reward_fn), "weight": 1.0})()]
    spec = Spec(0, 0, 0, 0, 0, (0, 1, 2, 3), (0, 1))
    betas = {}
    for target in (1e-3, 1e3):
        cfg = PPOConfig(batch_size=2, max_new_tokens=6, beta=0.1, target_kl=target, kl_horizon=8)
        rollouts = Rollouts(cfg, model, tok, examples, sources, reference)
        rollouts.collate(spec)
        kl = rollouts.stats.summary()["kl"]
        assert kl > 1e-3
        betas[target] = rollouts.beta
        assert rollouts.beta == pytest.approx(adaptive_kl_coef(0.1, kl, target, 8, 4))
    assert betas[1e-3] == pytest.approx(0.1 * 1.1) and betas[1e3] == pytest.approx(0.1 * 0.9)


# ----------------------------------------------------------------------------- bad input


def cli(monkeypatch, args):
    monkeypatch.setitem(posttrain.cli.TRAINING, "ppo", ENTRY)
    return posttrain.cli.main(["ppo", *args])


@pytest.mark.parametrize(
    "fn,message",
    [
        ("tests.test_ppo:reward_raises", "ValueError: cannot score this prompt"),
        ("tests.online_common:reward_nan", "returned nan"),
    ],
)
def test_reward_errors_exit_2_naming_the_prompt(tiny_dir, tmp_path, monkeypatch, capsys, fn,
                                                message):  # fmt: skip
    data = write_prompts(tmp_path / "p.jsonl", varied=True, n=4, bad_row=2)
    args = [f"model={tiny_dir}", f"data.train={data}", f"output_dir={tmp_path / 'run'}",
            f"reward.fn={fn}", "batch_size=4", "max_new_tokens=4",
            "max_steps=1"]  # fmt: skip
    assert cli(monkeypatch, args) == 2
    err = capsys.readouterr().err
    assert "error: reward at step 1:" in err and message in err
    assert "'boom'" in err and "p.jsonl:3]" in err
    assert not (tmp_path / "run" / "final").exists()


def test_config_errors_name_the_key(tiny_dir, tmp_path, monkeypatch, capsys):
    data = write_prompts(tmp_path / "p.jsonl", varied=True, n=4)
    base = [f"model={tiny_dir}", f"data.train={data}", f"output_dir={tmp_path / 'run'}",
            "reward.fn=tests.online_common:reward_fn"]  # fmt: skip
    assert cli(monkeypatch, [*base, "kl_estimator=k4"]) == 2
    assert "kl_estimator must be one of k1, k2, k3, got 'k4'" in capsys.readouterr().err
    assert cli(monkeypatch, [*base, "kl_placement=advantage"]) == 2
    assert "kl_placement must be one of reward, loss" in capsys.readouterr().err
    assert cli(monkeypatch, [*base, "value_lr_mult=0"]) == 2
    assert "value_lr_mult must be > 0, got 0" in capsys.readouterr().err
    assert cli(monkeypatch, [*base, "lam=1.5"]) == 2
    assert "lam must be in [0, 1]" in capsys.readouterr().err
    assert cli(monkeypatch, [*base, "batch_size=8"]) == 2  # 4 prompts, 8 per rollout batch
    assert "fewer than one rollout batch" in capsys.readouterr().err


# ----------------------------------------------------------------------------- parts


def test_plan_reshuffles_each_pass_and_splits_ranks():
    cfg = PPOConfig(batch_size=2, grad_accum=2, num_minibatches=2, ppo_epochs=3, seed=7)
    specs = plan_rollouts(33, cfg, world=2, epoch=0)  # 16 prompts per rollout: 2 rollouts
    assert len(specs) == 2 * 3 * 2 * 2 * 2
    ranks = [specs[i::2] for i in range(2)]
    assert set(ranks[0][0].prompts).isdisjoint(ranks[1][0].prompts)
    passes = []
    for e in range(3):
        mine = [s for s in ranks[0] if s.rollout == 0 and s.ppo_epoch == e]
        assert [(s.minibatch, s.micro) for s in mine] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        rows = [r for s in mine for r in s.rows]
        assert sorted(rows) == list(range(8))  # every row of the rollout once per pass
        passes.append(rows)
    assert passes[0] != passes[1] or passes[1] != passes[2]
    used = [i for s in specs if s.ppo_epoch == 0 for i in s.prompts]
    assert len(set(used)) == 32
    assert plan_rollouts(33, cfg, 2, 0) == specs


def prompt_length(prompts, completions, **_):
    return [float(len(p)) for p in prompts]


def constant(prompts, completions, **_):
    return [3.0] * len(completions)


def toy_rollouts(fn, **cfg) -> Rollouts:
    tok = tiny_tokenizer("chatml")
    torch.manual_seed(0)
    policy = tiny_model("llama", vocab_size=len(tok))
    prompts = ["Hi", "What is 12 plus 30? It is", "Translate cheese to French.", "Paris is"]
    examples = [{"where": f"row {i}", "prompt": p, "columns": {},
                 "input_ids": tok(p)["input_ids"]} for i, p in enumerate(prompts)]  # fmt: skip
    cfg = PPOConfig(**{"batch_size": 2, "max_new_tokens": 4, **cfg})
    sources = [type("S", (), {"name": "r", "fn": staticmethod(fn), "weight": 1.0})()]
    return Rollouts(cfg, PolicyWithValueHead(policy), tok, examples, sources,
                    make_reference(policy, 1.0))  # fmt: skip


def test_reward_norm_keeps_the_first_rollouts_scaling():
    """The first rollout batch's scores come out with mean 0 and std 1; a later batch is scaled
    with the first one's mean and std (not its own), and the scaling is checkpointed."""
    rollouts = toy_rollouts(prompt_length)
    first = rollouts.collate(Spec(0, 0, 0, 0, 0, (0, 1), (0, 1)))["scores"]
    raw = torch.tensor([2.0, 25.0], dtype=torch.float64)  # len("Hi"), len("What is ...")
    assert torch.allclose(first.double(), (raw - raw.mean()) / raw.std())
    later = rollouts.collate(Spec(0, 1, 0, 0, 0, (2, 3), (0, 1)))["scores"]
    expected = (torch.tensor([27.0, 8.0], dtype=torch.float64) - raw.mean()) / raw.std()
    assert torch.allclose(later.double(), expected)
    state = rollouts.extra_state()["reward_scaling"]
    assert torch.allclose(state, torch.stack([raw.mean(), raw.std()]))
    resumed = toy_rollouts(prompt_length)
    resumed.load_extra_state(rollouts.extra_state())
    assert resumed.reward_scaling == rollouts.reward_scaling


def test_reward_norm_only_shifts_a_constant_first_batch_and_can_be_off():
    shifted = toy_rollouts(constant).collate(Spec(0, 0, 0, 0, 0, (0, 1), (0, 1)))["scores"]
    assert torch.equal(shifted, torch.zeros_like(shifted))
    raw = toy_rollouts(prompt_length, reward_norm=False)
    assert raw.collate(Spec(0, 0, 0, 0, 0, (0, 1), (0, 1)))["scores"].tolist() == [2.0, 25.0]


def test_rollout_slices_keep_the_samplers_logprobs():
    """Chunks of different widths are padded into one rollout; a trimmed micro-batch of it gives
    the sampler's log-probs back (ratio 1 on the first pass) and zero values at the start."""
    tok = tiny_tokenizer("chatml")
    torch.manual_seed(0)
    policy = tiny_model("llama", vocab_size=len(tok))
    model = PolicyWithValueHead(policy)
    prompts = ["Hi", "What is 12 plus 30? It is", "Translate cheese to French.", "Paris is"]
    examples = [{"where": f"row {i}", "prompt": p, "columns": {},
                 "input_ids": tok(p)["input_ids"]} for i, p in enumerate(prompts)]  # fmt: skip
    cfg = PPOConfig(batch_size=2, max_new_tokens=6, temperature=0.7, top_k=20)
    sources = [type("S", (), {"name": "r", "fn": staticmethod(reward_fn), "weight": 1.0})()]
    rollouts = Rollouts(cfg, model, tok, examples, sources, make_reference(policy, 0.7))
    batch = rollouts.collate(Spec(0, 0, 0, 0, 0, (0, 1, 2, 3), (3, 0)))
    assert batch["input_ids"].shape[0] == 2 and batch["completion_mask"].sum(1).min() >= 1
    assert batch["completion_mask"][:, -1].any() and batch["attention_mask"][:, 0].any()  # trimmed
    policy.eval()
    with torch.no_grad():
        logp, _, _ = completion_logprobs(policy, batch, cfg.temperature)
    assert torch.allclose(logp, batch["old_logp"], atol=1e-5)
    assert torch.equal(batch["old_values"], torch.zeros_like(batch["old_values"]))
    assert rollouts.collate(Spec(0, 0, 1, 0, 0, (0, 1, 2, 3), (3, 0)))["old_logp"].equal(
        batch["old_logp"]
    )  # a later pass: served from the cached rollout
    with pytest.raises(RuntimeError, match="not cached"):
        rollouts.collate(Spec(0, 1, 1, 0, 0, (0, 1, 2, 3), (0, 1)))
