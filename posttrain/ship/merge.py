"""`posttrain merge`: merge fine-tunes of one base (mergekit YAML), or fold an adapter into its base.

    posttrain merge CONFIG.yaml [output_dir=DIR] [seed=N] [max_shard_size=2GB] [dtype=...]
    posttrain merge CONFIG.yaml DIR
    posttrain merge adapter=RUN_OR_ADAPTER output_dir=DIR [dtype=float32|bfloat16|float16]

A model merge streams tensor by tensor: for each tensor name of the base (or first) model,
read that tensor from every input's safetensors shards, merge it (`merge_methods`), cast it
and hand it to a `ShardWriter`. Peak memory is about one tensor per input plus one output
shard. Before anything is written, every input is checked against the base: the first
missing, extra or differently shaped tensor is named in a `UserError`. The output folder
is written to a temp folder and renamed, so a failure leaves nothing behind. It holds the
sharded weights, the base's config.json and generation_config.json, the tokenizer and chat
template of `tokenizer_source` (default: the base), and `merge_config.yaml`.

Precision: every method computes in fp32 (fp64 stays fp64). The output dtype is `out_dtype`,
else `dtype`, else each tensor's own dtype in the base. (mergekit also *computes* in
`dtype`; for 16-bit `dtype` our fp32 arithmetic is slightly more exact.)

DARE seeding: the drop masks of tensor NAME come from a torch.Generator seeded with
`seed` (top-level key or `parameters.seed`, default 0) and crc32(NAME), drawn for the
inputs in order. So a seed gives the same merge whatever the shard layout or tensor order.
mergekit instead seeds the global torch RNG once (`--random-seed`) and draws in its task
graph's order, so its masks differ from ours; per tensor, the same generator state gives
bit-identical masks (tests/test_merge_parity.py).

Simplified on purpose: see merge_config.py for the mergekit features we refuse.
"""

from __future__ import annotations

import json
import shutil
import sys
import zlib
from pathlib import Path

import torch
import yaml

