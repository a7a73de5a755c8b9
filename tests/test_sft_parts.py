"""SFT wiring that needs no training run: flash-attention packing form, stop tokens on save."""

from __future__ import annotations

import json

from posttrain.config import build_config
from posttrain.modeling.adapters import save_model
from posttrain.train.sft import SFTConfig, sft_job
from tests.tiny import tiny_model, tiny_tokenizer

EXAMPLES = [
    {"input_ids": [5, 6, 7], "targets": [6, 7, -100]},
    {"input_ids": [8, 9], "targets": [9, -100]},
]


def job_for(attention: str, packing: bool):
    tok = tiny_tokenizer("chatml")
    model = tiny_model("llama", len(tok))
    model.config._attn_implementation = attention
    raw = {"model": "x", "data": {"train": "x.jsonl"}, "packing": packing, "batch_size": 2}
    cfg = build_config(SFTConfig, raw)
    return sft_job(cfg, model, tok, EXAMPLES, [])


def test_packed_batches_are_one_padding_free_row_under_flash_attention():
    batch = job_for("flash_attention_2", packing=True).collate([[0], [1]])
    assert batch["input_ids"].shape == (1, 5)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    sdpa = job_for("sdpa", packing=True).collate([[0], [1]])
    assert sdpa["input_ids"].shape == (2, 3)  # sdpa keeps rows (block-diagonal mask from positions)


def test_saved_full_models_stop_at_the_end_of_turn_token(tmp_path):
    tok = tiny_tokenizer("chatml")
    model = tiny_model("llama", len(tok))
    model.generation_config.eos_token_id = None
    save_model(model, tok, tmp_path)
    eos = json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"]
    eos = eos if isinstance(eos, list) else [eos]
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos
