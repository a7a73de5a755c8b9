"""posttrain: post-train causal language models (SFT, preferences, RL, PEFT, abliteration, shipping).

The Python API mirrors the CLI: `posttrain.sft(cfg)` takes the command's dataclass or a dict.
"""

import os

__version__ = "0.1.0"

# transformers (5.2x) loads models with `use_kernels=True` by default: layers it knows get
# "hub kernels", code fetched from the Hugging Face Hub at load time, and every train()/eval()
# switch re-runs the kernelizing (9 ms per switch on the tiny world's model, twice per RL step).
# Code from the Hub runs only when asked (as with trust_remote_code): USE_HUB_KERNELS=YES does.
os.environ.setdefault("USE_HUB_KERNELS", "NO")


def sft(cfg):
    """Supervised fine-tuning; `cfg` is an `SFTConfig` or a dict (see `posttrain sft --help`)."""
    from posttrain.train.sft import sft as run

    return run(cfg)


def dpo(cfg):
    """Preference tuning (DPO family); `cfg` is a `DPOConfig` or a dict (`posttrain dpo --help`)."""
    from posttrain.train.dpo import dpo as run

    return run(cfg)


def reward(cfg):
    """Train a reward model; `cfg` is a `RewardConfig` or a dict (see `posttrain reward --help`)."""
    from posttrain.train.reward import reward as run

    return run(cfg)


def grpo(cfg):
    """Online RL with group advantages; `cfg` is a `GRPOConfig` or a dict (`posttrain grpo --help`)."""
    from posttrain.train.grpo import grpo as run

    return run(cfg)


def ppo(cfg):
    """RLHF with PPO; `cfg` is a `PPOConfig` or a dict (`posttrain ppo --help`)."""
    from posttrain.train.ppo import ppo as run

    return run(cfg)


def evaluate_model(model: str, **kwargs):
    """Evaluate a model folder or run on the tiny world; keys as in `posttrain eval --help`."""
    from posttrain.config import build_config
    from posttrain.evaluate.cli import EvalConfig, run_eval

    return run_eval(build_config(EvalConfig, {"model": model, **kwargs}))
