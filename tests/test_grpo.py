"""posttrain grpo on a tiny random model: run directory and metrics, learning a trivial reward,
bit-exact resume, reward errors, long prompts, the plan, and ratio 1 on the first pass."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import posttrain.cli
from posttrain.errors import UserError
from posttrain.train.grpo import GRPOConfig, Rollouts, Spec, grpo, plan_rollouts
from posttrain.train.online import completion_logprobs, load_prompts
from tests.online_common import metrics, online_config, reward_fn, write_prompts
from tests.tiny import save_tiny, tiny_model, tiny_tokenizer

ENTRY = ("posttrain.train.grpo", "GRPOConfig", "grpo", "GRPO / RLOO / Dr. GRPO online RL")


# ----------------------------------------------------------------------------- reward functions


def reward_raises(prompts, completions, answer, **_):
    if any("boom" in p for p in prompts):
        raise ValueError("cannot score this prompt")
    return [float(c == a) for c, a in zip(completions, answer)]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny", family="llama")


def config(tiny_dir, data, out, **extra):
    settings = {"batch_size": 2, "num_generations": 4, "max_steps": 3, **extra}
    return online_config(tiny_dir, data, out, **settings)


# ----------------------------------------------------------------------------- end to end


def test_lora_run_writes_the_run_dir_and_metrics(tiny_dir, tmp_path):
    data = write_prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    grpo(config(tiny_dir, data, out, beta=0.04, save_every=2))
    assert (out / "config.yaml").is_file()
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    want = {"loss", "lr", "tokens_per_s", "reward_mean", "reward_std", "reward/reward_fn", "kl",
            "clip_fraction", "approx_kl", "entropy", "completion_length", "eos_fraction",
            "generate_s", "score_s", "reference_s", "train_s"}  # fmt: skip
    assert all(want <= r.keys() for r in records)
    first = records[0]
    assert first["approx_kl"] == 0 and first["clip_fraction"] == 0  # sampler log-probs = policy's
    assert first["kl"] == 0 and records[-1]["kl"] > 0  # reference = the adapter switched off
    assert 0 < first["completion_length"] <= 8
    for step in (2, 3):
        ckpt = out / "checkpoints" / f"step-{step}"
        assert (ckpt / "state.json").is_file() and (ckpt / "job.safetensors").is_file()
    adapter = load_file(out / "final" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: params moved


def test_reward_rises_on_a_trivial_reward(tiny_dir, tmp_path):
    data = write_prompts(tmp_path / "p.jsonl", n=32)
    out = tmp_path / "run"
    grpo(config(tiny_dir, data, out, adapter="full", lr=3e-2, max_steps=10, schedule="constant"))
    rewards = [r["reward_mean"] for r in metrics(out)]
    assert sum(rewards[-3:]) / 3 > 2 * sum(rewards[:3]) / 3, rewards


def test_resume_is_bit_exact(tiny_dir, tmp_path):
    """Steps 1-5 with num_iterations=2: the checkpoint at step 3 sits inside a rollout batch
    (step 4 reuses step 3's samples), so resuming needs the cached rollout and the generator."""
    data = write_prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    cfg = config(tiny_dir, data, out, adapter="full", lr=1e-3, max_steps=5, save_every=3,
                 num_iterations=2, grad_accum=2, batch_size=1, beta=0.1, top_k=50,
                 top_p=0.95, temperature=0.9)  # fmt: skip
    grpo(cfg)
    straight = load_file(out / "final" / "model.safetensors")
    straight_metrics = metrics(out)
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-5")  # as if killed after the step-3 checkpoint
    grpo(cfg)
    resumed = load_file(out / "final" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    again = metrics(out)
    assert [r["step"] for r in again] == [1, 2, 3, 4, 5]
    for a, b in zip(straight_metrics, again):  # steps 4-5 re-run: same samples, same losses
        assert [a.get(k) for k in ("loss", "reward_mean", "kl")] == [
            b.get(k) for k in ("loss", "reward_mean", "kl")
        ]


# ----------------------------------------------------------------------------- bad input


def cli(monkeypatch, args):
    monkeypatch.setitem(posttrain.cli.TRAINING, "grpo", ENTRY)
    return posttrain.cli.main(["grpo", *args])


@pytest.mark.parametrize(
    "fn,message",
    [
        ("tests.test_grpo:reward_raises", "ValueError: cannot score this prompt"),
        ("tests.online_common:reward_nan", "returned nan"),
    ],
)
def test_reward_errors_exit_2_naming_the_prompt(tiny_dir, tmp_path, monkeypatch, capsys, fn,
                                                message):  # fmt: skip
    data = write_prompts(tmp_path / "p.jsonl", n=4, bad_row=2)
    args = [f"model={tiny_dir}", f"data.train={data}", f"output_dir={tmp_path / 'run'}",
            f"reward.fn={fn}", "batch_size=4", "num_generations=2",
            "max_new_tokens=4", "max_steps=1", "seed=1"]  # fmt: skip
    assert cli(monkeypatch, args) == 2
    err = capsys.readouterr().err
    assert "error: reward at step 1:" in err and message in err
    # rows are shuffled into the batch; whichever completion comes first names data row 3
    assert "'boom'" in err and "p.jsonl:3]" in err
    assert not (tmp_path / "run" / "final").exists()


def test_config_errors_name_the_key(tiny_dir, tmp_path, monkeypatch, capsys):
    data = write_prompts(tmp_path / "p.jsonl", n=4)
    base = [f"model={tiny_dir}", f"data.train={data}", f"output_dir={tmp_path / 'run'}"]
    assert cli(monkeypatch, [*base, "reward.fn=tests.online_common:reward_fn", "num_generations=1"])
    assert "num_generations must be >= 2" in capsys.readouterr().err
    assert cli(monkeypatch, base) == 2
    assert "reward.fn or reward.model is required" in capsys.readouterr().err
    assert cli(monkeypatch, [*base, "reward.fn=tests.test_grpo:nothing"]) == 2
    assert "has no function 'nothing'" in capsys.readouterr().err


def test_long_prompts_truncated_dropped_or_refused(tmp_path, capsys):
    tok = tiny_tokenizer("chatml")
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "Hi"}, {"prompt": "The quick brown fox jumps over the lazy dog. " * 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    full = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                    add_generation_prompt=True) for r in rows]  # fmt: skip
    full = [tok(t, add_special_tokens=False)["input_ids"] for t in full]
    limit = len(full[0]) + 2
    assert len(full[1]) > limit
    cfg = GRPOConfig(max_prompt_length=limit)
    kept = load_prompts(str(path), "train", tok, cfg)
    assert [e["input_ids"] for e in kept] == [full[0], full[1][-limit:]]  # cut from the left
    assert "longer than max_prompt_length" in capsys.readouterr().err
    cfg.long_prompts = "drop"
    kept = load_prompts(str(path), "train", tok, cfg)
    assert [e["input_ids"] for e in kept] == [full[0]]
    assert ": 1 (dropped)" in capsys.readouterr().err
    cfg.long_prompts = "error"
    with pytest.raises(UserError, match=r"p.jsonl:2: the prompt has \d+ tokens"):
        load_prompts(str(path), "train", tok, cfg)
    path.write_text(json.dumps({"question": "no prompt"}) + "\n")
    with pytest.raises(UserError, match="p.jsonl:1: grpo needs a 'prompt'"):
        load_prompts(str(path), "train", tok, cfg)


