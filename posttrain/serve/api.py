"""The OpenAI-compatible HTTP API (FastAPI) in front of the batching engine.

Routes: `GET /v1/models`, `POST /v1/chat/completions` and `POST /v1/completions` (both
streamed over server-sent events with `stream: true`), `GET /health`. Request bodies are
checked strictly (a string where a number belongs is an error, not coerced); every error is
OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 for malformed JSON,
wrong types, bad values, `max_tokens` beyond the context or prompts over it; 404 for an
unknown model or route; 401 for a missing or wrong key when the server has one (every route
but /health). The `model` field picks the base (its served name) or a LoRA adapter by name.
Usage counts the prompt once and the tokens generated for every choice (stop token included).

Simplified on purpose: no logprobs, tools, response_format, penalties, logit_bias or echo
(unknown fields are ignored, as OpenAI-compatible servers commonly do); completions take
text prompts (a string or a list of strings), not token ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from posttrain.evaluate.generate import render
from posttrain.serve import engine as eng

MAX_N = 16
MAX_STOPS = 4


# ----------------------------------------------------------------------------- request bodies


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class Sampling(BaseModel):
    """Fields shared by chat and text completions."""

    model: StrictStr
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat = Field(1.0, ge=0, le=2)
    top_p: StrictFloat = Field(1.0, gt=0, le=1)
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stop: StrictStr | list[StrictStr] | None = Field(None)
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise ApiError(400, f"stop: at most {MAX_STOPS} stop strings", "stop")
        return [s for s in stops if s]


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None

    def as_dict(self) -> dict:
        content = self.content or ""
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)


class CompletionRequest(Sampling):
    prompt: StrictStr | list[StrictStr]
    max_tokens: StrictInt | None = Field(16, ge=1)  # OpenAI's default for completions


# ----------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    kind = {401: "authentication_error", 404: "invalid_request_error", 500: "server_error"}
    body = {
        "message": message,
        "type": kind.get(status, "invalid_request_error"),
        "param": param,
        "code": code,
    }
    return JSONResponse({"error": body}, status_code=status)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line for the first problem in a request body, and the offending field."""
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg', '')}", None
    param = ".".join(loc) or None
    where = f"{param}: " if param else "request body: "
    return where + first.get("msg", "invalid value"), param


# ----------------------------------------------------------------------------- the server


@dataclass
class Served:
    """What the server offers: the engine, its tokenizer, the names it answers to."""

    engine: eng.Engine
    tokenizer: object
    base_name: str
    adapters: dict[str, str] = field(default_factory=dict)  # name -> adapter folder
    context_length: int = 2048
    created: int = field(default_factory=lambda: int(time.time()))

    def adapter_for(self, model: str) -> str:
        """The engine's adapter name for a request's `model` ("" = base), or a 404."""
        if model == self.base_name:
            return ""
        if model in self.adapters:
            return model
        raise ApiError(
            404,
            f"The model `{model}` does not exist. Served: {', '.join(self.names())}",
            "model",
            "model_not_found",
        )

    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]


