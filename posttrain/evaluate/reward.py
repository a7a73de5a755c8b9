"""Mean reward of a model's greedy replies, by default under the tiny world's gold reward.

`mean_gold_reward` generates one reply per row and scores it with
`reward_fn(prompt, response, answer)` (default `posttrain.world.gold.gold_reward`); the
prompt handed to the reward is the last user message. Returns the plain mean over rows and
the mean per task kind.

Simplified on purpose: one greedy sample per prompt, so it measures the policy's mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from posttrain.evaluate.generate import generate
from posttrain.evaluate.tasks import by_task, split_rows
from posttrain.world.gold import gold_reward

RewardFn = Callable[[str, str, str | None], float]


def user_text(prompt: str | list[dict]) -> str:
    """The last user message of a prompt (the string itself for a plain prompt)."""
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")


def score_rewards(
    prompts: Sequence,
    responses: Sequence[str],
    answers: Sequence,
    kinds: Sequence[str],
    reward_fn: RewardFn = gold_reward,
) -> dict:
    """{"gold_reward" (mean over rows), "gold_reward_by_task", "n"} for given responses."""
    rewards = [reward_fn(user_text(p), r, a) for p, r, a in zip(prompts, responses, answers)]
    return {
        "gold_reward": sum(rewards) / len(rewards) if rewards else 0.0,
        "gold_reward_by_task": by_task(rewards, kinds),
        "n": len(rewards),
    }


def mean_gold_reward(
    model,
    tok,
    rows: Sequence[dict],
    max_new_tokens: int = 48,
    batch_size: int = 64,
    reward_fn: RewardFn = gold_reward,
) -> dict:
    """Generate a reply per row (`prompt` or `messages`, optional `answer`/`task`) and score it."""
    prompts, answers, kinds = split_rows(rows)
    responses = generate(model, tok, prompts, max_new_tokens, batch_size)
    return score_rewards(prompts, responses, answers, kinds, reward_fn)
