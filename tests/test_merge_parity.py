"""Parity with mergekit (dev dependency): the same YAML gives the same tensors (1e-6, fp32).

linear, slerp (with mergekit's filters and layer gradients), task_arithmetic and ties are
compared end to end through `mergekit.merge.run_merge`. DARE's drop is random: mergekit draws
from the global torch RNG in its task graph's order, we from a per-tensor generator (see
posttrain/ship/merge.py). So DARE is checked (a) end to end at density 1, where it reduces to
the deterministic method, and (b) per tensor, where mergekit's method with the global RNG
seeded s and ours with a generator seeded s must give bit-identical results.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain.ship import merge_methods as mm
from posttrain.ship.merge import merge_models
from posttrain.ship.merge_config import parse_merge_config
from tests.tiny import tiny_model, tiny_tokenizer

mergekit = pytest.importorskip("mergekit")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.merge_methods import registry  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

T_SETTING = [
    {"filter": "self_attn", "value": [0, 0.5, 1]},
    {"filter": "mlp", "value": [1, 0.3]},
    {"value": 0.4},
]
CONFIGS = {
    "linear": {
        "models": [
            {"model": "m0", "parameters": {"weight": 0.5}},
            {"model": "m1", "parameters": {"weight": 0.3}},
            {"model": "m2", "parameters": {"weight": [0.1, 0.4]}},  # a layer gradient
        ],
    },
    "slerp": {
        "base_model": "m0",
        "models": [{"model": "m0"}, {"model": "m1"}],
        "parameters": {"t": T_SETTING},
    },
    "task_arithmetic": {
        "base_model": "m0",
        "models": [
            {"model": "m1", "parameters": {"weight": 0.6}},
            {"model": "m2", "parameters": {"weight": 0.4}},
        ],
        "parameters": {"lambda": 0.8},
    },
    "ties": {
        "base_model": "m0",
        "models": [
            {"model": "m1", "parameters": {"weight": [0.2, 0.8], "density": 0.5}},
            {"model": "m2", "parameters": {"weight": 0.5, "density": 0.7}},
        ],
    },
    "dare_linear": {
        "base_model": "m0",
        "models": [
            {"model": "m1", "parameters": {"weight": 0.7, "density": 1.0}},
            {"model": "m2", "parameters": {"weight": 0.3, "density": 1.0}},
        ],
    },
    "dare_ties": {
        "base_model": "m0",
        "models": [
            {"model": "m1", "parameters": {"weight": 0.7, "density": 1.0}},
            {"model": "m2", "parameters": {"weight": 0.3, "density": 1.0}},
        ],
        "parameters": {"normalize": True},
    },
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    tok = tiny_tokenizer()
    for i in range(3):
        tiny_model("llama", vocab_size=len(tok), seed=i).save_pretrained(root / f"m{i}")
        tok.save_pretrained(root / f"m{i}")
    return root


def with_paths(config: dict, root) -> dict:
    """The config with model names m0.. replaced by their folders (YAML round trip = a copy)."""
    text = yaml.safe_dump(config)
    for i in range(3):
        text = text.replace(f"m{i}", str(root / f"m{i}"))
    return yaml.safe_load(text)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_same_tensors_as_mergekit(models, tmp_path, method):
    config = with_paths({"merge_method": method, "dtype": "float32", **CONFIGS[method]}, models)
    options = MergeOptions(lazy_unpickle=False, copy_tokenizer=False, random_seed=0)
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mk"), options)
    merge_models(parse_merge_config({**config, "output_dir": str(tmp_path / "ours")}, "parity"))
    theirs = load_file(tmp_path / "mk" / "model.safetensors")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype == torch.float32
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("normalize", [False, True])
def test_dare_masks_match_mergekit_for_the_same_rng_state(method, normalize):
    base, a, b = (torch.randn(48, 32, generator=torch.Generator().manual_seed(i)) for i in range(3))
    a, b = base + 0.1 * a, base + 0.1 * b
    weights, densities = [0.6, 0.4], [0.3, 0.7]
    torch.manual_seed(123)
    group = TensorGroup.from_tensors([base, a, b], base_index=0)
    parameters = {"weight": weights, "density": densities, "normalize": normalize}
    (theirs,) = registry.get(method)([group], parameters=parameters)
    fn = mm.dare_ties if method == "dare_ties" else mm.dare_linear
    generator = torch.Generator().manual_seed(123)
    ours = fn(base, [a, b], weights, densities, generator, normalize=normalize)
    assert torch.equal(ours, theirs)
    fresh = fn(base, [a, b], weights, densities, torch.Generator().manual_seed(7))
    assert not torch.equal(fresh, ours)  # the mask really is random
