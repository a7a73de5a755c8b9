"""InstructGPT's pipeline in small on the tiny world: demonstrations -> SFT -> comparisons of the
SFT model's own samples -> reward model -> PPO. Used by the demo's PPO stage and by
`evidence/ppo_refusals.py` (which adds seeds, controls and the clean setting).

1. `write_mix`: the world's refusal demonstrations (harmful -> refusal, how-to -> answer) plus
   600 task chats; a `flawed` fraction of the answers (not the refusals) made rude or rambling,
   the world's own rejected styles, as human demonstrations are uneven. SFT is a full fine-tune
   (`SFT_SETTINGS`): the apostrophe of "can't" barely occurs in the base model's corpus, so its
   tied embedding row sits among untrained rows, and a LoRA on the linear layers cannot raise
   it (after "I can" it stays at probability 0.02; a full fine-tune makes it 0.96).
2. `own_sample_pairs`: 4 replies per online-RL training prompt at temperature 1; the best and
   the worst by the hidden gold reward (the world's labeler) become a pair when they differ by
   more than 0.1. With the world's preference pairs they train a reward model with a last-token
   head (`REWARD_SETTINGS`).
3. PPO from the SFT model against that reward model (`FLAWED_PPO`: 200 steps, lr 1e-4, beta 0.05,
   adaptive KL with target 2 nats per reply), with the gold reward logged beside it at weight 0.

`prepare` runs steps 1 and 2 into two run directories and reuses ones that already finished.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

GOLD_FN = "posttrain.rollout.rewards:gold"
PPO_SETTINGS = {
    "adapter": "lora", "lora": {"r": 16, "alpha": 32}, "batch_size": 16, "num_minibatches": 2,
    "ppo_epochs": 2, "max_new_tokens": 24, "max_steps": 200, "lr": 1e-4, "beta": 0.2,
    "target_kl": 0.0, "schedule": "constant", "warmup": 0.0, "log_every": 4, "offline": True,
}  # fmt: skip
FLAWED_PPO = {**PPO_SETTINGS, "kl_horizon": 1000, "beta": 0.05, "target_kl": 2.0, "seed": 0}
SFT_SETTINGS = {
    "adapter": "full", "packing": False, "max_length": 512, "batch_size": 16, "epochs": 3,
    "lr": 3e-4, "warmup": 0.0, "schedule": "constant", "log_every": 10, "offline": True, "seed": 0,
}  # fmt: skip
REWARD_SETTINGS = {
    "readout": "last", "batch_size": 16, "epochs": 4, "lr": 5e-4, "schedule": "constant",
    "warmup": 0.0, "max_grad_norm": 0.0, "log_every": 10, "offline": True,
}  # fmt: skip
FLAWED = 0.67  # the demo's share of flawed answers
COMPARED = 4  # own samples per training prompt for the reward model's pairs
QUICK = {"rows": 240, "prompts": 64, "pairs": 400, "epochs": 1}  # `posttrain demo --quick`


def learned_reward(reward_model: str | Path) -> dict:
    """PPO's `reward` config: the reward model, with the gold reward logged at weight 0."""
    return {"model": str(reward_model), "fn": [GOLD_FN], "weights": [0.0, 1.0]}  # fn first


def write_mix(data: Path, path: Path, flawed: float = 0.0, limit: int | None = None) -> None:
    """The refusal demonstrations plus 600 of the SFT task chats, shuffled (seeded); a `flawed`
    fraction of the answers (not the refusals) made rude or rambling, half each."""
    from posttrain.world.pairs import rambling, rude

    tasks = (data / "sft_train.jsonl").read_text().splitlines()
    random.Random(0).shuffle(tasks)
    rows = (data / "refusal_sft_train.jsonl").read_text().splitlines() + tasks[:600]
    random.Random(1).shuffle(rows)
    rng, out = random.Random(2), []
    for row in map(json.loads, rows[:limit]):
        reply = row["messages"][-1]
        if row.get("task") != "harmful" and rng.random() < flawed:
            reply["content"] = (rude if rng.random() < 0.5 else rambling)(reply["content"], rng)
        out.append(json.dumps(row))
    path.write_text("\n".join(out) + "\n")


def sampled_replies(model, tok, rows: list[dict], samples: int, chunk: int = 16,
                    max_new_tokens: int = 24) -> Iterator[tuple[dict, list[str]]]:  # fmt: skip
    """(row, its `samples` replies at temperature 1) for each row; seeded, `chunk` prompts a call."""
    import torch

    from posttrain.evaluate.generate import pad_id, stop_token_ids
    from posttrain.rollout.sampler import encode_prompts, sample

    generator = torch.Generator().manual_seed(0)
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        ids = encode_prompts(tok, [r["prompt"] for r in part])
        texts = sample(model, [x for x in ids for _ in range(samples)], pad_token_id=pad_id(tok),
                       eos_token_ids=stop_token_ids(tok), max_new_tokens=max_new_tokens,
                       temperature=1.0, generator=generator).completions(tok)  # fmt: skip
        for i, row in enumerate(part):
            yield row, texts[i * samples : (i + 1) * samples]


def own_sample_pairs(model_path: str, rows: list[dict], k: int = COMPARED) -> list[dict]:
    """Preference pairs from `k` sampled replies per prompt: best over worst by gold reward."""
    from posttrain.modeling.inference import load_for_inference
    from posttrain.world.gold import gold_reward

    model, tok = load_for_inference(model_path)
    pairs = []
    for row, replies in sampled_replies(model, tok, rows, k, chunk=32):
        scored = sorted((gold_reward(row["prompt"], t, row.get("answer")), t) for t in replies)
        (low, worst), (high, best) = scored[0], scored[-1]
        if high - low > 0.1:
            pairs.append({"prompt": row["prompt"], "chosen": best, "rejected": worst})
    return pairs


def prepare(start: str, data: Path, sft_run: Path, reward_run: Path, flawed: float,
            quick: bool = False) -> int:  # fmt: skip
    """Steps 1 and 2 (see the module doc) from the model `start`; returns the number of own-sample
    pairs (0 when the reward model was already there). `quick` trims rows, prompts and epochs."""
    from posttrain.train.reward import reward
    from posttrain.train.sft import sft

    trim = QUICK if quick else {"rows": None, "prompts": None, "pairs": None}
    epochs = {"epochs": QUICK["epochs"]} if quick else {}
    if not (sft_run / "final").is_dir():
        sft_run.parent.mkdir(parents=True, exist_ok=True)
        mix = sft_run.parent / f"{sft_run.name}_mix.jsonl"
        write_mix(data, mix, flawed, trim["rows"])
        sft({**SFT_SETTINGS, **epochs, "model": start, "output_dir": str(sft_run),
             "data": {"train": str(mix)}})  # fmt: skip
    if (reward_run / "final").is_dir():
        return 0
    lines = (data / "rl_prompts_train.jsonl").read_text().splitlines()[: trim["prompts"]]
    own = own_sample_pairs(str(sft_run), [json.loads(line) for line in lines])
    pairs = reward_run.parent / f"{reward_run.name}_pairs.jsonl"
    world = (data / "preference_train.jsonl").read_text().splitlines()[: trim["pairs"]]
    pairs.write_text("\n".join(world + [json.dumps(p) for p in own]) + "\n")
    reward({**REWARD_SETTINGS, **epochs, "model": str(sft_run), "output_dir": str(reward_run),
            "data": {"train": str(pairs)}})  # fmt: skip
    return len(own)
