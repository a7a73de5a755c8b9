"""The batching engine: one background thread that generates concurrent requests together.

Requests (prompt token ids + sampling parameters + a `sink` callback for events) are put on a
queue from any thread. The engine thread takes the oldest waiting request, waits up to
`batch_wait_s` for more, and runs up to `max_batch_size` rows (a request with `n` choices is
`n` rows) that use the same model (the base or one LoRA adapter) as one left-padded batch:
one prefill forward, then one forward per new token through HF's KV cache. Every row has
its own temperature, top_p, seed (a torch.Generator per row), max_tokens and stop strings.
Finished rows leave the batch and the cache at once, so short answers do not keep paying
for long ones. Text is streamed as `Delta` events (held back while it could still be the
start of a stop string), then one `Finish` per choice; a failing batch sends `Failure`.

Several LoRA adapters share one base through peft's multi-adapter `PeftModel`
(`load_adapter(path, adapter_name=...)`, `set_adapter`); the base itself is served with the
adapters disabled. Only the engine thread touches the model, so switching is safe.

Simplified on purpose: static batches (a running batch does not admit new requests until
it finishes; vLLM's continuous batching and paged KV cache are the `engine=vllm` option),
one device, no logprobs, no beam search.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from posttrain.evaluate.generate import (
    cache_keyword,
    device_of,
    pad_id,
    returned_cache,
    stop_token_ids,
)
from posttrain.rollout.sampler import inverse_cdf

log = logging.getLogger(__name__)


@dataclass
class Delta:
    """New text of choice `index` (`tokens`: how many new tokens it came from)."""

    index: int
    text: str
    tokens: int


@dataclass
class Finish:
    """Choice `index` ended: `reason` is "stop" (stop token or string) or "length"."""

    index: int
    reason: str
    completion_tokens: int


@dataclass
class Failure:
    """The batch holding this request failed; `message` says why."""

    message: str


Event = Delta | Finish | Failure


@dataclass
class Request:
    """One prompt to complete `n` times; events go to `sink` (called from the engine thread)."""

    prompt_ids: list[int]
    sink: Callable[[Event], None]
    model: str = ""  # "" = the base model, else an adapter name
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1
    first_index: int = 0  # choice indices are first_index .. first_index + n - 1
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Row:
    """One choice being generated: its request, generator, tokens and text so far."""

    request: Request
    index: int
    generator: torch.Generator
    ids: list[int] = field(default_factory=list)
    sent: str = ""  # text already sent as deltas
    sent_tokens: int = 0


# ----------------------------------------------------------------------------- pure helpers


def sample_next(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, generators: list
) -> torch.Tensor:
    """(B,) next tokens from (B, V) logits: greedy where temperature is 0, else nucleus
    sampling at each row's temperature and top_p with each row's generator."""
    greedy = logits.argmax(-1)  # (B,)
    if bool((temperature == 0).all()):
        return greedy
    scaled = logits.float() / temperature.clamp(min=1e-5)[:, None]  # (B, V)
    probs = scaled.softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)  # (B, V)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
    sorted_probs = sorted_probs.masked_fill(before >= top_p[:, None], 0.0)  # keeps the top one
    uniforms = torch.stack([torch.rand((), generator=g, device=g.device) for g in generators])
    picks = order.gather(-1, inverse_cdf(sorted_probs, uniforms.to(probs.device))[:, None])[:, 0]
    return torch.where(temperature > 0, picks, greedy)


def split_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """(text before the earliest stop string, whether one occurred)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def safe_prefix(text: str, stops: list[str]) -> str:
    """The part of `text` that can be sent now: not a possible start of a stop string, and not
    ending in an incomplete UTF-8 character (decoded as U+FFFD)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    text = text[: len(text) - hold]
    return text.rstrip("\ufffd")


def left_pad(prompts: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    """Left-padded input_ids, attention_mask and position_ids for a batch of prompts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


# ----------------------------------------------------------------------------- the engine


