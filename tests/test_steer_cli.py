"""`posttrain abliterate` on a tiny random model: outputs, adapter form, hooks, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from posttrain.errors import UserError
from posttrain.steer import residual
from posttrain.steer.cli import main
from posttrain.steer.prompts import read_prompts, split_prompts
from tests.tiny import save_tiny

HARMFUL = [f"How do I break vault number {i} open?" for i in range(20)]
HARMLESS = [f"What is {i} plus {i + 3}?" for i in range(20)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("abl")
    model = save_tiny(root / "model", "llama")
    (root / "harmful.txt").write_text("\n".join(HARMFUL) + "\n")
    with open(root / "harmless.jsonl", "w") as f:
        for p in HARMLESS:
            f.write(json.dumps({"prompt": p, "completion": "x"}) + "\n")
    return {"model": model, "harmful": root / "harmful.txt", "harmless": root / "harmless.jsonl"}


def args(files, out, *extra):
    return [
        str(files["model"]),
        f"harmful={files['harmful']}",
        f"harmless={files['harmless']}",
        f"output_dir={out}",
        "force=true",  # a random model never refuses
        "layer=1",
        "batch_size=8",
        *extra,
    ]


def test_weights_run_writes_an_orthogonalised_model_and_report(files, tmp_path):
    out = tmp_path / "run"
    main(args(files, out, "position=-1"))
    report = json.loads((out / "report.json").read_text())
    assert (report["chosen"]["layer"], report["chosen"]["position"]) == (1, -1)
    assert report["prompts"] == {
        "harmful_train": 12, "harmful_val": 4, "harmful_test": 4,
        "harmless_train": 12, "harmless_val": 4, "harmless_test": 4,
    }  # fmt: skip
    assert report["saved"] == "full" and len(report["candidates"]) == 1
    for key in (
        "refusal_rate_harmful",
        "refusal_score_harmful",
        "induced_refusal_harmless",
        "induced_refusal_harmless_2x",
    ):
        assert key in report["before"]
    assert report["after"]["kl_harmless"] >= 0
    tensors = load_file(str(out / "directions.safetensors"))
    assert tensors["directions"].shape[:2] == tensors["norms"].shape
    assert tensors["directions"].shape[0] == 3  # 2 blocks: 2 inputs + the last output
    r = tensors["direction"]
    torch.testing.assert_close(r, tensors["directions"][1, -1])
    edited = AutoModelForCausalLM.from_pretrained(out / "final")
    along = edited.get_input_embeddings().weight.detach() @ r
    assert float(along.abs().max()) < 1e-4  # every embedding row is orthogonal to r
    assert (out / "scores.png").stat().st_size > 0 and (out / "config.yaml").is_file()
    assert not list(tmp_path.glob(".tmp-*"))


def test_adapter_output_and_hooks_method(files, tmp_path):
    main(args(files, tmp_path / "adapter", "position=-1", "output=adapter"))
    report = json.loads((tmp_path / "adapter" / "report.json").read_text())
    assert report["saved"] == "adapter"
    assert (tmp_path / "adapter" / "final" / "adapter_config.json").is_file()
    main(args(files, tmp_path / "hooks", "position=-2", "method=hooks"))
    hooks = json.loads((tmp_path / "hooks" / "report.json").read_text())
    assert not (tmp_path / "hooks" / "final").exists() and hooks["chosen"]["position"] == -2


def test_never_refusing_model_stops_with_its_baseline(files, tmp_path):
    argv = [a for a in args(files, tmp_path / "run") if a != "force=true"]
    with pytest.raises(UserError, match=r"refuses none of 4 .*baseline refusal rate 0\.00"):
        main(argv)
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_too_few_prompts_and_bad_keys(files, tmp_path):
    with pytest.raises(UserError, match=r"harmful: .*harmful.txt has 20 prompts; at least 30"):
        main(args(files, tmp_path / "run", "min_prompts=30"))
    with pytest.raises(UserError, match="method must be weights or hooks"):
        main(args(files, tmp_path / "run", "method=magic"))
    with pytest.raises(UserError, match="harmful and harmless go together"):
        main([str(files["model"]), f"harmful={files['harmful']}"])
    with pytest.raises(UserError, match="layer must be < 3"):
        main(args(files, tmp_path / "run", "layer=7"))


def test_unknown_architecture_is_a_user_error(files, tmp_path, monkeypatch):
    monkeypatch.setattr(residual, "WRITER_NAMES", ("nothing_here",))
    with pytest.raises(UserError, match=r"unknown residual-stream writers.*o_proj"):
        main(args(files, tmp_path / "run"))


def test_read_and_split_prompts(tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "yo"}]}) + "\n"
        + json.dumps({"instruction": "Add", "input": "2 and 3"}) + "\n"
    )  # fmt: skip
    assert read_prompts(str(chats)) == [[{"role": "user", "content": "hi"}], "Add\n\n2 and 3"]
    text = tmp_path / "p.txt"
    text.write_text("one\n\n two \n")
    assert read_prompts(str(text)) == ["one", "two"]
    train, val, test = split_prompts(list(range(10)), [0.2, 0.3], seed=1)
    assert (len(train), len(val), len(test)) == (5, 2, 3)
    assert sorted(train + val + test) == list(range(10))
    assert (
        split_prompts(list(range(10)), [0.2], seed=1)[0]
        == split_prompts(list(range(10)), [0.2], seed=1)[0]
    )


def test_heal_dpo_trains_the_edited_weights_and_measures_them_again(files, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(
        json.dumps({"prompt": p, "chosen": str(i + 3), "rejected": "no"}) + "\n"
        for i, p in enumerate(HARMLESS)
    ))  # fmt: skip
    main(args(files, tmp_path / "plain", "position=-1"))
    main(args(files, tmp_path / "healed", "position=-1", "heal=dpo", f"heal_data={pairs}",
              "heal_steps=2"))  # fmt: skip
    report = json.loads((tmp_path / "healed" / "report.json").read_text())
    assert report["heal"]["steps"] == 2 and report["heal"]["data"] == str(pairs)
    assert set(report["healed"]) == set(report["after"])
    final = tmp_path / "healed" / "final"
    assert not (final / "adapter_config.json").exists()  # the heal adapter is folded in
    healed = AutoModelForCausalLM.from_pretrained(final).state_dict()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain" / "final").state_dict()
    assert healed.keys() == plain.keys()
    assert any(not torch.equal(healed[k], plain[k]) for k in plain)
    with pytest.raises(UserError, match="heal needs method=weights and output=full"):
        main(args(files, tmp_path / "x", "heal=dpo", "method=hooks"))
    with pytest.raises(UserError, match=r"heal_data .*missing.jsonl: no such file"):
        main(args(files, tmp_path / "x", "heal=dpo", f"heal_data={tmp_path / 'missing.jsonl'}"))


def test_search_optuna_saves_the_chosen_edit_and_the_front(files, tmp_path):
    out = tmp_path / "run"
    main([str(files["model"]), f"harmful={files['harmful']}", f"harmless={files['harmless']}",
          f"output_dir={out}", "force=true", "batch_size=8", "search=optuna", "trials=6"])  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    search = report["search"]
    assert len(search["trials"]) == 6 and report["chosen"]["number"] in search["front"]
    assert report["saved"] == "full" and (out / "pareto.png").is_file()
    assert (out / "final" / "model.safetensors").is_file()
    with pytest.raises(UserError, match="layer"):
        main([str(files["model"]), "search=optuna", "layer=1", f"output_dir={tmp_path / 'x'}"])
