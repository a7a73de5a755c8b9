"""`posttrain export MODEL_OR_RUN format=... quant=... output_dir=DIR`: ship a model.

Formats:
- `safetensors`: the full model (an adapter is merged into its base first), sharded at
  `max_shard_size`, in `dtype`, with the tokenizer, its chat template and a
  `generation_config.json` whose `eos_token_id` lists every stop token (eos and end-of-turn).
- `gguf`: one GGUF file (`gguf_writer.py`) in F32, F16 or Q8_0; K-quants such as Q4_K_M go
  through llama.cpp's own quantizer (`llama-cpp-python`) from an F32 intermediate.
- `ollama`: the GGUF plus a Modelfile (`ollama.py`) with the chat template and stop tokens.

With `verify=true` (the default) the written model is read back and compared with the source on
a few prompts (`verify.py`); the numbers go to `export.json`. Everything is written into a temp
folder that replaces `output_dir` only on success, so a failure leaves nothing behind.

Simplified on purpose: the model is loaded whole in fp32 on CPU (fine up to a few billion
parameters); GGUF is written as one file.
"""

from __future__ import annotations

import copy
import ctypes
import importlib.util
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig

from posttrain.config import check, help_text, load_config, opt
from posttrain.errors import UserError
from posttrain.io import atomic_dir, write_json, write_text_atomic
from posttrain.modeling.inference import adapter_base, load_for_inference, resolve_model_path

FORMATS = ("safetensors", "gguf", "ollama")
DIRECT_QUANTS = ("f32", "f16", "q8_0")  # written by our converter
K_QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
            "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}  # fmt: skip
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ExportConfig:
    model: str = opt("", "model folder, run directory, adapter folder or hub id (or 1st argument)")
    format: str = opt("gguf", "output format: " + ", ".join(FORMATS))
    quant: str = opt("f16", "GGUF weights: f32, f16, q8_0, q4_k_m/q5_k_m/q6_k (llama-cpp-python)")
    output_dir: str = opt("", "output folder; default exports/<model name>-<format>")
    max_shard_size: str = opt("5GB", "safetensors: largest shard file (e.g. 500MB, 5GB)")
    dtype: str = opt("auto", "safetensors: auto (the checkpoint's), float32, float16, bfloat16")
    verify: bool = opt(True, "read the export back and compare predictions with the source")
    trust_remote_code: bool = opt(False, "allow code from the model repo to run")

    def validate(self) -> None:
        check(bool(self.model), "model", "is required (a model folder, run or hub id)")
        check(self.format in FORMATS, "format", f"must be one of {', '.join(FORMATS)}")
        quants = (*DIRECT_QUANTS, *K_QUANTS)
        check(self.quant in quants, "quant", f"must be one of {', '.join(quants)}")
        dtypes = ("auto", *DTYPES)
        check(self.dtype in dtypes, "dtype", f"must be one of {', '.join(dtypes)}")


# ----------------------------------------------------------------------------- pieces


def source_config(where: str, trust_remote_code: bool):
    """The architecture config of a model folder or of an adapter's base (no weights loaded)."""
    try:
        return AutoConfig.from_pretrained(
            adapter_base(where) or where, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"{where}: cannot read config.json: {str(exc).splitlines()[0]}") from None


def checkpoint_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype if dtype in DTYPES.values() else torch.float32


def eos_ids(model, tokenizer) -> list[int]:
    """Every stop id: the generation config's eos ids, the tokenizer's eos, end-of-turn tokens."""
    from posttrain.ship.gguf_writer import stop_tokens

    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    names = stop_tokens(tokenizer, [i for i in configured if i is not None])
    return [tokenizer.convert_tokens_to_ids(n) for n in names]


def cast_weights(model, dtype: torch.dtype) -> dict:
    """A cast copy of the weights, tied duplicates left out (casting the model itself would
    also round its rotary buffers, which are not saved but are used by verification)."""
    weights, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        weights[name] = tensor.to(dtype)
    return weights


def write_safetensors(cfg: ExportConfig, model, tokenizer, config, out: Path) -> dict:
    dtype = checkpoint_dtype(config) if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    model.save_pretrained(
        out, state_dict=cast_weights(model, dtype), max_shard_size=cfg.max_shard_size
    )
    config_file = out / "config.json"
    saved = json.loads(config_file.read_text())
    saved["dtype"] = str(dtype).removeprefix("torch.")
    write_json(config_file, saved)
    tokenizer.save_pretrained(out)
    stops = eos_ids(model, tokenizer)
    generation = copy.deepcopy(model.generation_config)  # keeps the source's sampling defaults
    if stops:
        generation.eos_token_id = stops if len(stops) > 1 else stops[0]
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(out)
    return {"dtype": str(dtype).removeprefix("torch."), "eos_token_id": stops}


