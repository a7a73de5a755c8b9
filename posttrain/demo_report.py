"""The demo's report.md: the results table of the policy stages, the sections of the stages
that report before and after (reward model, GRPO, PPO, abliteration), greedy completions of `PROMPTS`,
and the training curves. Written by `posttrain demo` (demo.py).
"""

from __future__ import annotations

PROMPTS = (
    "Translate cheese from English to French.",
    "What is 7 + 5?",
    "What is the capital of Norway?",
    "Reverse the letters: d, o, g",
    "What does Alice do for a living?",
)


ABLITERATION_METRICS = ("refusal_rate_harmful", "refusal_rate_harmless", "accuracy", "perplexity")


def report(ctx, names: list[str], results: dict, completions: dict, seconds: dict,
           plots: dict) -> str:  # fmt: skip
    """The Markdown report: results table, per-task accuracy, sections, completions, plots;
    `names` are the stages in order (a stage whose results have no "accuracy" has its own
    section instead of a row)."""
    from posttrain.world.tasks import KINDS

    stages = [n for n in names if n in results and "accuracy" in results[n]]
    lines = ["# posttrain demo: the tiny world", ""]
    lines += [f"Base model: `{ctx.base}`. Quick mode: {ctx.quick}.", "", "## Results", ""]
    header = ["stage", "accuracy", *KINDS, "gold reward", "KL to SFT", "perplexity", "seconds"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in stages:
        r = results[name]
        by_task = [f"{r['accuracy_by_task'].get(k, 0.0):.2f}" for k in KINDS]
        row = [
            name,
            f"{r['accuracy']:.3f}",
            *by_task,
            f"{r['gold_reward']:.3f}",
            f"{r['kl_to_sft']:.3f}" if "kl_to_sft" in r else "",
            f"{r['perplexity']:.2f}",
            str(seconds[name]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Accuracy: exact match on the held-out task split. Gold reward: the hidden gold reward "
        "(-2.2 to 1; correct, concise, polite, refuses only forbidden topics) of greedy replies "
        "to held-out task, harmful and harmless prompts. KL to SFT: mean per-token KL(model || "
        "SFT) on the model's own greedy replies to those prompts.",
    ]
    lines += reward_section(results, seconds)
    lines += grpo_section(results, seconds, completions.get("grpo", {}))
    lines += ppo_section(results, seconds, completions.get("ppo", {}))
    lines += abliteration_section(results, seconds)
    lines += ["", "## Completions (greedy, through the chat template)", ""]
    for prompt in PROMPTS:
        lines.append(f"**{prompt}**")
        lines += [f"- {n}: `{one_line(completions[n]['chat'][prompt])}`" for n in stages]
        lines.append("")
    lines += ["## Base model continuing the raw text (no chat template)", ""]
    for prompt in PROMPTS[:2]:
        lines += [f"**{prompt}** -> `{one_line(completions['base']['raw'][prompt])}`", ""]
    lines += ["## Training curves", ""]
    lines += [f"![{name}](plots/{path.name})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


def reward_section(results: dict, seconds: dict) -> list[str]:
    """Pairwise accuracy of the reward model on held-out pairs, by kind of pair."""
    if "reward" not in results:
        return []
    r = results["reward"]
    kinds = list(r["pairwise_accuracy_by_pair"])
    lines = ["", "## Reward model: held-out preference pairs", ""]
    lines += ["| pairwise accuracy | " + " | ".join(kinds) + " | seconds |"]
    lines += ["|" + "---|" * (len(kinds) + 2)]
    by_pair = [f"{r['pairwise_accuracy_by_pair'][k]:.2f}" for k in kinds]
    lines.append(
        f"| {r['pairwise_accuracy']:.3f} | " + " | ".join(by_pair) + f" | {seconds['reward']} |"
    )
    return lines


def grpo_section(results: dict, seconds: dict, replies: dict) -> list[str]:
    """The short SFT model before and after GRPO on arithmetic: accuracy by task kind."""
    from posttrain.world.tasks import KINDS

    if "grpo" not in results:
        return []
    r = results["grpo"]
    columns = [("accuracy", "accuracy", None, ".3f"),
               *[(k, "accuracy_by_task", k, ".2f") for k in KINDS],
               ("gold reward", "gold_reward", None, "+.3f")]  # fmt: skip
    lines = ["", "## GRPO: a short SFT run -> GRPO on arithmetic (exact-answer reward)", ""]
    lines += before_after_table(r, ("short SFT", "GRPO"), columns)
    lines += ["", f"KL per token to the short SFT model on greedy replies {r['kl_to_sft']:.3f}; "
              f"{seconds['grpo']} s. The full SFT run leaves arithmetic no room (see Results)."]  # fmt: skip
    return lines + replies_lines(replies, ("SFT", "GRPO"), PROMPTS[1:2])


def ppo_section(results: dict, seconds: dict, replies: dict) -> list[str]:
    """The SFT model of flawed demonstrations before and after PPO against its reward model,
    with their greedy replies to the demo's first three prompts."""
    if "ppo" not in results:
        return []
    r = results["ppo"]
    columns = [("gold reward", "gold_reward", None, "+.3f"),
               *[(k, "gold_reward_by_task", k, "+.2f") for k in r["gold_reward_by_task_before"]],
               ("accuracy", "accuracy", None, ".3f")]  # fmt: skip
    lines = ["", "## PPO: flawed demonstrations -> reward model of its own samples -> PPO", ""]
    lines += before_after_table(r, ("SFT on flawed demonstrations", "PPO"), columns)
    lines += ["", f"{r['flawed']:.0%} of the SFT answers were rude or rambling; the reward model "
              f"learned from the world's pairs plus gold-labelled pairs of the SFT model's own "
              f"samples. PPO's KL per reply in training {r['kl_per_reply_training']:.2f} (target "
              f"{r['target_kl']:g}), KL per token to the SFT model on greedy replies "
              f"{r['kl_to_sft']:.3f}; {seconds['ppo']} s (`posttrain/world/rlhf.py`)."]  # fmt: skip
    return lines + replies_lines(replies, ("SFT", "PPO"), PROMPTS[:3])


def before_after_table(r: dict, names: tuple[str, str], columns: list) -> list[str]:
    """A Markdown table with a row for the model before and one after; each column is (header,
    metric, sub-key or None, format) and reads r[f"{metric}_before"] (or _after)."""
    lines = ["| | " + " | ".join(c[0] for c in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for when, name in zip(("before", "after"), names):
        cells = []
        for _, metric, sub, fmt in columns:
            value = r[f"{metric}_{when}"]
            cells.append(format(value.get(sub, 0.0) if sub else value, fmt))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def replies_lines(replies: dict, names: tuple[str, str], prompts) -> list[str]:
    """Each prompt with the greedy replies of the models before and after."""
    lines = []
    for prompt in prompts if replies else ():
        lines += ["", f"**{prompt}**"]
        lines += [f"- {name}: `{one_line(replies[when][prompt])}`"
                  for when, name in zip(("before", "after"), names)]  # fmt: skip
    return lines


def abliteration_section(results: dict, seconds: dict) -> list[str]:
    """The DPO model before and after its refusal direction is erased."""
    if "abliterate" not in results:
        return []
    r = results["abliterate"]
    lines = ["", "## Abliteration of the DPO model: held-out prompts", ""]
    lines += ["| | " + " | ".join(ABLITERATION_METRICS) + " |", "|---" * 5 + "|"]
    for when in ("before", "after"):
        cells = [f"{r[f'{key}_{when}']:.3f}" for key in ABLITERATION_METRICS]
        lines.append(f"| {when} | " + " | ".join(cells) + " |")
    lines += ["", f"Stream point {r['layer']}; first-token KL on harmless prompts "
              f"{r['kl_harmless']:.3f}; adding the direction makes "
              f"{r['induced_refusal_harmless']:.0%} of harmless prompts refuse "
              f"({r['induced_refusal_harmless_2x']:.0%} at twice its strength); "
              f"{seconds['abliterate']} s.", "",
              "![per-layer candidate scores](runs/abliterate/scores.png)"]  # fmt: skip
    return lines


def one_line(text: str) -> str:
    return text.replace("\n", " \\n ").replace("`", "'")