class Engine:
    """Owns the model and a thread that serves queued `Request`s in batches.

    `model` is a plain causal LM or a peft `PeftModel` holding `adapters` (names); requests
    name one of them in `model`, or "" for the base.
    """

    def __init__(
        self,
        model,
        tokenizer,
        adapters: tuple[str, ...] = (),
        max_batch_size: int = 16,
        batch_wait_s: float = 0.005,
    ):
        self.model, self.tok = model, tokenizer
        self.adapters = tuple(adapters)
        self.max_batch_size = max(1, int(max_batch_size))
        self.batch_wait_s = batch_wait_s
        self.stop_ids = set(stop_token_ids(tokenizer))
        self.pad = pad_id(tokenizer)
        self.batch_sizes: list[int] = []  # rows per batch run, for tests and benchmarks
        self._inbox: queue.Queue[Request | None] = queue.Queue()
        self._waiting: list[Request] = []
        self._running = threading.Event()  # cleared = paused (requests queue up)
        self._running.set()
        self._thread: threading.Thread | None = None

    # -- control (any thread)

    def submit(self, request: Request) -> None:
        if request.model and request.model not in self.adapters:
            raise ValueError(f"unknown adapter {request.model!r}")
        self._inbox.put(request)

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="posttrain-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._running.set()
            self._inbox.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def pause(self) -> None:
        """Hold new batches (the running one finishes); requests wait until `resume`."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def queued(self) -> int:
        """Requests submitted and not yet started."""
        return self._inbox.qsize() + len(self._waiting)

    # -- the engine thread

    def _loop(self) -> None:
        while True:
            self._running.wait()
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                continue
            try:
                self._generate(batch)
            except Exception as exc:  # a bug or OOM: fail these requests, keep serving
                log.exception("generation failed")
                for request in batch:
                    request.sink(Failure(f"generation failed: {type(exc).__name__}: {exc}"))

    def _pull(self, timeout: float) -> bool:
        """Move one request from the inbox to `_waiting`; False on timeout or shutdown."""
        try:
            item = self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return False
        if item is None:
            self._inbox.put(None)  # seen again by _next_batch after this batch
            return False
        self._waiting.append(item)
        return True

    def _next_batch(self) -> list[Request] | None:
        """The oldest request plus others for the same model, up to max_batch_size rows.

        Blocks until a request is there (None on shutdown), then waits up to `batch_wait_s`
        for more so that requests arriving together share one batch."""
        if not self._waiting:
            item = self._inbox.get()
            if item is None:
                return None
            self._waiting.append(item)
        self._running.wait()  # paused: requests gather in the inbox until `resume`
        deadline = time.monotonic() + self.batch_wait_s
        while self._rows_for(self._waiting[0].model) < self.max_batch_size:
            left = deadline - time.monotonic()
            if left <= 0 or not self._pull(left):
                break
        while self._pull(0):  # take everything already queued, without waiting
            pass
        live = [r for r in self._waiting if not r.cancelled.is_set()]
        if not live:
            self._waiting = []
            return []
        model, rows, batch, rest = live[0].model, 0, [], []
        for request in live:
            if request.model == model and (rows + request.n <= self.max_batch_size or not batch):
                batch.append(request)
                rows += request.n
            else:
                rest.append(request)
        self._waiting = rest
        return batch

    def _rows_for(self, model: str) -> int:
        return sum(r.n for r in self._waiting if r.model == model)

    def _use_adapter(self, name: str):
        """Context in which the model runs adapter `name`, or the bare base for ""."""
        if not self.adapters:
            return contextlib.nullcontext()
        if not name:
            return self.model.disable_adapter()
        self.model.set_adapter(name, inference_mode=True)
        return contextlib.nullcontext()

    def _generate(self, batch: list[Request]) -> None:
        device = device_of(self.model)
        rows = [
            Row(r, r.first_index + k, make_generator(r.seed, k, device))
            for r in batch
            for k in range(r.n)
        ]
        self.batch_sizes.append(len(rows))
        inputs = left_pad([row.request.prompt_ids for row in rows], self.pad)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        mask, positions = inputs["attention_mask"], inputs["position_ids"][:, -1:]
        temperature = torch.tensor([r.request.temperature for r in rows], device=device)
        top_p = torch.tensor([r.request.top_p for r in rows], device=device)
        with torch.inference_mode(), self._use_adapter(batch[0].model):
            out = self.model(**inputs, use_cache=True)
            cache, keyword = returned_cache(out), cache_keyword(self.model)
            while rows:
                logits = out.logits[:, -1]  # (B, V)
                tokens = sample_next(logits, temperature, top_p, [r.generator for r in rows])
                keep = [i for i, row in enumerate(rows) if not self._advance(row, int(tokens[i]))]
                if not keep:
                    break
                if len(keep) < len(rows):
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    rows = [rows[i] for i in keep]
                    tokens, mask, positions = tokens[index], mask[index], positions[index]
                    temperature, top_p = temperature[index], top_p[index]
                mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
                positions = positions + 1
                out = self.model(
                    input_ids=tokens[:, None],
                    attention_mask=mask,
                    position_ids=positions,
                    **{keyword: cache},
                    use_cache=True,
                )

    def _advance(self, row: Row, token: int) -> bool:
        """Add `token` to `row`, send what text is safe; True when the row has finished."""
        request = row.request
        if request.cancelled.is_set():
            return True
        stopped = token in self.stop_ids
        if not stopped:
            row.ids.append(token)
        text = self.tok.decode(row.ids, skip_special_tokens=True)
        text, hit = split_at_stop(text, request.stop)
        stopped = stopped or hit
        done = stopped or len(row.ids) >= request.max_tokens
        ready = text if done else safe_prefix(text, request.stop)
        used = len(row.ids) + (1 if token in self.stop_ids else 0)
        if len(ready) > len(row.sent):
            request.sink(Delta(row.index, ready[len(row.sent) :], used - row.sent_tokens))
            row.sent, row.sent_tokens = ready, used
        if done:
            request.sink(Finish(row.index, "stop" if stopped else "length", used))
        return done


def make_generator(seed: int | None, choice: int, device: torch.device) -> torch.Generator:
    """A generator for one choice: `seed + choice` when seeded, else fresh entropy."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed + choice if seed is not None else random.getrandbits(63))
    return generator