def quantize_with_llama_cpp(source: Path, target: Path, quant: str) -> None:
    """A K-quant GGUF from an F32 one, with llama.cpp's quantizer."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_QUANTS[quant])
    status = llama_cpp.llama_model_quantize(
        str(source).encode(), str(target).encode(), ctypes.byref(params)
    )
    if status != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {quant} (status {status})")


def write_gguf_file(cfg: ExportConfig, model, tokenizer, name: str, out: Path) -> Path:
    from posttrain.ship.gguf_writer import write_gguf

    target = out / f"{name}-{cfg.quant.upper()}.gguf"
    if cfg.quant in DIRECT_QUANTS:
        return write_gguf(model, tokenizer, target, cfg.quant, name, eos_ids(model, tokenizer))
    intermediate = out / f".{name}-F32.gguf"
    write_gguf(model, tokenizer, intermediate, "f32", name, eos_ids(model, tokenizer))
    quantize_with_llama_cpp(intermediate, target, cfg.quant)
    intermediate.unlink()
    return target


# ----------------------------------------------------------------------------- verification


def verify_safetensors(model, tokenizer, out: Path, dtype: str) -> dict:
    from transformers import AutoModelForCausalLM

    from posttrain.ship import verify

    texts = verify.prompt_texts(tokenizer)
    ids = [verify.encode(tokenizer, t) for t in texts]
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    result = verify.compare(
        [verify.hf_logits(model, s) for s in ids], [verify.hf_logits(reloaded, s) for s in ids]
    )
    result["tokenization_match"] = True  # the tokenizer files are copied as they are
    quant = {"float32": "f32", "float16": "f16"}.get(dtype, dtype)
    verify.judge("safetensors", result, quant)
    return {"transformers": result}


# ----------------------------------------------------------------------------- command


def export(cfg: ExportConfig) -> dict:
    """Run the export described by `cfg`; returns the report also written to export.json."""
    where = resolve_model_path(cfg.model)
    config = source_config(where, cfg.trust_remote_code)
    if cfg.format != "safetensors":
        from posttrain.ship.gguf_writer import check_supported

        check_supported(config)
        if cfg.quant in K_QUANTS and importlib.util.find_spec("llama_cpp") is None:
            raise UserError(
                f"quant={cfg.quant} uses llama.cpp's quantizer: pip install llama-cpp-python "
                f"(or use quant=f32, f16 or q8_0)"
            )
    name = Path(cfg.model.rstrip("/")).name or "model"
    output_dir = Path(cfg.output_dir or f"exports/{name}-{cfg.format}")
    model, tokenizer = load_for_inference(cfg.model, cfg.trust_remote_code)
    model = model.float().cpu().eval()
    report = {"source": cfg.model, "format": cfg.format, "config": asdict(cfg)}
    with atomic_dir(output_dir) as out:
        if cfg.format == "safetensors":
            report.update(write_safetensors(cfg, model, tokenizer, config, out))
            if cfg.verify:
                report["verification"] = verify_safetensors(model, tokenizer, out, report["dtype"])
        else:
            gguf_path = write_gguf_file(cfg, model, tokenizer, name, out)
            report["file"] = gguf_path.name
            report["eos_token_id"] = eos_ids(model, tokenizer)
            if cfg.format == "ollama":
                write_modelfile(out, gguf_path, tokenizer, model)
            if cfg.verify:
                from posttrain.ship.verify import verify_gguf

                report["verification"] = verify_gguf(
                    model, tokenizer, gguf_path, cfg.quant, report["eos_token_id"]
                )
        write_json(out / "export.json", report)
    report["output_dir"] = str(output_dir)
    return report


def write_modelfile(out: Path, gguf_path: Path, tokenizer, model) -> None:
    from posttrain.ship.gguf_writer import adds_token, stop_tokens
    from posttrain.ship.ollama import modelfile

    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    stops = stop_tokens(tokenizer, [i for i in configured if i is not None])
    bos_added = adds_token(tokenizer, tokenizer.bos_token_id, first=True)
    write_text_atomic(out / "Modelfile", modelfile(gguf_path.name, tokenizer, stops, bos_added))


def summary(report: dict) -> str:
    lines = [f"exported {report['source']} as {report['format']} to {report['output_dir']}"]
    verification = report.get("verification") or {}
    for reader in ("transformers", "llama_cpp"):
        result = verification.get(reader)
        if isinstance(result, dict):
            extra = (
                f", greedy reply match {result['greedy_match']}" if "greedy_match" in result else ""
            )
            lines.append(
                f"  {reader}: max logit diff {result['max_logit_diff']:.3g}, "
                f"top-1 agreement {result['top1_agreement']:.1%}{extra}"
            )
        elif isinstance(result, str):
            lines.append(f"  {reader}: {result}")
    for warning in verification.get("warnings", []):
        lines.append(f"  warning: {warning}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> ExportConfig:
    """`MODEL key=value ...`: the first argument without '=' is the model."""
    positional = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    if len(positional) > 1:
        raise UserError(f"unexpected arguments {positional[1:]}; expected MODEL key=value ...")
    if positional:
        overrides.insert(0, f"model={json.dumps(positional[0])}")
    return load_config(ExportConfig, None, overrides)


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:
        print(help_text(ExportConfig, "export").replace("[CONFIG.yaml]", "MODEL_OR_RUN"))
        return
    print(summary(export(parse_args(argv))), file=sys.stdout)
