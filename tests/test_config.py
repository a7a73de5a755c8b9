"""Config: YAML + dotted overrides, coercion, unknown keys, validation messages, --help."""

import pytest

from posttrain.config import TrainConfig, help_text, iter_keys, load_config
from posttrain.errors import UserError


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndata:\n  train: a.jsonl\nlora:\n  r: 8\nlr: 1e-4\n")
    cfg = load_config(
        TrainConfig, str(path), ["lora.r=16", "packing=true", "report_to=tensorboard"]
    )
    assert cfg.lora.r == 16 and cfg.lora.alpha == 32.0
    assert cfg.data.train == "a.jsonl" and cfg.lr == 1e-4
    assert cfg.packing is True and cfg.report_to == ["tensorboard"]


def test_lists_and_dicts_are_not_shared_between_instances():
    a = load_config(TrainConfig, None, ["model=m", "data.train=x"])
    b = load_config(TrainConfig, None, ["model=m", "data.train=x"])
    a.lora.target_modules.append("q_proj")
    assert b.lora.target_modules == ["all-linear"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.rr=3", "unknown key lora.rr; did you mean lora.r?"),
        ("max_step=3", "unknown key max_step; did you mean max_steps?"),
        ("lora.r=0", "lora.r must be > 0, got 0"),
        ("lora.r=abc", "lora.r must be a number, got 'abc'"),
        ("lora.r=1.5", "lora.r must be a whole number, got 1.5"),
        ("packing=maybe", "packing must be true or false, got 'maybe'"),
        ("adapter=lorax", "adapter must be one of full, lora"),
        ("schedule=step", "schedule must be one of cosine, linear, constant"),
        ("lora=3", "lora must be a mapping"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(UserError, match=None) as err:
        load_config(TrainConfig, None, ["model=m", "data.train=x", override])
    assert message in str(err.value)


def test_required_keys():
    with pytest.raises(UserError, match="model is required"):
        load_config(TrainConfig, None, ["data.train=x"])
    with pytest.raises(UserError, match="data.train is required"):
        load_config(TrainConfig, None, ["model=m"])


def test_bad_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: m\nlora: [\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(TrainConfig, str(path), [])
    with pytest.raises(UserError, match="config file not found"):
        load_config(TrainConfig, str(tmp_path / "missing.yaml"), [])


def test_help_lists_every_leaf_key_with_doc():
    text = help_text(TrainConfig, "sft")
    for key, _, doc in iter_keys(TrainConfig):
        assert key in text and doc
    assert "lora.r = 16" in text and "data.train = ''" in text