# ----------------------------------------------------------------------------- parts


def test_plan_repeats_each_rollout_and_interleaves_ranks():
    cfg = GRPOConfig(batch_size=2, grad_accum=2, num_iterations=3, seed=7)
    specs = plan_rollouts(17, cfg, world=2, epoch=0)  # 8 prompts per rollout: 2 rollouts
    assert len(specs) == 2 * 3 * 2 * 2
    first = specs[:4]  # rollout 0, iteration 0: micro 0 rank 0/1, micro 1 rank 0/1
    assert [(s.rollout, s.iteration, s.micro) for s in first] == [(0, 0, 0)] * 2 + [(0, 0, 1)] * 2
    assert [s.indices for s in specs[4:8]] == [s.indices for s in first]  # iteration 1 reuses
    used = [i for s in specs if s.iteration == 0 for i in s.indices]
    assert len(used) == len(set(used)) == 16
    assert plan_rollouts(17, cfg, 2, 0) == specs
    assert [s.indices for s in plan_rollouts(17, cfg, 2, 1)] != [s.indices for s in specs]


def test_training_logprobs_equal_the_samplers():
    """The loss's log-probs of the sampled tokens (left-padded prompts, temperature) are the
    sampler's, so the first pass has ratio 1 exactly where it should."""
    tok = tiny_tokenizer("chatml")
    model = tiny_model("llama", vocab_size=len(tok))
    prompts = ["Hi", "What is 12 plus 30? It is", "Translate cheese to French."]
    examples = [{"where": f"row {i}", "prompt": p, "columns": {},
                 "input_ids": tok(p)["input_ids"]} for i, p in enumerate(prompts)]  # fmt: skip
    cfg = GRPOConfig(num_generations=2, max_new_tokens=6, temperature=0.7, top_k=20)
    sources = [type("S", (), {"name": "r", "fn": staticmethod(reward_fn), "weight": 1.0})()]
    rollouts = Rollouts(cfg, model, tok, examples, sources, reference=None)
    batch = rollouts.collate(Spec(0, 0, 0, 0, (0, 1, 2)))
    assert batch["input_ids"].shape[0] == 6 and batch["completion_mask"].sum(1).min() >= 1
    model.eval()
    with torch.no_grad():
        logp, _, _ = completion_logprobs(model, batch, cfg.temperature)
    assert torch.allclose(logp, batch["old_logp"], atol=1e-5)
    assert rollouts.collate(Spec(0, 0, 1, 0, (0, 1, 2))) is batch  # the next pass: cached
    stats = rollouts.after_step()
    assert {"reward_mean", "reward/r", "generate_s", "train_s"} <= stats.keys()


def test_checkpoint_keeps_each_ranks_job_state(tmp_path):
    from posttrain.train import checkpoint

    jobs = [
        {"generator": torch.arange(3), "cache.0.ids": torch.ones(2)},
        {"generator": torch.zeros(1)},
    ]
    optimizer_state = {"state": {}, "param_groups": [{"lr": 0.1, "params": []}]}
    path = checkpoint.save(tmp_path, 2, {"w": torch.zeros(1)}, optimizer_state, {}, 1, None, jobs)
    assert checkpoint.load_job_state(path, 0).keys() == jobs[0].keys()
    assert torch.equal(checkpoint.load_job_state(path, 0)["generator"], torch.arange(3))
    assert checkpoint.load_job_state(path, 1).keys() == {"generator"}
    assert torch.equal(checkpoint.load_job_state(path, 1)["generator"], torch.zeros(1))
    assert torch.equal(checkpoint.load_job_state(path, 3)["generator"], torch.arange(3))
    bare = checkpoint.save(tmp_path / "b", 1, {"w": torch.zeros(1)}, optimizer_state, {}, 1)
    assert checkpoint.load_job_state(bare) == {}