from posttrain.config import parse_value, read_yaml
from posttrain.errors import UserError
from posttrain.io import atomic_dir
from posttrain.modeling.inference import adapter_base, resolve_model_path
from posttrain.ship import merge_methods as mm
from posttrain.ship.merge_config import (
    LAYER,
    MergeSpec,
    layer_t,
    parse_merge_config,
    tensor_parameters,
)
from posttrain.ship.shards import ShardWriter, TensorSource, parse_size

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPES |= {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
SAME_BASE = "merged models must share one architecture and shape (fine-tunes of one base)"
OVERRIDES = ("output_dir", "seed", "max_shard_size", "dtype", "out_dtype")
USAGE = __doc__.split("\n\n")[1]


# ----------------------------------------------------------------------------- locating inputs


def local_model(ref: str) -> Path:
    """A local model folder for a YAML reference: a folder, a run directory, or a hub id."""
    where = resolve_model_path(ref)
    if adapter_base(where) is not None:
        raise UserError(
            f"{ref} is a peft adapter; fold it first with "
            f"`posttrain merge adapter={ref} output_dir=DIR` and merge that folder"
        )
    if Path(where).is_dir():
        return Path(where)
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.safetensors", "*.json", "*.jinja", "tokenizer.model", "merges.txt"]
        return Path(snapshot_download(ref, allow_patterns=patterns))
    except Exception as exc:
        raise UserError(f"{ref}: cannot download: {str(exc).splitlines()[0]}") from None


def check_compatible(spec: MergeSpec, sources: list[TensorSource]) -> None:
    """Raise a UserError naming the first tensor where an input differs from the donor."""
    donor = sources[spec.donor]
    donor_ref = spec.inputs[spec.donor].model
    for model, source in zip(spec.inputs, sources):
        if source is donor:
            continue
        for name in donor.names():
            if name not in source.files:
                problem = f"missing (it is in {donor_ref})"
            elif source.shape(name) != donor.shape(name):
                problem = f"shape {source.shape(name)} vs {donor.shape(name)} in {donor_ref}"
            else:
                continue
            raise UserError(
                f"{model.model}: first mismatching tensor {name}: {problem}; {SAME_BASE}"
            )
        extra = [name for name in source.names() if name not in donor.files]
        if extra:
            raise UserError(
                f"{model.model}: first mismatching tensor {extra[0]}: not in {donor_ref}; {SAME_BASE}"
            )


# ----------------------------------------------------------------------------- merging


def merge_tensor(spec: MergeSpec, name: str, tensors: list[torch.Tensor], t: float):
    """One merged tensor (fp32) from every input's tensor `name`."""
    shared, per_input = tensor_parameters(spec, name, t)
    if spec.method == "linear":
        weights = [p["weight"] for p in per_input]
        return mm.linear(tensors, weights, normalize=bool(shared["normalize"]))
    base = tensors[spec.base_index]
    if spec.method == "slerp":
        return mm.slerp(float(shared["t"]), base, tensors[1 - spec.base_index])
    others = [i for i in range(len(tensors)) if i != spec.base_index]
    inputs = [tensors[i] for i in others]
    weights = [float(per_input[i]["weight"]) for i in others]
    options = {"normalize": bool(shared["normalize"]), "lam": float(shared["lambda"])}
    if spec.method == "task_arithmetic":
        return mm.task_arithmetic(base, inputs, weights, **options)
    densities = [float(per_input[i]["density"]) for i in others]
    options["rescale"] = bool(shared["rescale"])
    if spec.method == "ties":
        return mm.ties(base, inputs, weights, densities, **options)
    generator = torch.Generator().manual_seed(tensor_seed(spec.seed, name))
    merge = mm.dare_ties if spec.method == "dare_ties" else mm.dare_linear
    return merge(base, inputs, weights, densities, generator, **options)


def tensor_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def output_dtype(spec: MergeSpec, stored: torch.dtype) -> torch.dtype:
    name = spec.out_dtype or spec.dtype
    if name is None:
        return stored
    if name not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def merge_models(spec: MergeSpec) -> Path:
    """Run the merge described by `spec` into `spec.output_dir`; returns the output folder."""
    if not spec.output_dir:
        raise UserError("output_dir= is required (or give it as the second argument)")
    folders = [local_model(m.model) for m in spec.inputs]
    sources = [TensorSource(f) for f in folders]
    check_compatible(spec, sources)
    names = sources[spec.donor].names()
    layers = {int(m.group(1)) for n in names if (m := LAYER.search(n))}
    num_layers = max(layers) + 1 if layers else 1
    output_dtype(spec, torch.float32)  # fail on a bad dtype before any work
    with atomic_dir(spec.output_dir) as tmp:
        writer = ShardWriter(tmp, parse_size(spec.max_shard_size))
        for name in names:
            tensors = [source.get(name) for source in sources]
            merged = merge_tensor(spec, name, tensors, layer_t(name, num_layers))
            writer.add(name, merged.to(output_dtype(spec, tensors[spec.donor].dtype)))
            del tensors, merged
        shards = writer.finish()
        copy_model_files(spec, folders, tmp)
    print(
        f"merged {len(names)} tensors of {len(sources)} models ({spec.method}) into "
        f"{spec.output_dir} ({shards} shard{'s' if shards > 1 else ''})",
        file=sys.stderr,
    )
    return Path(spec.output_dir)


def copy_model_files(spec: MergeSpec, folders: list[Path], out: Path) -> None:
    """config.json and generation_config.json from the base, tokenizer from tokenizer_source."""
    donor = folders[spec.donor]
    config = json.loads((donor / "config.json").read_text())
    dtype = spec.out_dtype or spec.dtype
    if dtype:
        key = "torch_dtype" if "torch_dtype" in config else "dtype"
        config[key] = str(DTYPES[dtype]).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (donor / "generation_config.json").is_file():
        shutil.copy2(donor / "generation_config.json", out)
    tokenizer_from = local_model(spec.tokenizer_source) if spec.tokenizer_source else donor
    for file in TOKENIZER_FILES:
        if (tokenizer_from / file).is_file():
            shutil.copy2(tokenizer_from / file, out)
    if spec.chat_template:
        if "{%" not in spec.chat_template and "{{" not in spec.chat_template:
            raise UserError("chat_template: only a Jinja template string is supported here")
        (out / "chat_template.jinja").write_text(spec.chat_template)
    (out / "merge_config.yaml").write_text(yaml.safe_dump(spec_dict(spec), sort_keys=False))


def spec_dict(spec: MergeSpec) -> dict:
    """The effective config in mergekit's schema (plus seed), for the output folder."""
    base = spec.inputs[spec.base_index].model if spec.base_index is not None else None
    raw = {"merge_method": spec.method, "base_model": base, "seed": spec.seed}
    raw["models"] = [{"model": m.model, "parameters": m.parameters} for m in spec.inputs]
    raw |= {"parameters": spec.parameters, "dtype": spec.dtype, "out_dtype": spec.out_dtype}
    return {k: v for k, v in raw.items() if v is not None}


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> tuple[str | None, dict]:
    """(CONFIG.yaml or None, key=value overrides); a second bare argument is output_dir."""
    config, overrides = None, {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep:
            overrides[key] = parse_value(value)
        elif config is None and arg.endswith((".yaml", ".yml")):
            config = arg
        elif config is not None and "output_dir" not in overrides:
            overrides["output_dir"] = arg
        else:
            raise UserError(f"unexpected argument {arg!r}; see `posttrain merge --help`")
    return config, overrides


def main(argv: list[str]) -> None:
    if not argv or "-h" in argv or "--help" in argv:
        print(__doc__.split("\n\n")[0] + "\n\n" + USAGE)
        return
    config, overrides = parse_args(argv)
    if "adapter" in overrides:
        from posttrain.ship.merge_adapter import fold_main

        fold_main(config, overrides)
        return
    if config is None:
        raise UserError("give a merge CONFIG.yaml or adapter=PATH; see `posttrain merge --help`")
    for key in overrides:
        if key not in OVERRIDES:
            raise UserError(f"unknown key {key!r} for merge; keys: {', '.join(OVERRIDES)}")
    raw = read_yaml(config) | overrides
    merge_models(parse_merge_config(raw, config))
