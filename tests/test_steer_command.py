"""`posttrain steer` on a tiny random model: markers, add, remove into the weights, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from posttrain.config import load_config
from posttrain.errors import UserError
from posttrain.modeling.inference import load_for_inference
from posttrain.steer.activations import mean_activations
from posttrain.steer.steer_cli import SteerConfig, main, marker_tokens, read_sets
from tests.tiny import save_tiny

WORDS = ["cat", "dog", "sun", "moon", "tree", "rain", "bread", "milk", "road", "ship"]
FRENCH = [f"{t} {w} in French?" for w in WORDS for t in ("Say", "Write")]
GERMAN = [f"{t} {w} in German?" for w in WORDS for t in ("Say", "Write")]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("steer")
    (root / "fr.txt").write_text("\n".join(FRENCH) + "\n")
    (root / "de.txt").write_text("\n".join(GERMAN) + "\n")
    return {
        "model": save_tiny(root / "model", "llama"),
        "fr": root / "fr.txt",
        "de": root / "de.txt",
    }


def args(files, out, *extra):
    return [str(files["model"]), f"positive={files['fr']}", f"negative={files['de']}",
            f"output_dir={out}", "batch_size=8", "max_new_tokens=4", *extra]  # fmt: skip


def test_marker_tokens_are_positive_openings_never_seen_in_negative_replies():
    assert marker_tokens([5, 5, 7, 9, 9, 9], [7, 1]) == [9, 5]
    assert marker_tokens([1, 2], [1, 2, 3]) == []


def test_add_raises_the_behaviour_score_on_negative_prompts(files, tmp_path):
    out = tmp_path / "add"
    main(args(files, out, "layer=2", "coeff=2"))
    report = json.loads((out / "report.json").read_text())
    assert report["chosen"]["layer"] == 2 and report["markers"]
    assert report["chosen"]["coeff"] == pytest.approx(2 * report["chosen"]["norm"])
    assert report["after"]["score_negative"] > report["before"]["score_negative"]
    assert report["after"]["kl_negative"] > 0 and report["before"]["kl_negative"] == 0
    assert len(report["after"]["samples"]) == 4  # the held-out negative prompts
    assert not (out / "final").exists()  # activation addition is not a weight edit
    tensors = load_file(str(out / "directions.safetensors"))
    assert torch.allclose(tensors["direction"], tensors["directions"][2, -1])


def test_remove_bakes_the_ablation_into_saved_weights(files, tmp_path):
    out = tmp_path / "remove"
    main(args(files, out, "mode=remove"))
    report = json.loads((out / "report.json").read_text())
    assert report["saved"] == "full" and {r["layer"] for r in report["layers"]} <= {1, 2}
    r = load_file(str(out / "directions.safetensors"))["direction"]
    model, tok = load_for_inference(str(out / "final"))
    assert isinstance(model, type(AutoModelForCausalLM.from_pretrained(str(out / "final"))))
    acts = mean_activations(model, tok, FRENCH[:4])  # every stream point, every position
    assert acts.matmul(r).abs().max() < 1e-4  # nothing is written along r any more


def test_identical_sets_have_no_behaviour_and_bad_keys_name_themselves(files, tmp_path):
    with pytest.raises(UserError, match="positive: the model's replies open with the same"):
        main([str(files["model"]), f"positive={files['fr']}", f"negative={files['fr']}",
              f"output_dir={tmp_path / 'x'}"])  # fmt: skip
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="mode"):
        main(args(files, tmp_path / "y", "mode=amplify"))
    with pytest.raises(UserError, match="negative"):
        main([str(files["model"]), f"positive={files['fr']}"])
    with pytest.raises(UserError, match="missing.txt: no such file"):
        main(
            [str(files["model"]), f"positive={tmp_path / 'missing.txt'}", f"negative={files['de']}"]
        )
    with pytest.raises(UserError, match="at least 30"):
        main(args(files, tmp_path / "z", "min_prompts=30"))


def test_sets_split_into_train_validation_test(files):
    cfg = load_config(SteerConfig, None, args(files, "o")[1:] + [f"model={files['model']}"])
    sets = read_sets(cfg)
    assert {k: len(v) for k, v in sets.items()} == {
        "positive_train": 12, "positive_val": 4, "positive_test": 4,
        "negative_train": 12, "negative_val": 4, "negative_test": 4,
    }  # fmt: skip
    assert set(sets["positive_test"]).isdisjoint(sets["positive_train"])
