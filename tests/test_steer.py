"""Steering machinery on random-weight models of every family: hooks == weights == LoRA."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from posttrain.errors import UserError
from posttrain.steer.activations import mean_activations, post_instruction_length
from posttrain.steer.directions import difference_of_means, interpolate_layers, project_out
from posttrain.steer.interventions import (
    AdapterUnsupported,
    ablation_hooks,
    activation_addition,
    orthogonalize,
    save_as_lora,
    unit,
)
from posttrain.steer.residual import discover
from tests.tiny import tiny_config, tiny_tokenizer

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "gpt2")
VOCAB = 400


EXTRA = {  # families tests/tiny.py does not build
    "phi3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, decoder_sparse_step=1),
    "gpt_neox": dict(),
}  # fmt: skip


def make_model(family: str, tied: bool = False, seed: int = 0):
    """A tiny random model (2 layers, hidden 64). Biases are randomised (GPT-2 initialises
    them to zero) so the bias edits are exercised."""
    torch.manual_seed(seed)
    if family in EXTRA:
        config = AutoConfig.for_model(
            family, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            vocab_size=VOCAB, **EXTRA[family],
        )  # fmt: skip
    else:
        config = tiny_config(family, VOCAB)
    config.tie_word_embeddings = tied
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def direction(model, seed: int = 1) -> torch.Tensor:
    """A direction with a large share of the embedding's mean, so ablation changes a lot."""
    g = torch.Generator().manual_seed(seed)
    emb = model.get_input_embeddings().weight.detach()
    d = emb.shape[1]
    return unit(emb.mean(0) / emb.mean(0).norm() + torch.randn(d, generator=g) / d**0.5)


def inputs(seed: int = 2) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


@pytest.mark.parametrize(
    "family", FAMILIES + ("gpt2-tied", "gemma-tied", "mixtral", "qwen2_moe", "gpt_neox")
)
def test_hooks_equal_weight_orthogonalisation(family):
    name, tied = family.split("-")[0], family.endswith("-tied")
    model, ids = make_model(name, tied=tied), inputs()
    r = direction(model)
    before = logits(model, ids)
    with ablation_hooks(model, r):
        hooked = logits(model, ids)
    assert torch.equal(logits(model, ids), before)  # hooks removed on exit
    orthogonalize(model, r)
    edited = logits(model, ids)
    assert (hooked - before).abs().max() > 1e-2  # the edit matters...
    torch.testing.assert_close(edited, hooked, atol=2e-5, rtol=1e-4)  # ...and both agree
    if tied:  # the lm_head was untied, not edited
        head = model.get_output_embeddings().weight
        assert head.data_ptr() != model.get_input_embeddings().weight.data_ptr()
        assert (head @ r).abs().max() > 1e-3


def block_streams(model, ids, layout) -> list[torch.Tensor]:
    """Every block's input and output, captured by our own hooks."""
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, a, k: seen.append(
        (a[0] if a else k["hidden_states"]).detach()), with_kwargs=True)
        for b in layout.blocks]  # fmt: skip
    handles += [b.register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach()))
        for b in layout.blocks]  # fmt: skip
    logits(model, ids)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma"])
def test_residual_has_no_component_along_r(family):
    model, ids = make_model(family), inputs()
    layout, r = discover(model), direction(model)
    assert max(float((x @ r).abs().max()) for x in block_streams(model, ids, layout)) > 1e-2
    with ablation_hooks(model, r, layout):
        streams = block_streams(model, ids, layout)
    assert len(streams) == 2 * len(layout.blocks)
    for x in streams:
        assert float((x @ r).abs().max()) < 1e-5 * float(x.abs().max()) * x.shape[-1]
    orthogonalize(model, r, layout=layout)
    for x in block_streams(model, ids, layout):
        assert float((x @ r).abs().max()) < 1e-5 * float(x.abs().max()) * x.shape[-1]


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_adapter_matches_orthogonalised_weights(family, tmp_path):
    model, ids = make_model(family), inputs()
    r = direction(model)
    before = logits(model, ids)
    save_as_lora(model, r, tmp_path / "adapter")
    torch.testing.assert_close(logits(model, ids), before, atol=0, rtol=0)  # model untouched
    assert all(p.requires_grad for p in model.parameters())
    peft_model = PeftModel.from_pretrained(make_model(family), str(tmp_path / "adapter")).eval()
    orthogonalize(model, r)
    expected = logits(model, ids)
    torch.testing.assert_close(logits(peft_model, ids), expected, atol=2e-5, rtol=1e-4)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(logits(merged, ids), expected, atol=2e-5, rtol=1e-4)


