"""posttrain.rollout.sampler on tiny random models: HF greedy parity, exact log-probs, stopping."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from posttrain.evaluate.generate import cache_keyword, generate_ids, stop_token_ids
from posttrain.rollout import encode_prompts, sample
from posttrain.rollout.sampler import filter_logits, inverse_cdf
from tests.tiny import tiny_model, tiny_tokenizer

PROMPTS = [
    "The quick brown fox",
    "What is 12 plus 30? It is",
    "Paris is the capital of France. Berlin is",
    "Hello!",
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer("chatml")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tok):
    return tiny_model(request.param, vocab_size=len(tok)).eval()


def run(model, tok, prompts=PROMPTS, **kw):
    kw.setdefault("max_new_tokens", 12)
    ids = encode_prompts(tok, prompts, chat=False)
    return sample(model, ids, pad_token_id=tok.pad_token_id, tokenizer=tok, **kw)


def real(ids, mask):
    """The real tokens of each row (right- or left-padded) as lists."""
    return [[t for t, m in zip(row, ms) if m] for row, ms in zip(ids.tolist(), mask.tolist())]


def test_greedy_equals_hf_generate(model, tok):
    stops = stop_token_ids(tok)
    ours = run(model, tok, temperature=0, eos_token_ids=stops)
    hf = generate_ids(model, tok, PROMPTS, max_new_tokens=12, chat=False)
    assert real(ours.completion_ids, ours.completion_mask) == [new for _, new in hf]
    assert real(ours.prompt_ids, ours.prompt_mask) == [p for p, _ in hf]


def full_sequence_logprobs(model, rollout, temperature):
    """log softmax(forward(prompt + completion) / T) at the completion tokens, (B, T)."""
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    P = rollout.prompt_ids.shape[1]
    logp = torch.log_softmax(logits[:, P - 1 : -1].float() / temperature, -1)
    return logp.gather(-1, rollout.completion_ids[..., None])[..., 0]


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (7, 0.9)])
def test_logprobs_equal_a_full_forward(model, tok, top_k, top_p):
    T = 0.7
    gen = torch.Generator().manual_seed(0)
    r = run(model, tok, temperature=T, top_k=top_k, top_p=top_p, generator=gen)
    want = full_sequence_logprobs(model, r, T)
    m = r.completion_mask.bool()
    assert torch.allclose(r.logprobs[m], want[m], atol=1e-5)
    assert (r.logprobs[~m] == 0).all()


def test_top_k_top_p_filter_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.8)) == [True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.81)) == [True, True, True, False]
    assert kept(filter_logits(logits, top_p=0.1)) == [True, False, False, False]


def test_inverse_cdf_by_hand_and_in_frequency():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2]])
    at = lambda u: int(inverse_cdf(probs, torch.tensor([u]))[0])  # noqa: E731
    assert [at(0.0), at(0.49), at(0.5), at(0.79), at(0.81), at(0.999999)] == [1, 1, 3, 3, 4, 4]
    assert int(inverse_cdf(2 * probs, torch.tensor([0.5]))[0]) == 3  # unnormalised rows
    with pytest.raises(ValueError, match="not finite"):
        inverse_cdf(torch.tensor([[0.5, float("nan")]]), torch.tensor([0.3]))
    n = 200_000
    rows = probs.expand(n, -1)
    picks = inverse_cdf(rows, torch.rand(n, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(picks, minlength=5).double() / n
    assert torch.allclose(freq, probs[0].double(), atol=4e-3)  # about 4 standard errors


def test_sampled_tokens_stay_inside_top_k(model, tok):
    gen = torch.Generator().manual_seed(1)
    r = run(model, tok, temperature=1.0, top_k=1, generator=gen)
    greedy = run(model, tok, temperature=0)
    assert torch.equal(r.completion_ids, greedy.completion_ids)


def test_same_seed_same_samples(model, tok):
    def draw(seed):
        return run(model, tok, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(5), draw(5), draw(6)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # resume: a generator restored from a saved state continues identically
    gen = torch.Generator().manual_seed(5)
    run(model, tok, temperature=1.0, generator=gen)
    state = gen.get_state()
    second = run(model, tok, temperature=1.0, generator=gen)
    resumed = run(model, tok, temperature=1.0, generator=torch.Generator().set_state(state))
    assert torch.equal(second.completion_ids, resumed.completion_ids)


def test_eos_mask_and_ended(model, tok):
    free = run(model, tok, temperature=0)
    assert not free.ended.any() and free.completion_mask.all()
    eos = int(free.completion_ids[0, 2])  # pretend the 3rd greedy token of row 0 is EOS
    r = run(model, tok, temperature=0, eos_token_ids=[eos])
    for row in range(len(PROMPTS)):
        greedy = free.completion_ids[row].tolist()
        cut = greedy.index(eos) + 1 if eos in greedy else len(greedy)
        n = int(r.completion_mask[row].sum())
        assert n == cut
        assert r.completion_ids[row, :n].tolist() == greedy[:cut]
        assert r.completion_mask[row, n:].sum() == 0 and (r.logprobs[row, n:] == 0).all()
        assert (r.completion_ids[row, n:] == tok.pad_token_id).all()
        assert bool(r.ended[row]) == (eos in greedy)
    assert r.ended[0] and int(r.completion_mask[0].sum()) <= 3


def test_stop_strings_cut(model, tok):
    free = run(model, tok, temperature=0)
    text = tok.decode(free.completion_ids[1].tolist())
    stop = text[4:7]  # three characters in the middle of row 1's greedy completion
    r = run(model, tok, temperature=0, stop_strings=[stop])
    assert r.ended[1]
    ids = r.completion_ids[1, : int(r.completion_mask[1].sum())].tolist()
    assert stop in tok.decode(ids) and stop not in tok.decode(ids[:-1])
    assert ids == free.completion_ids[1, : len(ids)].tolist()


def test_batched_equals_one_by_one(model, tok):
    batch = run(model, tok, temperature=0)
    for row, prompt in enumerate(PROMPTS):
        one = run(model, tok, [prompt], temperature=0)
        assert torch.equal(one.completion_ids[0], batch.completion_ids[row])
        assert torch.allclose(one.logprobs[0], batch.logprobs[row], atol=1e-5)


def test_chat_prompts_and_texts(tok):
    model = tiny_model("qwen2", vocab_size=len(tok))
    ids = encode_prompts(tok, ["Hello!", [{"role": "user", "content": "Hi"}]])
    assert tok.decode(ids[0]).endswith("<|im_start|>assistant\n")
    r = sample(model, ids, pad_token_id=tok.pad_token_id, max_new_tokens=4, temperature=0)
    assert len(r.completions(tok)) == 2 and r.completion_ids.shape == (2, 4)


def test_the_cache_goes_by_the_keyword_the_model_takes(model, tok):
    from peft import LoraConfig, get_peft_model

    keyword = cache_keyword(model)
    assert keyword in inspect.signature(model.forward).parameters
    llama = tiny_model("llama", vocab_size=len(tok))
    plain = cache_keyword(llama)
    assert (
        cache_keyword(get_peft_model(llama, LoraConfig(r=2, target_modules="all-linear"))) == plain
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(model, tok, temperature=0, max_new_tokens=3)
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_repeated_prompts_prefill_once_and_sample_as_if_apart(model, tok):
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[0]]
    calls = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        greedy = run(model, tok, prompts, temperature=0)
    finally:
        hook.remove()
    assert calls[0][0] == 2 and all(shape[0] == 5 for shape in calls[1:])
    apart = run(model, tok, PROMPTS[:2], temperature=0)
    for row, source in enumerate([1, 0, 1, 1, 0]):
        assert torch.equal(greedy.completion_ids[row], apart.completion_ids[source])
    gen = torch.Generator().manual_seed(0)
    sampled = run(model, tok, prompts, temperature=1.0, generator=gen)
    m = sampled.completion_mask.bool()
    want = full_sequence_logprobs(model, sampled, 1.0)
    assert torch.allclose(sampled.logprobs[m], want[m], atol=1e-5)
    assert len({tuple(r) for r in sampled.completion_ids[[0, 2, 3]].tolist()}) > 1


def test_fused_lora_policy_samples_what_training_recomputes(tok):
    from peft import LoraConfig, get_peft_model

    from posttrain.modeling.fused import fuse

    torch.manual_seed(0)
    policy = get_peft_model(
        tiny_model("llama", vocab_size=len(tok)), LoraConfig(r=4, target_modules="all-linear")
    )
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    assert fuse(policy)["lora"] > 0
    gen = torch.Generator().manual_seed(0)
    r = run(policy, tok, [PROMPTS[0]] * 3 + PROMPTS[1:], temperature=0.8, generator=gen)
    policy.train()  # the trainer's forward: with grad, through the fused autograd functions
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    mask = torch.cat([r.prompt_mask, r.completion_mask], 1)
    logits = policy(input_ids=ids, attention_mask=mask,
                    position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits  # fmt: skip
    P = r.prompt_ids.shape[1]
    logp = torch.log_softmax(logits[:, P - 1 : -1].float() / 0.8, -1)
    want = logp.gather(-1, r.completion_ids[..., None])[..., 0].detach()
    m = r.completion_mask.bool()
    assert torch.allclose(r.logprobs[m], want[m], atol=1e-5)


def test_preallocated_layer_attends_to_what_cat_would():
    from transformers.cache_utils import DynamicLayer

    from posttrain.rollout.cache import PreallocatedLayer, preallocated_cache

    ours, theirs = PreallocatedLayer(capacity=7), DynamicLayer()
    chunks = [torch.randn(3, 2, n, 4) for n in (4, 1, 1)]
    for chunk in chunks:
        got, want = ours.update(chunk, -chunk), theirs.update(chunk, -chunk)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert ours.get_seq_length() == 6
    ours.batch_select_indices(torch.tensor([2, 2, 0]))
    theirs.batch_select_indices(torch.tensor([2, 2, 0]))
    step = torch.randn(3, 2, 1, 4)
    assert torch.equal(ours.update(step, step)[0], theirs.update(step, step)[0])
    with pytest.raises(RuntimeError, match="holds 7 positions"):
        ours.update(step, step)
    cache = preallocated_cache(tiny_model("llama").config, capacity=5)
    assert all(isinstance(layer, PreallocatedLayer) for layer in cache.layers)


def test_sliding_window_layers_keep_their_cache_and_match_generate(tok):
    from transformers import AutoModelForCausalLM

    from posttrain.rollout.cache import preallocated_cache
    from tests.tiny import tiny_config

    config = tiny_config("mistral", len(tok))
    config.sliding_window = 4  # shorter than every prompt: the window is what attends
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()
    layers = preallocated_cache(config, 8).layers
    assert {type(layer).__name__ for layer in layers} == {"DynamicSlidingWindowLayer"}
    prompts = [PROMPTS[2], PROMPTS[0], PROMPTS[2]]
    ours = run(model, tok, prompts, temperature=0, eos_token_ids=stop_token_ids(tok))
    hf = generate_ids(model, tok, prompts, max_new_tokens=12, chat=False)
    assert real(ours.completion_ids, ours.completion_mask) == [new for _, new in hf]
