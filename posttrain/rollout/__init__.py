"""Rollouts for online RL: batched KV-cache sampling (`sampler`) and reward sources (`rewards`)."""

from posttrain.rollout.sampler import Rollout, encode_prompts, sample

__all__ = ["Rollout", "encode_prompts", "sample"]