def test_adapter_unsupported_cases():
    model = make_model("gemma", tied=True)
    with pytest.raises(AdapterUnsupported, match="tied"):
        save_as_lora(model, direction(model), "/nonexistent")
    model = make_model("mixtral")
    with pytest.raises(AdapterUnsupported, match="experts"):
        save_as_lora(model, direction(model), "/nonexistent")


def test_norm_preserving_keeps_norms_and_orthogonality():
    model = make_model("gpt2")
    layout, r = discover(model), direction(model)
    old = {w.name: w.weight.detach().clone() for w in layout.all_writers()}
    orthogonalize(model, r, norm_preserving=True, layout=layout)
    for w in layout.all_writers():
        new, axis = w.weight.detach(), w.out_dim
        norms_old = old[w.name].norm(dim=axis)
        torch.testing.assert_close(new.norm(dim=axis), norms_old, atol=1e-5, rtol=1e-5)
        along_r = (new.movedim(axis, -1) @ r).abs().max()
        assert along_r < 1e-5
    emb = {w.name for w in layout.embeddings}
    assert emb == {"transformer.wte", "transformer.wpe"}


def test_activation_addition_shifts_projection_by_coeff():
    model, ids = make_model("qwen2"), inputs()
    layout, r, layer = discover(model), direction(model), 1
    seen = []
    grab = lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]) @ r)  # noqa: E731
    for coeff in (0.0, 3.0, -2.0):
        with activation_addition(model, r * 7.0, coeff, layer, layout):
            h = layout.blocks[layer].register_forward_pre_hook(grab, with_kwargs=True)
            logits(model, ids)
            h.remove()
    base, plus, minus = seen
    torch.testing.assert_close(plus - base, torch.full_like(base, 3.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(minus - base, torch.full_like(base, -2.0), atol=1e-4, rtol=0)


def test_difference_of_means_on_synthetic_activations():
    g = torch.Generator().manual_seed(0)
    layers, positions, d = 3, 2, 16
    true = unit(torch.randn(d, generator=g))
    harmless = torch.randn(200, layers, positions, d, generator=g) + 2.0
    harmful = torch.randn(200, layers, positions, d, generator=g) + 2.0 + 4.0 * true
    dirs = difference_of_means(harmful.mean(0), harmless.mean(0))
    assert dirs.shape == (layers, positions, d)
    torch.testing.assert_close(dirs.norm(dim=-1), torch.ones(layers, positions))
    assert float((dirs @ true).min()) > 0.95
    projected = difference_of_means(harmful.mean(0), harmless.mean(0), projected=True)
    h = harmless.mean(0)
    assert float((projected * h).sum(-1).abs().max()) < 1e-4
    torch.testing.assert_close(projected.norm(dim=-1), torch.ones(layers, positions))
    torch.testing.assert_close(project_out(true, true), torch.zeros(d), atol=1e-6, rtol=0)
    mid = interpolate_layers(dirs, 0.5, position=-1)
    torch.testing.assert_close(mid, unit(dirs[0, -1] + dirs[1, -1]))


def test_mean_activations_match_hidden_states_per_prompt():
    tok = tiny_tokenizer("chatml")
    model = make_model("llama")
    prompts = ["Hello!", "What is 12 plus 30? It is a question.", "Paris"]
    k = post_instruction_length(tok)
    rendered = tok.apply_chat_template([{"role": "user", "content": "Paris"}],
                                       tokenize=False, add_generation_prompt=True)  # fmt: skip
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[-k:]) == "<|im_end|>\n<|im_start|>assistant\n"
    means = mean_activations(model, tok, prompts, batch_size=2)  # left-padded batches
    expected = torch.zeros_like(means)
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}],
                                       tokenize=False, add_generation_prompt=True)  # fmt: skip
        one = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        last: list = []  # the last block's output, before the final norm
        h = model.model.layers[-1].register_forward_hook(lambda m, a, o, last=last: last.append(o))
        with torch.no_grad():
            hs = model(input_ids=one, output_hidden_states=True).hidden_states
        h.remove()
        for layer in range(2):  # hidden_states[l] is the input of block l
            expected[layer] += hs[layer][0, -k:] / len(prompts)
        out = last[0][0] if isinstance(last[0], tuple) else last[0]
        expected[2] += out[0, -k:] / len(prompts)
    assert means.shape == (3, k, 64)
    torch.testing.assert_close(means, expected, atol=1e-4, rtol=1e-4)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.mix = nn.LayerNorm(8), nn.Linear(8, 8)


class _OddLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(num_hidden_layers=2)
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([_Block(), _Block()])

    def get_input_embeddings(self):
        return self.embed


def test_unknown_architecture_names_module_types():
    with pytest.raises(UserError, match=r"module types: LayerNorm, Linear.*linear layers: mix"):
        discover(_OddLM())


