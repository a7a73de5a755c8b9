"""search=optuna: kernel, partial edits == orthogonalize at 1, restore, front, seed, no optuna."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from posttrain.errors import UserError
from posttrain.evaluate.generate import last_logits
from posttrain.evaluate.kl import kl_rows
from posttrain.evaluate.refusal import log_odds
from posttrain.steer import search as steer_search
from posttrain.steer.abliterate import compute_directions
from posttrain.steer.directions import normalize
from posttrain.steer.interventions import orthogonalize
from posttrain.steer.residual import discover
from posttrain.steer.search import (
    TrialRecord,
    apply_trial,
    choose,
    component_of,
    components,
    direction_range,
    edit_writers,
    import_optuna,
    kernel_weights,
    original_writers,
    plot_pareto,
    restore_writers,
    search,
)
from tests.test_steer import make_model
from tests.tiny import CORPUS, tiny_model, tiny_tokenizer

HARMFUL = [f"How do I break vault number {i} open?" for i in range(3)] + list(CORPUS[:5])
KL_LIMIT = 0.002
HARMLESS = [f"What is {i} plus {i + 3}?" for i in range(8)]


def random_directions(n_points: int, d: int, seed: int = 1) -> torch.Tensor:
    """(n_points, 2 positions, d) unit directions with a share of the embedding mean."""
    g = torch.Generator().manual_seed(seed)
    return normalize(torch.randn(n_points, 2, d, generator=g) + 2.0 / d**0.5)


def params_for(comps, direction_index, max_weight, frac=1.0, position=0.0, distance=2.0):
    out = {"direction_index": direction_index}
    for c in comps:
        out |= {f"{c}.max_weight": max_weight, f"{c}.max_weight_position": position,
                f"{c}.min_weight_fraction": frac, f"{c}.min_weight_distance": distance}  # fmt: skip
    return out


def logits(model) -> torch.Tensor:
    ids = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_kernel_weights_by_hand():
    assert kernel_weights(5, 1.0, 2.0, 0.5, 2.0) == [0.5, 0.75, 1.0, 0.75, 0.5]
    assert kernel_weights(5, 1.2, 0.5, 0.0, 1.0) == pytest.approx([0.6, 0.6, 0.0, 0.0, 0.0])
    assert kernel_weights(4, 1.5, 3.0, 0.3, 1.0) == pytest.approx([0, 0, 0.3, 1.5])  # 0 beyond


def test_components_from_sublayer_names():
    for family, names in (("llama", ("o_proj", "down_proj")), ("gpt2", ("attn.", "mlp."))):
        layout = discover(tiny_model(family))
        assert components(layout) == ["attn", "mlp"]
        kinds = [(w.name, component_of(w, layout.block_names[0])) for w in layout.writers[0]]
        assert [k for _, k in kinds] == ["attn", "mlp"]
        assert names[0] in kinds[0][0] and names[1] in kinds[1][0]


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2_moe"])
def test_all_weights_one_equal_orthogonalize(family):
    model = make_model(family)  # random biases; qwen2_moe: fused 3-D experts
    reference, before = copy.deepcopy(model), logits(model)
    layout = discover(model)
    dirs = random_directions(3, layout.hidden_size)
    params = params_for(components(layout), direction_index=1.0, max_weight=1.0, distance=2.0)
    r = apply_trial(model, layout, params, dirs, position=-1)
    torch.testing.assert_close(r, dirs[1, -1])  # integer index: that layer's direction
    orthogonalize(reference, dirs[1, -1])
    edited = logits(model)
    assert (edited - before).abs().max() > 1e-2
    torch.testing.assert_close(edited, logits(reference), atol=1e-5, rtol=0)


def test_zero_weights_leave_the_model_unchanged():
    model = make_model("gpt2")
    layout, before = discover(model), state(model)
    params = params_for(components(layout), direction_index=0.5, max_weight=0.0)
    apply_trial(model, layout, params, random_directions(3, layout.hidden_size))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_restore_between_trials_is_exact():
    model = make_model("llama")
    layout, before = discover(model), state(model)
    originals = original_writers(layout)
    r = random_directions(3, layout.hidden_size)[2, 0]
    for peak in (0.3, 1.4):
        edit_writers(layout, originals, r, {"attn": [peak, 0.7], "mlp": [1.0, peak]})
        assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    restore_writers(layout, originals)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_direction_range_skips_zero_differences():
    norms = torch.tensor([[0.0, 0.0], [0.0, 2.0], [1.0, 3.0], [1.0, 3.0]])
    assert direction_range(norms, n_blocks=3, position=-1, skip_last=0.0) == (1, 3)
    assert direction_range(norms, n_blocks=3, position=0, skip_last=0.4) == (2, 2)
    with pytest.raises(UserError, match="no difference"):
        direction_range(torch.zeros(3, 2), n_blocks=2, position=-1, skip_last=0.0)


def test_choose_within_kl_limit_else_fewest_refusals():
    rec = lambda n, share, kl: TrialRecord(n, {}, share, kl, 0.0)  # noqa: E731
    trials = [rec(0, 0.5, 0.01), rec(1, 0.0, 0.5), rec(2, 0.25, 0.09), rec(3, 0.25, 0.05),
              rec(4, 0.0, 0.3)]  # fmt: skip
    assert choose(trials, kl_limit=0.1) == (trials[3], True)  # lowest share, tie by KL
    assert choose(trials, kl_limit=0.001) == (trials[4], False)  # none within: fewest, by KL
    assert choose(trials, kl_limit=0.02, baseline_share=0.5) == (trials[4], False)  # no gain


def dominates(a: TrialRecord, b: TrialRecord) -> bool:
    no_worse = a.refusal_share <= b.refusal_share and a.kl <= b.kl
    return no_worse and (a.refusal_share < b.refusal_share or a.kl < b.kl)


@pytest.fixture(scope="module")
def world():
    """A tiny llama, prompts, directions and refusal ids that split the harmful prompts."""
    tok = tiny_tokenizer("chatml")
    model = tiny_model("llama", vocab_size=len(tok)).eval()
    layout = discover(model)
    dirs, norms = compute_directions(model, tok, HARMFUL, HARMLESS, layout=layout)
    probs = torch.softmax(last_logits(model, tok, HARMFUL), -1).mean(0)
    order = probs.argsort(descending=True)
    half = int((probs[order].cumsum(0) < 0.5).sum()) + 1
    ids = order[:half].tolist()  # half the mass: refusal log-odds near 0, so edits flip some
    return model, tok, layout, dirs, norms, ids


def run_search(world, seed: int):
    model, tok, layout, dirs, norms, ids = world
    return search(model, tok, layout, dirs, norms, HARMFUL, HARMLESS, ids, n_trials=8,
                  kl_limit=KL_LIMIT, skip_last=0.0, seed=seed, batch_size=8)  # fmt: skip


def test_search_front_choice_restore_and_seed(world, tmp_path, monkeypatch):
    model, tok, layout, dirs, _, ids = world
    # a random model never writes a refusal marker: score refusals by first-token log-odds
    # over half the probability mass instead, so that edits flip some and a front exists
    first_token_share = lambda m, t, prompts, bs: float(  # noqa: E731
        (log_odds(last_logits(m, t, prompts, bs), ids) > 0).float().mean()
    )
    monkeypatch.setattr(steer_search, "refused_share", first_token_share)
    before = state(model)
    result = run_search(world, seed=3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # restored
    by_number = {t.number: t for t in result.trials}
    assert len(result.trials) == 8 and result.front
    front = [by_number[n] for n in result.front]
    assert not any(dominates(a, b) for a in front for b in front)
    rest = [t for t in result.trials if t.number not in result.front]
    assert all(any(dominates(f, t) for f in front) for t in rest)
    assert len(front) >= 2 and len({t.refusal_share for t in result.trials}) >= 3  # a trade-off
    assert result.chosen.number in result.front
    assert (result.chosen, result.passed) == choose(
        result.trials, KL_LIMIT, result.baseline_refusal_share
    )
    assert 1.0 <= result.chosen.params["direction_index"] <= 2.0  # layer 0 has no difference

    again = run_search(world, seed=3)
    assert again.chosen.params == result.chosen.params
    assert [t.params for t in again.trials] == [t.params for t in result.trials]
    other = run_search(world, seed=4)
    assert [t.params for t in other.trials] != [t.params for t in result.trials]

    assert plot_pareto(result, tmp_path / "pareto.png").stat().st_size > 1000
    base = last_logits(model, tok, HARMLESS)
    apply_trial(model, layout, result.chosen.params, dirs, position=-1)  # the baked edit...
    share = float((log_odds(last_logits(model, tok, HARMFUL), ids) > 0).float().mean())
    kl = float(kl_rows(last_logits(model, tok, HARMLESS), base).mean())
    assert share == result.chosen.refusal_share  # ...scores what the trial scored
    assert kl == pytest.approx(result.chosen.kl, abs=1e-6)
    model.load_state_dict(before)


def test_missing_optuna_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    with pytest.raises(UserError, match=r"search=optuna needs optuna: pip install optuna"):
        import_optuna()
    with pytest.raises(UserError, match="pip install optuna"):
        search(None, None, None, None, None, [], [], [])
