"""posttrain: post-train causal language models (SFT, preferences, RL, PEFT, abliteration, shipping).

The Python API mirrors the CLI: `posttrain.sft(cfg)` takes the command's dataclass or a dict.
"""

__version__ = "0.1.0"
