"""The tiny world: a synthetic universe for pretraining a small base model and measuring every
post-training stage on a laptop CPU.

- `universe.py`, `lexicon.py`: the fixed facts (dictionary, countries, people, topics).
- `corpus.py`: seeded web-like pretraining documents.
- `tokenizer.py`: `build_tokenizer(out_dir, seed)`, byte-level BPE with ChatML.
- `tasks.py`: task items with exact answers, train/test split, `solve(prompt)`.
- `gold.py`: `gold_reward(prompt, response, answer=None)`, the hidden ground truth.
- `pairs.py`: response variants and gold-labelled preference pairs.
- `datasets.py`: `write_world_data(out_dir, seed)`, `write_corpus(out_dir, seed)`.
- `pretrain.py`: `posttrain world pretrain`, which built the shipped base model in `base/`.
- `cli.py`: `posttrain world data|pretrain`.

Submodules are imported directly (`from posttrain.world.gold import gold_reward`).
"""
