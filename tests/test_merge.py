"""posttrain merge: method math by hand, streaming sharded output, errors, atomicity, adapter fold."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.errors import UserError
from posttrain.ship import merge_methods as mm
from posttrain.ship.merge import main, merge_models
from posttrain.ship.merge_config import evaluate_setting, parse_merge_config
from tests.tiny import save_tiny, tiny_model, tiny_tokenizer

# ----------------------------------------------------------------------------- hand values


def test_linear_and_task_arithmetic_by_hand():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    assert torch.allclose(mm.linear([a, b], [1.0, 3.0]), torch.tensor([2.5, -1.0]))
    assert torch.allclose(
        mm.linear([a, b], [1.0, 3.0], normalize=False), torch.tensor([10.0, -4.0])
    )
    # base + lambda * (0.5*(a-base) + 1*(b-base)), base = 0
    out = mm.task_arithmetic(torch.zeros(2), [a, b], [0.5, 1.0], lam=2.0)
    assert torch.allclose(out, torch.tensor([7.0, -2.0]))


def test_slerp_by_hand():
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])  # 90 degrees apart
    # sin(pi/4)/sin(pi/2) = 1/sqrt(2) on both: (1/sqrt2, 2/sqrt2)
    assert torch.allclose(mm.slerp(0.5, x, y), torch.tensor([1.0, 2.0]) / math.sqrt(2))
    assert torch.allclose(mm.slerp(0.0, x, y), x) and torch.allclose(mm.slerp(1.0, x, y), y)
    # collinear: plain lerp
    assert torch.allclose(mm.slerp(0.25, x, 3 * x), torch.tensor([1.5, 0.0]))


def test_ties_by_hand():
    base = torch.zeros(4)
    d1 = torch.tensor([3.0, -1.0, 0.5, 2.0])
    d2 = torch.tensor([-1.0, -2.0, 0.2, -4.0])
    # trim to density 0.5: d1 keeps 3, 2; d2 keeps -2, -4
    # weighted sums (w=1,1): [3, -2, 0, -2] -> signs +, -, + (0 counts +), -
    # entry 0: only d1 (+3) agrees -> 3/1; entry 1: d2 -2 -> -2; entry 2: none -> 0; entry 3: d2 -4
    out = mm.ties(base, [d1, d2], [1.0, 1.0], [0.5, 0.5])
    assert torch.allclose(out, torch.tensor([3.0, -2.0, 0.0, -4.0]))
    # without normalisation entry 0 is the sum of agreeing weighted deltas: 0.5*3
    out = mm.ties(base, [d1, d2], [0.5, 1.0], [0.5, 0.5], normalize=False)
    assert torch.allclose(out, torch.tensor([1.5, -2.0, 0.0, -4.0]))


def test_random_drop_keeps_density_and_l1_norm():
    delta = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    kept = mm.random_drop(delta, 0.3, torch.Generator().manual_seed(1))
    nonzero = kept != 0
    assert abs(nonzero.float().mean().item() - 0.3) < 0.01  # Bernoulli(0.3) mask
    assert torch.allclose(kept.abs().sum(), delta.abs().sum())  # L1 rescale (mergekit)
    scale = (kept[nonzero] / delta[nonzero]).unique()
    assert abs(scale.mean().item() - 1 / 0.3) < 0.05  # about the paper's 1/density
    assert torch.equal(mm.random_drop(delta, 1.0), delta)
    # dare at density 1 is task arithmetic
    base, other = torch.randn(5), torch.randn(5)
    assert torch.allclose(
        mm.dare_linear(base, [other], [0.7], [1.0]), mm.task_arithmetic(base, [other], [0.7])
    )


def test_gradients_and_filters_follow_mergekit():
    assert evaluate_setting("x", [0.0, 1.0, 0.0], 0.25) == pytest.approx(0.5)
    setting = [{"filter": "mlp", "value": 0.2}, {"value": [0.0, 1.0]}]
    assert evaluate_setting("model.layers.1.mlp.up_proj.weight", setting, 1.0) == 0.2
    assert evaluate_setting("model.layers.1.self_attn.q_proj.weight", setting, 1.0) == 1.0
    assert evaluate_setting("x", [{"filter": "mlp", "value": 1}], 0.0) is None


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    for i in range(2):
        tok = tiny_tokenizer()
        tiny_model("llama", vocab_size=len(tok), seed=i).save_pretrained(root / f"m{i}")
        tok.save_pretrained(root / f"m{i}")
    save_tiny(root / "gpt2", "gpt2")
    tiny_model("llama", vocab_size=300).save_pretrained(root / "small_vocab")
    return root


def linear_config(root, out, **extra):
    models = [{"model": str(root / f"m{i}"), "parameters": {"weight": 0.5}} for i in range(2)]
    return {"merge_method": "linear", "models": models, "output_dir": str(out), **extra}


def test_sharded_output_loads_with_transformers(models, tmp_path):
    out = tmp_path / "merged"
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(linear_config(models, out, max_shard_size="40KB")))
    main([str(config)])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    merged = AutoModelForCausalLM.from_pretrained(out)
    inputs = [AutoModelForCausalLM.from_pretrained(models / f"m{i}") for i in range(2)]
    for name, p in merged.state_dict().items():
        expected = (inputs[0].state_dict()[name] + inputs[1].state_dict()[name]) / 2
        torch.testing.assert_close(p, expected, atol=1e-6, rtol=0)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "im_start" in tok.chat_template
    assert yaml.safe_load((out / "merge_config.yaml").read_text())["merge_method"] == "linear"


def test_positional_output_dir_and_out_dtype(models, tmp_path):
    config = tmp_path / "merge.yaml"
    raw = linear_config(models, "")
    del raw["output_dir"]
    config.write_text(yaml.safe_dump({**raw, "dtype": "bfloat16"}))
    main([str(config), str(tmp_path / "out")])
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def dare_config(root, out, seed):
    models = [{"model": str(root / "m1"), "parameters": {"weight": 1.0, "density": 0.5}}]
    base = str(root / "m0")
    return {"merge_method": "dare_linear", "base_model": base, "models": models, "seed": seed,
            "output_dir": str(out)}  # fmt: skip


def test_dare_is_seeded(models, tmp_path):
    runs = {}
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        merge_models(parse_merge_config(dare_config(models, tmp_path / name, seed), "t"))
        runs[name] = load_file(tmp_path / name / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(runs["a"][key], runs["b"][key])
    assert not torch.equal(runs["a"][key], runs["c"][key])


def test_mismatch_names_the_first_tensor(models, tmp_path):
    raw = linear_config(models, tmp_path / "out")
    raw["models"][1]["model"] = str(models / "gpt2")
    with pytest.raises(
        UserError, match=r"gpt2: first mismatching tensor model.embed_tokens.weight: missing"
    ):
        merge_models(parse_merge_config(raw, "t"))
    raw["models"][1]["model"] = str(models / "small_vocab")
    with pytest.raises(
        UserError, match=r"small_vocab: first mismatching tensor \S+: shape \[300, 64\]"
    ):
        merge_models(parse_merge_config(raw, "t"))
    raw["models"][0]["model"] = str(models / "gpt2")
    raw["models"][1]["model"] = str(models / "m0")
    with pytest.raises(UserError, match=r"m0: first mismatching tensor transformer.h.0.attn"):
        merge_models(parse_merge_config(raw, "t"))
    assert not (tmp_path / "out").exists()


def test_failure_midway_leaves_no_output(models, tmp_path):
    out = tmp_path / "out"
    raw = linear_config(models, out, max_shard_size="40KB")  # shards get written before it fails
    only_some = [{"filter": f, "value": 1.0} for f in ("lm_head", "embed", "layers")]
    raw["models"][1]["parameters"]["weight"] = only_some  # model.norm.weight (last) has none
    raw["parameters"] = {}
    with pytest.raises(UserError, match="missing required parameter weight for tensor model.norm"):
        merge_models(parse_merge_config(raw, "t"))
    assert list(tmp_path.iterdir()) == []  # no output, no temp folder
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(UserError):
        merge_models(parse_merge_config(raw, "t"))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # an old output is left as it was


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"merge_method": "frankenmerge"}, "merge_method must be one of"),
        ({"merge_method": "ties"}, "ties needs base_model"),
        ({"parameters": {"densty": 0.5}}, "did you mean 'density'"),
        ({"tokenizer_source": "union"}, "union is not supported"),
        ({"base_model": "org/model+lora"}, "fold the adapter first"),
        ({"mdoels": []}, "unknown key 'mdoels'"),
    ],
)
def test_config_errors_name_the_key(models, change, message):
    raw = linear_config(models, "out")
    raw = {**raw, **change}
    if "densty" in str(change):
        raw["merge_method"], raw["base_model"] = "ties", raw["models"][0]["model"]
    with pytest.raises(UserError, match=message):
        parse_merge_config(raw, "merge.yaml")


# ----------------------------------------------------------------------------- adapter fold


def test_adapter_fold_gives_peft_logits(tmp_path):
    base_dir = save_tiny(tmp_path / "base", "llama")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(base, lora)
    run = tmp_path / "run"
    peft_model.save_pretrained(run / "final")
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(run / "final")
    (run / "config.yaml").write_text("adapter: qlora\n")
    main([f"adapter={run}", f"output_dir={tmp_path / 'folded'}", "max_shard_size=100KB"])
    folded = AutoModelForCausalLM.from_pretrained(tmp_path / "folded").eval()
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), run / "final"
    ).eval()
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        expected, got, before = reference(ids).logits, folded(ids).logits, plain(ids).logits
    assert (expected - got).abs().max() < 1e-5
    assert (expected - before).abs().max() > 1e-3  # the adapter does change the logits
    assert (tmp_path / "folded" / "model.safetensors.index.json").is_file()
    assert AutoTokenizer.from_pretrained(tmp_path / "folded").chat_template


def test_adapter_fold_errors(models, tmp_path):
    with pytest.raises(UserError, match="not a peft adapter"):
        main([f"adapter={models / 'm0'}", f"output_dir={tmp_path / 'x'}"])
    with pytest.raises(UserError, match="never 4-bit"):
        main([f"adapter={models / 'm0'}", f"output_dir={tmp_path / 'x'}", "dtype=nf4"])
    with pytest.raises(UserError, match="output_dir= is required"):
        main([f"adapter={models / 'm0'}"])


def test_cli_argument_errors(tmp_path):
    with pytest.raises(UserError, match="unexpected argument 'extra'"):
        main(["merge.yaml", str(tmp_path / "out"), "extra"])
    with pytest.raises(UserError, match="give a merge CONFIG.yaml or adapter=PATH"):
        main(["output_dir=x"])
    with pytest.raises(UserError, match="unknown key 'sed'"):
        (tmp_path / "m.yaml").write_text("merge_method: linear\nmodels: [{model: a}]\n")
        main([str(tmp_path / "m.yaml"), "sed=1"])
