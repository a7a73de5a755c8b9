"""Read a mergekit-schema merge YAML into a `MergeSpec`, and resolve parameters per tensor.

Accepted keys follow mergekit: `merge_method`, `base_model`, `models[].model`,
`models[].parameters`, global `parameters`, `dtype`, `out_dtype`, `tokenizer_source`,
`chat_template`, and `slices:` when it is one slice whose sources all span every layer
(the common way slerp configs are written). Parameter values may be scalars, gradients
(lists interpolated over the layers) or `[{filter: self_attn, value: ...}, {value: ...}]`
conditionals, resolved exactly as mergekit does. Our own keys: `seed` (DARE's random drop;
also accepted as `parameters.seed`; default 0), `output_dir`, `max_shard_size`.

Simplified on purpose: no layer-range slicing (frankenmerges), no `modules:`, no vocabulary
union (`tokenizer_source: union`, `tokenizer:`), no `model+lora` references (fold the
adapter first with `posttrain merge adapter=...`). Each is refused with a one-line error.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

from posttrain.errors import UserError

# method -> (needs a base, per-input params, shared params with defaults)
NON_BASE = {"weight": None, "density": 1.0}
SHARED_GTA = {"lambda": 1.0, "int8_mask": False}
METHODS: dict[str, tuple[bool, dict[str, Any], dict[str, Any]]] = {
    "linear": (False, {"weight": None}, {"normalize": True}),
    "slerp": (True, {}, {"t": None}),
    "task_arithmetic": (True, NON_BASE, {**SHARED_GTA, "normalize": False, "rescale": False}),
    "ties": (True, NON_BASE, {**SHARED_GTA, "normalize": True, "rescale": False}),
    "dare_linear": (True, NON_BASE, {**SHARED_GTA, "normalize": False, "rescale": True}),
    "dare_ties": (True, NON_BASE, {**SHARED_GTA, "normalize": False, "rescale": True}),
}
TOP_KEYS = (
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "chat_template", "seed", "output_dir", "max_shard_size",
)  # fmt: skip
LAYER = re.compile(r"\.(?:layers|h|blocks|block)\.(\d+)\.")


@dataclass
class ModelInput:
    model: str  # the reference as written in the YAML
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeSpec:
    method: str
    inputs: list[ModelInput]  # mergekit's order: listed models, then the base if not listed
    base_index: int | None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # None/"base" = the base (or first) model
    chat_template: str | None = None
    seed: int = 0
    output_dir: str = ""
    max_shard_size: str | int = "2GB"

    @property
    def donor(self) -> int:
        """The input whose config, tokenizer and tensor list the output takes."""
        return 0 if self.base_index is None else self.base_index


def parse_merge_config(raw: dict[str, Any], where: str) -> MergeSpec:
    """Validate a mergekit-style dict; errors name `where` and the key."""
    for key in raw:
        if key not in TOP_KEYS:
            raise UserError(f"{where}: unknown key {key!r}{suggest(key, TOP_KEYS)}")
    method = raw.get("merge_method")
    if method not in METHODS:
        raise UserError(
            f"{where}: merge_method must be one of {', '.join(METHODS)}, got {method!r}"
        )
    models, parameters = read_models(raw, where)
    seed = raw.get("seed", parameters.pop("seed", 0))
    base = raw.get("base_model")
    check_reference(base, where, "base_model")
    inputs = [ModelInput(str(m["model"]), dict(m.get("parameters") or {})) for m in models]
    names = [i.model for i in inputs]
    if base is not None and str(base) not in names:
        inputs.append(ModelInput(str(base)))
        names.append(str(base))
    base_index = names.index(str(base)) if base is not None else None
    spec = MergeSpec(
        method=method,
        inputs=inputs,
        base_index=base_index,
        parameters=parameters,
        dtype=raw.get("dtype"),
        out_dtype=raw.get("out_dtype"),
        tokenizer_source=read_tokenizer_source(raw, where),
        chat_template=raw.get("chat_template"),
        seed=int(seed),
        output_dir=str(raw.get("output_dir") or ""),
        max_shard_size=raw.get("max_shard_size", "2GB"),
    )
    check_method_inputs(spec, where)
    return spec


def read_models(raw: dict[str, Any], where: str) -> tuple[list[dict], dict[str, Any]]:
    """The `models:` list (or one full-range slice turned into one) and the global parameters."""
    parameters = dict(raw.get("parameters") or {})
    if "slices" in raw and "models" in raw:
        raise UserError(f"{where}: give either models: or slices:, not both")
    if "slices" not in raw:
        models = raw.get("models")
        if not isinstance(models, list) or not models:
            raise UserError(f"{where}: models: must list the models to merge")
        for i, m in enumerate(models):
            if not isinstance(m, dict) or "model" not in m:
                raise UserError(f"{where}: models[{i}] needs a model: key")
            check_reference(m["model"], where, f"models[{i}].model")
        return models, parameters
    slices = raw["slices"]
    if not isinstance(slices, list) or len(slices) != 1 or "sources" not in slices[0]:
        raise UserError(f"{where}: slices: only one slice spanning every layer is supported")
    ranges = {tuple(s.get("layer_range", ())) for s in slices[0]["sources"]}
    if len(ranges) != 1 or len(next(iter(ranges))) != 2 or next(iter(ranges))[0] != 0:
        raise UserError(
            f"{where}: slices: every source must have the same layer_range [0, n_layers]"
        )
    parameters = {**parameters, **(slices[0].get("parameters") or {})}
    sources = [{k: v for k, v in s.items() if k != "layer_range"} for s in slices[0]["sources"]]
    return read_models({"models": sources}, where)[0], parameters


def read_tokenizer_source(raw: dict[str, Any], where: str) -> str | None:
    source = raw.get("tokenizer_source")
    if source == "union":
        raise UserError(f"{where}: tokenizer_source: union is not supported; use base or a model")
    return None if source in (None, "base") else str(source)


def check_reference(ref: Any, where: str, key: str) -> None:
    if ref is None:
        return
    if not isinstance(ref, str):
        raise UserError(f"{where}: {key} must be a model path or hub id, got {ref!r}")
    if "+" in ref:
        raise UserError(
            f"{where}: {key} {ref!r}: model+lora references are not supported; fold the adapter "
            "first with `posttrain merge adapter=ADAPTER output_dir=DIR` and merge that folder"
        )


def check_method_inputs(spec: MergeSpec, where: str) -> None:
    needs_base, per_input, shared = METHODS[spec.method]
    if needs_base and spec.base_index is None:
        raise UserError(f"{where}: merge_method {spec.method} needs base_model:")
    if spec.method == "slerp" and len(spec.inputs) != 2:
        raise UserError(f"{where}: slerp merges exactly two models (the base and one other)")
    known = {*per_input, *shared}
    scopes = [("parameters", spec.parameters)]
    scopes += [(f"models[{i}].parameters", m.parameters) for i, m in enumerate(spec.inputs)]
    for scope, params in scopes:
        for key in params:
            if key not in known:
                raise UserError(
                    f"{where}: {scope}.{key} is not a {spec.method} parameter"
                    f"{suggest(key, sorted(known))}"
                )


def suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ----------------------------------------------------------------------------- per tensor


def layer_t(name: str, num_layers: int) -> float:
    """mergekit's gradient position: layer i of n -> i/(n-1); embeddings and head -> 0."""
    match = LAYER.search(name)
    if not match:
        return 0.0
    return int(match.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate_setting(name: str, setting: Any, t: float) -> Any:
    """A scalar, a gradient (numbers interpolated at t) or the first matching filter's value."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if not isinstance(setting, list) or not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        pattern = cond.get("filter") if isinstance(cond, dict) else None
        if pattern in (None, "*") or pattern in name:
            return evaluate_setting(name, cond.get("value"), t)
    return None


def resolve(key: str, scopes: list[dict[str, Any]], name: str, t: float, default: Any) -> Any:
    """The first scope (highest precedence first) whose setting for `key` applies to `name`."""
    for scope in scopes:
        if key in scope:
            value = evaluate_setting(name, scope[key], t)
            if value is not None:
                return value
    if default is None:
        raise UserError(f"missing required parameter {key} for tensor {name}")
    return default


def tensor_parameters(spec: MergeSpec, name: str, t: float) -> tuple[dict, list[dict]]:
    """(shared parameters, per-input parameters) for one tensor, with mergekit's precedence."""
    _, per_input, shared = METHODS[spec.method]
    shared_values = {k: resolve(k, [spec.parameters], name, t, d) for k, d in shared.items()}
    per_model = []
    for i, model in enumerate(spec.inputs):
        if i == spec.base_index and spec.method != "linear":
            per_model.append({})
            continue
        scopes = [model.parameters, spec.parameters]
        try:
            per_model.append({k: resolve(k, scopes, name, t, d) for k, d in per_input.items()})
        except UserError as exc:
            raise UserError(f"{model.model}: {exc}") from None
    return shared_values, per_model
