"""Decoding speed of posttrain's rollout sampler vs transformers' `generate` (what TRL samples with).

    python benchmarks/sampling.py           # 12 rounds; prints
    python benchmarks/sampling.py --write   # the same, then rewrites its benchmarks/README.md section
    python benchmarks/sampling.py --quick   # 2 rounds, writes nothing

Same model, prompts and work on both sides: the tiny world's base (`posttrain/world/base`,
1.1M-parameter Llama, fp32, sdpa) with a fresh LoRA (r 16, every linear layer; posttrain's copy
fused as its trainers have it, `generate`'s the plain peft model TRL has), 32 chat prompts
of tiny-world arithmetic, temperature 1, no top-k/top-p, and exactly `--tokens` new tokens per
row (no EOS stop: posttrain with no EOS ids, `generate` with `min_new_tokens`), so both decode
the same number of steps. Each round runs both, alternating which goes first; the cell is the
median over rounds of the wall time per decode step (prefill included, divided by the steps).

Simplified on purpose: one process, CPU, one batch shape; it measures the sampling loop, not a
trainer (benchmarks/grpo.py does that, side by side with TRL).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import common

BASE = Path(__file__).resolve().parents[1] / "posttrain" / "world" / "base"
SECTION = "Sampling: posttrain rollout sampler vs transformers generate (CPU)"


def setup(rows: int):
    """(posttrain's model, TRL's model, tokenizer, prompt id lists): the tiny-world base with the
    same LoRA, in eval mode; posttrain's is fused the way its trainers load it (`apply_adapter`
    calls `fuse`), TRL's is the plain peft model."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.modeling.fused import fuse
    from posttrain.rollout import encode_prompts

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(BASE)
    model = AutoModelForCausalLM.from_pretrained(
        BASE, dtype=torch.float32, attn_implementation="sdpa"
    )
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    fused = copy.deepcopy(model)
    fuse(fused)
    asks = [[{"role": "user", "content": f"What is {i} + {i + 3}?"}] for i in range(rows)]
    return fused.eval(), model.eval(), tok, encode_prompts(tok, asks)


def ours(model, tok, prompts, tokens: int, seed: int) -> int:
    import torch

    from posttrain.rollout import sample

    gen = torch.Generator().manual_seed(seed)
    r = sample(model, prompts, pad_token_id=tok.pad_token_id, max_new_tokens=tokens, generator=gen)
    return r.completion_ids.shape[1]


def theirs(model, tok, prompts, tokens: int, seed: int) -> int:
    import torch

    from posttrain.rollout.sampler import left_pad

    ids, mask = left_pad(prompts, tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=tokens, min_new_tokens=tokens,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
    return out.shape[1] - ids.shape[1]


def measure(rounds: int, rows: int, tokens: int) -> dict[str, list[float]]:
    """Seconds per decode step for each side, one value per round."""
    fused, plain, tok, prompts = setup(rows)
    sides = {"posttrain": ours, "generate": theirs}
    models = {"posttrain": fused, "generate": plain}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(rounds + 1):  # round 0 warms up
        order = list(sides) if i % 2 else list(reversed(sides))
        for name in order:
            start = time.perf_counter()
            steps = sides[name](models[name], tok, prompts, tokens, i)
            if i:
                times[name].append((time.perf_counter() - start) / steps)
    return times


def report(times: dict[str, list[float]], rows: int, tokens: int, command: str) -> str:
    mine, peer = statistics.median(times["posttrain"]), statistics.median(times["generate"])
    ms = {k: common.median_spread([1000 * x for x in v], "{:.2f}") for k, v in times.items()}
    table = common.markdown_table(
        ["sampler", "ms per decode step", "vs generate"],
        [["posttrain `rollout.sample`", ms["posttrain"], f"**{peer / mine:.2f}x**"],
         ["transformers `generate`", ms["generate"], "1.00x"]],
    )  # fmt: skip
    return (
        f"Command: `{command}`.\n\nMachine: {common.machine()}; "
        f"{common.versions('torch', 'transformers', 'peft')}.\n\n"
        f"{rows} rows x {tokens} new tokens per call, tiny-world base + LoRA r 16 (fused for "
        "posttrain, plain peft for `generate`), temperature 1, hub kernels off; "
        f"median over {len(times['posttrain'])} alternating rounds (min-max).\n\n{table}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, writes nothing")
    parser.add_argument("--write", action="store_true", help="rewrite the README section")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    rounds = 2 if args.quick else 12
    text = report(measure(rounds, args.rows, args.tokens), args.rows, args.tokens,
                  "python benchmarks/sampling.py --write")  # fmt: skip
    print(text)
    if args.write and not args.quick:
        common.update_readme(SECTION, text)


if __name__ == "__main__":
    main()
