"""Evaluators: take a model and tokenizer (and rows or prompts), return plain dicts of numbers.

- `tasks.task_accuracy`: exact-match accuracy per task kind (`text.normalize_answer`).
- `reward.mean_gold_reward`: mean gold reward of greedy replies.
- `refusal.refusal_rate`, `refusal.first_token_refusal_score`: refusals.
- `kl.first_token_kl`, `kl.response_kl`: KL to a reference model.
- `perplexity.perplexity`: held-out perplexity.
- `generate.generate`: the batched greedy generation they share.

Submodules are imported directly (`from posttrain.evaluate.tasks import task_accuracy`).
"""