def model_card(served: Served, name: str) -> dict:
    card = {"id": name, "object": "model", "created": served.created, "owned_by": "posttrain"}
    if name != served.base_name:
        card["parent"] = served.base_name
    return card


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def encode_checked(served: Served, text: str, max_tokens: int | None, special: bool, what: str):
    """(prompt ids, max_tokens) after checking both against the context length."""
    ids = served.tokenizer(text, add_special_tokens=special)["input_ids"]
    limit = served.context_length
    if not ids:
        raise ApiError(400, f"{what}: the prompt is empty", what)
    if len(ids) >= limit:
        raise ApiError(
            400,
            f"{what}: the prompt is {len(ids)} tokens; the model's context length is {limit}",
            what,
            "context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = limit - len(ids)
    if len(ids) + max_tokens > limit:
        raise ApiError(
            400,
            f"max_tokens: {max_tokens} new tokens + {len(ids)} prompt tokens exceed the model's "
            f"context length of {limit}",
            "max_tokens",
            "context_length_exceeded",
        )
    return ids, max_tokens


def chat_prompt(served: Served, body: ChatRequest) -> tuple[list[int], int]:
    messages = [m.as_dict() for m in body.messages]
    try:
        text = render(served.tokenizer, [messages])[0]
    except Exception as exc:  # the chat template rejected the conversation
        raise ApiError(400, f"messages: the chat template failed: {exc}", "messages") from None
    max_tokens = body.max_completion_tokens or body.max_tokens
    return encode_checked(served, text, max_tokens, False, "messages")


class Job:
    """The engine requests behind one HTTP request, and their events as an async stream."""

    def __init__(self, served: Served, body: Sampling, prompts: list[tuple[list[int], int]]):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        adapter = served.adapter_for(body.model)
        stops, seed = body.stops(), body.seed

        def sink(event: eng.Event) -> None:
            loop.call_soon_threadsafe(self.events.put_nowait, event)

        self.requests = [
            eng.Request(
                prompt_ids=ids,
                sink=sink,
                model=adapter,
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                stop=stops,
                seed=None if seed is None else seed + k * body.n,
                n=body.n,
                first_index=k * body.n,
            )
            for k, (ids, max_tokens) in enumerate(prompts)
        ]
        self.prompt_tokens = sum(len(ids) for ids, _ in prompts)
        self.choices = len(prompts) * body.n
        self.completion_tokens = 0
        for request in self.requests:
            served.engine.submit(request)

    async def stream(self) -> AsyncIterator[eng.Delta | eng.Finish]:
        """Deltas and finishes until every choice has finished; cancels what is left on exit."""
        finished = 0
        try:
            while finished < self.choices:
                event = await self.events.get()
                if isinstance(event, eng.Failure):
                    raise ApiError(500, event.message, None, "generation_failed")
                if isinstance(event, eng.Finish):
                    finished += 1
                    self.completion_tokens += event.completion_tokens
                yield event
        finally:
            for request in self.requests:
                request.cancelled.set()

    def usage(self) -> dict:
        return usage(self.prompt_tokens, self.completion_tokens)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def run_job(job: Job, chat: bool, head: dict) -> dict:
    """The complete (non-streamed) response of a job."""
    texts = [""] * job.choices
    reasons = ["length"] * job.choices
    async for event in job.stream():
        if isinstance(event, eng.Delta):
            texts[event.index] += event.text
        else:
            reasons[event.index] = event.reason
    choices = []
    for i, (text, reason) in enumerate(zip(texts, reasons)):
        content = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        choices.append({"index": i, **content, "logprobs": None, "finish_reason": reason})
    return {**head, "choices": choices, "usage": job.usage()}


async def stream_job(job: Job, chat: bool, head: dict, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text, a final chunk per choice, [DONE]."""

    def chunk(index: int, text: str | None, reason: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            payload = {"index": index, "delta": delta}
        else:
            payload = {"index": index, "text": text or ""}
        choice = {**payload, "logprobs": None, "finish_reason": reason}
        return sse({**head, "choices": [choice]})

    if chat:
        for i in range(job.choices):
            yield chunk(i, None, None, role=True)
    try:
        async for event in job.stream():
            if isinstance(event, eng.Delta):
                yield chunk(event.index, event.text, None)
            else:
                yield chunk(event.index, None, event.reason)
    except ApiError as exc:
        yield sse({"error": {"message": exc.message, "type": "server_error", "code": exc.code}})
        return
    if include_usage:
        yield sse({**head, "choices": [], "usage": job.usage()})
    yield sse("[DONE]")


async def respond(job: Job, body: Sampling, chat: bool):
    kind = "chat.completion" if chat else "text_completion"
    head = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        "object": kind,
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": None,
    }
    if not body.stream:
        return JSONResponse(await run_job(job, chat, head))
    if chat:
        head["object"] = "chat.completion.chunk"
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(
        stream_job(job, chat, head, include_usage), media_type="text/event-stream"
    )


def create_app(served: Served, api_key: str | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the engine thread."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        served.engine.start()
        yield
        served.engine.stop()

    app = FastAPI(title="posttrain", lifespan=lifespan)
    app.state.served = served
    expected = f"Bearer {api_key}".encode() if api_key else None

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if expected and request.url.path != "/health":
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return error_response(
                    401, "missing or incorrect API key (Authorization: Bearer KEY)", None,
                    "invalid_api_key",
                )  # fmt: skip
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, f"{request.url.path}: {exc.detail}")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(served, n) for n in served.names()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        served.adapter_for(body.model)
        job = Job(served, body, [chat_prompt(served, body)])
        return await respond(job, body, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        served.adapter_for(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt: give a string or a non-empty list of strings", "prompt")
        encoded = [encode_checked(served, p, body.max_tokens, True, "prompt") for p in prompts]
        job = Job(served, body, encoded)
        return await respond(job, body, chat=False)

    return app
