"""`posttrain <command> [CONFIG.yaml] [key=value ...]`: dispatch only.

Exit codes: 0 success, 2 user error (one line on stderr starting `error:`), 1 internal
failure (traceback), 130 interrupted (a checkpoint was saved; re-run to resume).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from posttrain.config import help_text, load_config
from posttrain.errors import UserError

# command -> (module, config class, function, one-line description)
TRAINING = {
    "sft": (
        "posttrain.train.sft",
        "SFTConfig",
        "sft",
        "supervised fine-tuning (full or any adapter)",
    ),
    "dpo": (
        "posttrain.train.dpo",
        "DPOConfig",
        "dpo",
        "direct preference optimisation: dpo, robust, ipo, hinge, simpo, cpo, orpo, kto",
    ),
    "grpo": (
        "posttrain.train.grpo",
        "GRPOConfig",
        "grpo",
        "online RL with group advantages: GRPO, RLOO, Dr. GRPO (verifiable rewards or a reward model)",
    ),
    "ppo": (
        "posttrain.train.ppo",
        "PPOConfig",
        "ppo",
        "RLHF with PPO: value head, KL penalty to the reference, GAE, adaptive KL control",
    ),
    "reward": (
        "posttrain.train.reward",
        "RewardConfig",
        "reward",
        "train a reward model (pairs or ranked lists); `reward score` uses one",
    ),
}
# command -> (module, function taking argv, one-line description)
TOOLS = {
    "plot": ("posttrain.plot", "main", "plot a run's loss/lr/throughput curves to a PNG"),
    "eval": ("posttrain.evaluate.cli", "main", "evaluate a model or run on the tiny world's tests"),
    "world": (
        "posttrain.world.cli",
        "main",
        "write the tiny world's datasets or pretrain its base",
    ),
    "demo": ("posttrain.demo", "main", "the whole story on the tiny world, with a report"),
    "export": (
        "posttrain.ship.export",
        "main",
        "export a model/run/adapter to safetensors, GGUF or Ollama, verified",
    ),
    "serve": (
        "posttrain.serve.cli",
        "main",
        "serve a model (+ LoRA adapters) on an OpenAI-compatible /v1 API",
    ),
    "abliterate": (
        "posttrain.steer.cli",
        "main",
        "find a behaviour's direction (refusal) and erase it: report, directions, edited model",
    ),
    "steer": (
        "posttrain.steer.steer_cli",
        "main",
        "add or remove any contrastive behaviour's direction (two prompt sets)",
    ),
    "merge": (
        "posttrain.ship.merge",
        "main",
        "merge fine-tunes (mergekit YAML) or fold an adapter into its base",
    ),
}


def usage() -> str:
    lines = ["usage: posttrain <command> [CONFIG.yaml] [key=value ...]", "", "commands:"]
    for name, entry in {**TRAINING, **TOOLS}.items():
        lines.append(f"  {name:<10} {entry[-1]}")
    lines.append("\n`posttrain <command> --help` lists the command's keys.")
    return "\n".join(lines)


def split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """The optional YAML path (first argument without '=') and the overrides."""
    path = None
    overrides = []
    for arg in argv:
        if "=" not in arg and path is None and arg.endswith((".yaml", ".yml")):
            path = arg
        elif "=" in arg:
            overrides.append(arg)
        else:
            raise UserError(f"unexpected argument {arg!r}; expected CONFIG.yaml or key=value")
    return path, overrides


def run_training(name: str, argv: list[str]) -> None:
    module_name, cls_name, fn_name, _ = TRAINING[name]
    module = importlib.import_module(module_name)
    cls = getattr(module, cls_name)
    if "-h" in argv or "--help" in argv:
        print(help_text(cls, name))
        return
    path, overrides = split_args(argv)
    cfg = load_config(cls, path, overrides)
    getattr(module, fn_name)(cfg)


def dispatch(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name == "reward" and rest[:1] == ["score"]:
        importlib.import_module("posttrain.train.reward").score_main(rest[1:])
    elif name in TRAINING:
        run_training(name, rest)
    elif name in TOOLS:
        module_name, fn_name, _ = TOOLS[name]
        getattr(importlib.import_module(module_name), fn_name)(rest)
    else:
        known = ", ".join([*TRAINING, *TOOLS])
        raise UserError(f"unknown command {name!r}; commands: {known}")


def quiet_noisy_loggers() -> None:
    """bitsandbytes warns on every import on AVX512-BF16 CPUs that an optional hub kernel is missing."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    quiet_noisy_loggers()
    try:
        dispatch(sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `posttrain sft --help | head`: the reader went away
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