def test_discovery_finds_every_writer_kind():
    names = {w.name for w in discover(make_model("phi3")).all_writers()}
    assert names == {"model.embed_tokens"} | {
        f"model.layers.{i}.{n}" for i in (0, 1) for n in ("self_attn.o_proj", "mlp.down_proj")
    }
    gpt2 = discover(make_model("gpt2"))
    kinds = {(w.kind, w.bias) for w in gpt2.writers[0]}
    assert kinds == {("conv1d", "bias")}


def test_select_candidate_filters_then_minimises():
    from posttrain.steer.abliterate import Candidate, select_candidate

    cands = [
        Candidate(0, -1, ablated_refusal=-5.0, added_refusal=-1.0, kl=0.01),  # induces nothing
        Candidate(1, -1, ablated_refusal=-4.0, added_refusal=2.0, kl=0.5),  # KL too high
        Candidate(2, -1, ablated_refusal=-3.0, added_refusal=1.0, kl=0.05),
        Candidate(3, -2, ablated_refusal=-1.0, added_refusal=1.0, kl=0.05),
    ]
    best = select_candidate(cands, kl_limit=0.1)
    assert (best.layer, best.passed) == (2, True)
    assert [c.passed for c in cands] == [False, False, True, True]
    fallback = select_candidate(cands[:2], kl_limit=0.1)
    assert (fallback.layer, fallback.passed) == (0, False)


def test_first_token_counts_and_candidate_scores():
    from posttrain.steer.abliterate import compute_directions, first_token_counts, score_candidates

    counts = first_token_counts([[5, 1], [5], [7, 2], [9]], [True, True, True, False])
    assert counts.most_common() == [(5, 2), (7, 1)]
    tok, model = tiny_tokenizer("chatml"), make_model("llama")
    harmful, harmless = ["Translate cheese.", "Reverse stone."], ["Hello!", "What is 12?"]
    dirs, norms = compute_directions(model, tok, harmful, harmless)
    assert dirs.shape[:2] == norms.shape and dirs.shape[0] == 3  # 2 block inputs + the output
    assert float(norms[0].max()) == 0.0  # layer 0: the same template tokens in both sets
    cands = score_candidates(model, tok, dirs, norms, harmful, harmless, [5, 7], skip_last=0.0)
    positions = range(-dirs.shape[1], 0)
    assert {(c.layer, c.position) for c in cands} == {(lay, p) for lay in (1, 2) for p in positions}
    assert all(c.kl >= 0 for c in cands)
    pinned = score_candidates(model, tok, dirs, norms, harmful, harmless, [5], layers=[2],
                              positions=[-1])  # fmt: skip
    assert [(c.layer, c.position) for c in pinned] == [(2, -1)]


def test_candidate_layers_skip_the_last_fifth_of_blocks():
    from posttrain.steer.abliterate import candidate_layers

    assert candidate_layers(5, 4, 0.2) == [0, 1, 2, 3, 4]  # 4 blocks: floor(0.8) = 0 skipped
    assert candidate_layers(33, 32, 0.2) == list(range(27))  # 32 blocks: 6 skipped
    assert candidate_layers(3, 2, 0.9) == [0, 1]


def test_activation_addition_prompt_only_leaves_cached_decoding_alone():
    """prompt_only shifts the prefill (the prompt) and not the one-token decoding steps: the
    first reply token's logits change, a step fed the same cache is the model's own."""
    model, ids = make_model("llama"), inputs()
    layout, r = discover(model), direction(model)
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=True)
        with activation_addition(model, r, 4.0, 1, layout, prompt_only=True):
            shifted = model(input_ids=ids, use_cache=True)
            nxt, cache = shifted.logits[:, -1:].argmax(-1), shifted.past_key_values
            step = model(input_ids=nxt, past_key_values=copy.deepcopy(cache)).logits
        free = model(input_ids=nxt, past_key_values=copy.deepcopy(cache)).logits
    assert (shifted.logits - plain.logits).abs().max() > 1e-2  # the prompt is steered
    torch.testing.assert_close(step, free)  # decoding steps are not


def test_activation_addition_at_the_final_stream_point():
    model, ids = make_model("llama"), inputs()
    layout, r = discover(model), direction(model)
    seen = []
    h = layout.blocks[-1].register_forward_hook(lambda m, a, o: seen.append(o))
    with activation_addition(model, r, 2.5, len(layout.blocks), layout):
        h2 = model.model.norm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        logits(model, ids)
        h2.remove()
    h.remove()
    block_out = seen[0][0] if isinstance(seen[0], tuple) else seen[0]
    torch.testing.assert_close((seen[1] - block_out) @ r, torch.full(block_out.shape[:2], 2.5),
                               atol=1e-4, rtol=0)  # fmt: skip
    with (
        pytest.raises(ValueError, match="out of range"),
        activation_addition(model, r, 1.0, len(layout.blocks) + 1, layout),
    ):
        pass
