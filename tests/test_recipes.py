"""Every shipped recipe loads and validates with its command's config class."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.config import load_config
from posttrain.train.grpo import GRPOConfig
from posttrain.train.ppo import PPOConfig
from posttrain.train.reward import RewardConfig
from posttrain.train.sft import SFTConfig

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
CLASSES = {"sft": SFTConfig, "reward": RewardConfig, "grpo": GRPOConfig, "ppo": PPOConfig}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(path):
    cls = CLASSES[path.name.split("_")[0]]
    cfg = load_config(cls, str(path), ["model=some/model", "data.train=train.jsonl"])
    assert cfg.model == "some/model" and cfg.lr > 0
