"""The HTTP frontend: an OpenAI-style completions API (FastAPI) over a ``ClusterManager``.

Endpoints
- ``POST /v1/completions``: ``prompt`` is text or a list of token ids; ``max_tokens`` (default
  ``--max-tokens-default``, at most ``--max-tokens-cap``); ``stream`` (SSE chunks, one per token, then
  ``data: [DONE]``; ``stream_options.include_usage``: a last chunk, without choices, carries the usage); ``stop`` (a
  string or a list: the text ends before the first one generated, ``finish_reason`` "stop"); ``ignore_eos`` (default
  false for a real model: it stops at its end-of-sequence token; a random-weight preset has none, so there it must be
  true or absent and a request produces exactly ``max_tokens`` tokens). Decoding is greedy (``temperature`` absent or
  0, ``n`` 1). ``model``, if given, must be the served one (404). Extension fields: ``priority`` (0 normal, 1 high) in
  the request; ``token_ids`` per choice and a ``llumnix`` block (instances, migrations, re-dispatches, timeline) in
  responses.
- ``POST /v1/chat/completions`` (real models): ``messages`` rendered by the model's chat template; ``max_tokens`` (or
  ``max_completion_tokens``) defaults to what the context has left (up to the cap); ``stream``, ``stop``,
  ``ignore_eos`` as above.
- ``GET /v1/models``: the model, its vocabulary size and the longest prompt + output a request may have.
- ``GET /health``: 200 while at least one instance is alive, else 503; the body counts the live instances
  (``instances``, ``instances_alive``: serving or draining), the dead ones (``instances_dead``: their actors failed)
  and those starting.
- ``GET /metrics``: Prometheus text: per live instance running / waiting requests, free blocks, freeness, migrations
  committed / aborted, steps (an instance that died or was stopped has no series any more: Prometheus marks them
  stale; ``llumnix_instance_failures_total`` counts the deaths); cluster counters; dispatch latency;
  ``llumnix_instances{state}`` (starting, serving, draining) and ``llumnix_instance_seconds_total`` (the cost: instance
  time since launch, start-up included).
- ``POST /admin/migrate``: ``{"request_id": "cmpl-3", "dst": 1}`` migrates a running request now (``dst`` optional).
- ``GET /admin/instances``: one row per instance (load and counters), as the replay tool samples them.
- ``GET /admin/steps?instance_id=&start=&limit=``: the engine steps the live instances kept (the last
  ``--step-log-size`` each: start/end on its clock, kind, batch, tokens), each with ``seq``, its number on its
  instance; a page holds at most ``--admin-page-size`` per instance: ask again from the last ``seq`` + 1.
- ``GET /admin/migrations?start=&limit=``: migration attempts (``MigrationRecord`` fields, the client request id and
  ``seq``), also those that ended after their request (a migration aborts when its request finishes first); paged so.
- ``GET /admin/scaling``: instance counts (starting / serving / draining), ``instance_seconds`` since the first launch
  and the start / ready / drain / stop events; two reads give the average number of instances between them (the cost).
- ``POST /admin/drain``: ``{"instance_id": 1}`` drains an instance and stops it once empty (as auto-scaling does);
  ``POST /admin/start-instance`` launches one more (``{"started": true, "instance_id"}`` once it serves); 503 if Ray
  has not given it its CPUs / GPUs within ``--placement-timeout`` (the actor is killed, not left waiting) or it
  failed to start.

Who may call what (``HttpGuard``): with ``--api-key`` every ``/v1/*`` request needs ``Authorization: Bearer KEY``;
``/admin/*`` needs ``--admin-key`` and is off (404) without one; ``/health`` and ``/metrics`` are open. Limits: the
body's bytes (413), the prompt's tokens (400; text whose length alone exceeds it is refused before it is tokenised),
``max_tokens`` (400 beyond the cap), requests held at once (429 with ``Retry-After``). Every error has OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``. A client that goes away (a closed stream, or a connection closed
while it waits for a whole completion) has its request aborted: dropped by its instance, its blocks freed, counted in
``llumnix_aborted_total``.

Text: a real model (``llumnix.engine.gguf_model``) has its own tokenizer (``llumnix.engine.tokenizer``), and streamed
text is released as whole characters (a stop string's possible beginning is held back until it is decided). A
random-weight preset has none, so tokenisation is deliberately trivial: text becomes its UTF-8 bytes, each byte ``b``
the token id ``b % vocab_size``; output text is the generated token ids written out, each preceded by a space
(" 17 903 44"), so streamed chunks concatenate to the whole text.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, SecretStr, StrictInt, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llumnix.engine.tokenizer import ChatTemplateError, TextStream, TextTokenizer
from llumnix.runtime.cluster import ClusterManager, NoInstanceError, StartupError
from llumnix.runtime.serve_config import ServeConfig
from llumnix.runtime.streams import ClientRequest

log = logging.getLogger(__name__)


def encode_text(text: str, vocab_size: int) -> list[int]:
    """Text to token ids: each UTF-8 byte ``b`` becomes ``b % vocab_size``."""
    return [b % vocab_size for b in text.encode("utf-8")]


def decode_tokens(token_ids: list[int]) -> str:
    return "".join(f" {t}" for t in token_ids)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="a last chunk, with no choices, carries the usage")


class GenerationParams(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="the served model's id (GET /v1/models), or absent")
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="with stream: include_usage")
    stop: str | list[str] | None = Field(None, description="real models: the text ends before the first of these")
    ignore_eos: bool | None = Field(None, description="real models: keep generating past the end-of-sequence token")
    temperature: float | None = Field(None, description="must be 0 or absent: decoding is greedy")
    n: StrictInt = Field(1, description="must be 1")
    priority: StrictInt = Field(0, description="0 normal, 1 high (honoured with --priorities)")
    user: str | None = None

    @field_validator("temperature")
    @classmethod
    def _greedy(cls, v: float | None) -> float | None:
        if v not in (None, 0, 0.0):
            raise ValueError("only greedy decoding is implemented: leave temperature out or set it to 0")
        return v

    @field_validator("n")
    @classmethod
    def _one(cls, v: int) -> int:
        if v != 1:
            raise ValueError("n must be 1")
        return v

    @field_validator("priority")
    @classmethod
    def _priority(cls, v: int) -> int:
        if v not in (0, 1):
            raise ValueError("priority must be 0 (normal) or 1 (high)")
        return v

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(GenerationParams):
    prompt: str | list[StrictInt] = Field(description="text, or a list of token ids")
    max_tokens: StrictInt | None = Field(
        None, ge=1, description="most tokens to generate (exactly this many without EOS; default --max-tokens-default)"
    )


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: str
    content: str | list[TextPart]
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content} | ({"name": self.name} if self.name else {})


class ChatCompletionRequest(GenerationParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1, description="most tokens to generate (default: the context left)")
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="the newer name of max_tokens")


class MigrateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str
    dst: StrictInt | None = None


class DrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instance_id: StrictInt


class BadRequest(Exception):
    """An API error: answered as ``error_response`` says."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code, self.headers = (
            message, param, status, kind, code, headers)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.kind, self.code, self.headers)


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error shape, which every error of this API has: ``{"error": {message, type, param, code}}``."""
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": code}},
        headers=headers,
    )


def check_unicode(value: Any, where: str = "") -> None:
    """Text a request carries must be encodable as UTF-8: JSON may spell a lone surrogate (``"\\ud800"``), which no
    tokenizer can take."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"{where or 'body'}: invalid Unicode (a lone surrogate, \\ud800-\\udfff): send valid text",
                             where.split(".")[0] or None) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_unicode(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_unicode(v, f"{where}.{i}")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
            continue
        if not loc and err.get("type") in ("model_attributes_type", "dict_type", "missing"):
            parts.append("the request body must be a JSON object (send Content-Type: application/json)")
            continue
        where = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request", param


def tokenizer_for(config: ServeConfig) -> TextTokenizer | None:
    """The served model's tokenizer (torch or vllm backend, real model), or None (random weights, profile)."""
    if config.instance.backend == "profile":
        return None
    return TextTokenizer.for_model(config.instance.model)


class Limits:
    """What one request may ask for: its prompt's tokens (checked before tokenising where its length already tells),
    its max_tokens (default and cap), and prompt + output within what one instance holds."""

    def __init__(self, config: ServeConfig, manager: ClusterManager, tokenizer: TextTokenizer | None) -> None:
        self.config, self.manager, self.tokenizer = config, manager, tokenizer

    @property
    def prompt_tokens(self) -> int:
        """The longest prompt: ``max_prompt_tokens``, and room for one token of output in one instance."""
        held = self.manager.max_context_tokens - 1
        return held if self.config.max_prompt_tokens is None else min(self.config.max_prompt_tokens, held)

    def check_text(self, text: str, param: str) -> None:
        """Refuse a text whose length alone shows it has too many tokens, before tokenising it."""
        if self.tokenizer is None:
            at_least = len(text.encode("utf-8"))  # one token per byte
        else:
            at_least = -(-len(text) // self.tokenizer.max_token_chars)
        if at_least > self.prompt_tokens:
            raise BadRequest(f"{param} is too long: at least {at_least} tokens, more than the limit of "
                             f"{self.prompt_tokens} prompt tokens", param)

    def check_prompt(self, ids: list[int], param: str) -> None:
        if len(ids) > self.prompt_tokens:
            raise BadRequest(f"{param} has {len(ids)} tokens, more than the limit of {self.prompt_tokens} prompt "
                             "tokens", param)

    def max_tokens(self, asked: int | None, ids: list[int], chat: bool) -> int:
        """The request's max_tokens: as asked (400 beyond the cap), or the default; prompt + output must fit."""
        cap = self.config.max_tokens_cap
        if asked is not None and cap is not None and asked > cap:
            raise BadRequest(f"max_tokens ({asked}) exceeds this server's limit of {cap}", "max_tokens")
        if asked is None and chat:  # what the context has left, up to the cap
            left = self.manager.max_context_tokens - len(ids)
            if left < 1:
                raise BadRequest(f"the conversation ({len(ids)} tokens) fills the {self.manager.max_context_tokens} "
                                 "tokens one instance can hold", "messages")
            asked = left if cap is None else min(left, cap)
        max_tokens = self.config.max_tokens_default if asked is None else asked
        check_length(ids, max_tokens, self.manager)
        return max_tokens


def prompt_ids(body: CompletionRequest, manager: ClusterManager, tokenizer: TextTokenizer | None,
               limits: Limits | None = None) -> list[int]:
    vocab = manager.vocab_size
    if isinstance(body.prompt, str):
        if limits is not None:
            limits.check_text(body.prompt, "prompt")
        ids = tokenizer.encode(body.prompt) if tokenizer is not None else encode_text(body.prompt, vocab)
    else:
        ids = list(body.prompt)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"token ids must lie in [0, {vocab}); got {bad[:5]}", "prompt")
    if not ids:
        raise BadRequest("prompt is empty", "prompt")
    if limits is not None:
        limits.check_prompt(ids, "prompt")
    return ids


def check_length(ids: list[int], max_tokens: int, manager: ClusterManager) -> None:
    limit = manager.max_context_tokens
    if len(ids) + max_tokens > limit:
        raise BadRequest(
            f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) = {len(ids) + max_tokens} exceeds "
            f"the {limit} tokens one instance can hold; shorten the prompt or lower max_tokens",
            "max_tokens",
        )


def stop_token_ids(body: GenerationParams, tokenizer: TextTokenizer | None) -> frozenset[int]:
    """The tokens that end the request: the model's end-of-sequence ones unless ``ignore_eos``. Random weights have
    none (and no text to stop on), so there ``ignore_eos`` must stay true or absent and ``stop`` unset."""
    if tokenizer is None:
        if body.ignore_eos is False:
            raise BadRequest("ignore_eos must be true or absent: the model has no end-of-sequence token", "ignore_eos")
        if body.stop_strings:
            raise BadRequest("stop strings need a model with a tokenizer (this one has random weights)", "stop")
        return frozenset()
    return frozenset() if body.ignore_eos else tokenizer.stop_token_ids


class Generation:
    """One request's tokens as they arrive, turned into text: the model's (with stop strings) or token ids written
    out (random weights). A matched stop string finishes the request at once (``ClusterManager.finish_early``)."""

    def __init__(self, cr: ClientRequest, manager: ClusterManager, tokenizer: TextTokenizer | None,
                 stop: list[str]) -> None:
        self.cr, self.manager = cr, manager
        self.text = TextStream(tokenizer, stop) if tokenizer is not None else None
        self.seen = 0  # tokens of cr.tokens taken so far
        self.ended = False  # the last piece has been taken

    def take(self) -> list[tuple[int | None, str, bool]]:
        """(token, its text, is last) for each token since the last call; a last (None, text, True) when the request
        ended with no new token to carry its end (e.g. it completed on a re-dispatch)."""
        out: list[tuple[int | None, str, bool]] = []
        cr = self.cr
        while self.seen < len(cr.tokens):
            tok = cr.tokens[self.seen]
            self.seen += 1
            last = cr.finish_s is not None and self.seen == len(cr.tokens)
            if self.text is None:
                piece = f" {tok}"
            else:
                piece = self.text.feed([tok], final=last)
                if self.text.stopped and not last:  # a stop string: the client is done with the request
                    self.manager.finish_early(cr, self.seen)
                    last = True
            out.append((tok, piece, last))
        if cr.finish_s is not None and not self.ended and not out:
            out.append((None, self.text.feed([], final=True) if self.text is not None else "", True))
        self.ended = self.ended or bool(out and out[-1][2])
        return out

    @property
    def finish_reason(self) -> str:
        return "stop" if self.cr.stopped or (self.text is not None and self.text.stopped) else "length"

    async def wait(self) -> list[tuple[int | None, str, bool]]:
        await self.cr.wait_for_change(self.seen)
        return self.take()

    async def run_to_end(self) -> str:
        """Wait for the whole request; its text."""
        pieces = []
        while True:
            pieces += [p for _, p, _ in await self.wait()]
            if self.cr.done and self.seen == len(self.cr.tokens):
                return "".join(pieces)


def _usage(cr: ClientRequest) -> dict[str, int]:
    return {
        "prompt_tokens": len(cr.prompt_ids),
        "completion_tokens": len(cr.tokens),
        "total_tokens": len(cr.prompt_ids) + len(cr.tokens),
    }


def _envelope(cr: ClientRequest, model: str, obj: str) -> dict[str, Any]:
    return {"id": cr.request_id, "object": obj, "created": int(cr.arrival_s), "model": model}


def _completion_choice(text: str, tokens: list[int], finish_reason: str | None) -> dict[str, Any]:
    return {"index": 0, "text": text, "token_ids": tokens, "logprobs": None, "finish_reason": finish_reason}


def _chat_choice(text: str, tokens: list[int], finish_reason: str | None, delta: bool, role: bool = True
                 ) -> dict[str, Any]:
    body = {"role": "assistant", "content": text} if role else {"content": text}
    return {"index": 0, ("delta" if delta else "message"): body, "token_ids": tokens, "logprobs": None,
            "finish_reason": finish_reason}


async def _stream(gen: Generation, model: str, chat: bool, include_usage: bool = False) -> AsyncIterator[str]:
    """SSE chunks, one per token (a chat stream's first delta also carries the role), then ``data: [DONE]``. The last
    token's chunk carries ``usage`` and the ``llumnix`` block; with ``include_usage`` (OpenAI's ``stream_options``)
    every chunk has ``usage``: null but a last one, without choices, which carries it."""
    cr = gen.cr
    obj = "chat.completion.chunk" if chat else "text_completion"
    first = True
    while True:
        for tok, text, last in await gen.wait():
            tokens, reason = ([] if tok is None else [tok]), (gen.finish_reason if last else None)
            if chat:
                choice, first = _chat_choice(text, tokens, reason, delta=True, role=first), False
            else:
                choice = _completion_choice(text, tokens, reason)
            chunk = {**_envelope(cr, model, obj), "choices": [choice]}
            if include_usage:
                chunk["usage"] = None
            if last:
                if not include_usage:
                    chunk["usage"] = _usage(cr)
                chunk["llumnix"] = cr.summary()
            yield f"data: {json.dumps(chunk)}\n\n"
        if cr.error is not None:
            error = {"message": cr.error, "type": "server_error", "param": None, "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n"
            break
        if cr.done and gen.seen == len(cr.tokens):
            if include_usage:
                yield f"data: {json.dumps({**_envelope(cr, model, obj), 'choices': [], 'usage': _usage(cr)})}\n\n"
            break
    yield "data: [DONE]\n\n"


class _RequestStream(StreamingResponse):
    """A streamed completion that, however its response ends (the client went away: Starlette cancels the stream),
    calls ``on_close``; the frontend then aborts a request not yet finished."""

    def __init__(self, content: AsyncIterator[str], on_close: Any) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _disconnected(receive: Receive) -> None:
    """Return once the client has gone away (the request's body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


# -- HTTP guard: keys and body size ------------------------------------------------------------------------------------
def bearer_token(scope: Scope) -> bytes | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, or None."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


def key_matches(given: bytes | None, key: SecretStr) -> bool:
    """Constant-time comparison (no timing tells how much of a guess was right)."""
    return given is not None and secrets.compare_digest(given, key.get_secret_value().encode("utf-8"))


class HttpGuard:
    """ASGI middleware in front of every route: the keys (``/v1/*`` needs the API key when one is set; ``/admin/*`` the
    admin key, and is off (404) without one; ``/health``, ``/metrics`` stay open), then the body size: a body beyond
    ``max_request_bytes`` (declared, or counted while it is read) gets 413 before the app sees it."""

    def __init__(self, app: ASGIApp, config: ServeConfig) -> None:
        self.app, self.config = app, config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
            refusal, receive = await self._read_body(scope, receive)
        if refusal is not None:
            return await refusal.response()(scope, receive, send)
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> BadRequest | None:
        path = scope["path"]
        if path == "/admin" or path.startswith("/admin/"):
            key = self.config.admin_key
            if key is None:
                return BadRequest(f"Invalid URL ({scope['method']} {path}): the admin API is off (no admin key)",
                                  status=404, kind="not_found")
        elif path == "/v1" or path.startswith("/v1/"):
            key = self.config.api_key
        else:
            return None
        if key is None or key_matches(bearer_token(scope), key):
            return None
        return BadRequest("Incorrect or missing API key: send 'Authorization: Bearer KEY'", status=401,
                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[BadRequest | None, Receive]:
        limit = self.config.max_request_bytes
        too_large = BadRequest(f"the request body exceeds the limit of {limit} bytes", status=413)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return too_large, receive
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None, receive
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return too_large, receive
            if not message.get("more_body", False):
                break
        body: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message, body = body, None
                return message
            return await receive()

        return None, replay


def create_app(config: ServeConfig, manager: ClusterManager | None = None) -> FastAPI:
    """The ASGI app; its lifespan starts the cluster's actors (Ray must be initialised) and stops them."""
    manager = manager or ClusterManager(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            await manager.start()
        except BaseException as e:  # uvicorn logs it and exits; whoever started the server names it (startup_failure)
            app.state.startup_error = e
            raise
        try:
            yield
        finally:
            await manager.stop()

    app = FastAPI(title="llumnix", summary="Llumnix serving frontend", lifespan=lifespan)
    app.add_middleware(HttpGuard, config=config)
    app.state.manager = manager
    model_name = config.instance.model_name
    tokenizer = tokenizer_for(config)
    limits = Limits(config, manager, tokenizer)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest):
        return exc.response()

    @app.exception_handler(NoInstanceError)
    async def _unavailable(request: Request, exc: NoInstanceError):
        return error_response(503, str(exc), kind="service_unavailable")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            message, kind = f"Invalid URL ({request.method} {request.url.path})", "not_found"
        elif exc.status_code == 405:
            message, kind = f"{request.method} is not allowed on {request.url.path}", "invalid_request_error"
        else:  # e.g. a body that is not UTF-8 (FastAPI's 400 "There was an error parsing the body")
            message, kind = str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, message, kind=kind, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", kind="server_error")

    def admit(body: GenerationParams) -> None:
        """Checks before any work: the model, the text, stream_options, room for one more request."""
        check_unicode(body.model_dump(exclude_none=True))  # first: an error message may quote the text
        if body.model is not None and body.model != model_name:
            raise BadRequest(f"The model `{body.model}` does not exist (this server serves `{model_name}`)", "model",
                             status=404, code="model_not_found")
        if body.stream_options is not None and not body.stream:
            raise BadRequest("stream_options is only allowed with stream: true", "stream_options")
        if len(manager.active) >= config.max_active_requests:
            raise BadRequest(f"the server holds its limit of {config.max_active_requests} requests; retry shortly",
                             status=429, kind="rate_limit_error", code="rate_limit_exceeded",
                             headers={"Retry-After": "1"})

    async def generate(request: Request, body: GenerationParams, ids: list[int], max_tokens: int, chat: bool):
        stops = stop_token_ids(body, tokenizer)
        cr = await manager.submit(ids, max_tokens, body.priority, stops)
        gen = Generation(cr, manager, tokenizer, body.stop_strings)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return _RequestStream(_stream(gen, model_name, chat, include_usage), lambda: manager.abort(cr))
        watcher = asyncio.create_task(_disconnected(request.receive))
        watcher.add_done_callback(lambda task: task.cancelled() or task.exception() or manager.abort(cr))
        try:
            text = await gen.run_to_end()
        finally:
            watcher.cancel()
        if cr.error is not None:
            return error_response(503, cr.error, kind="server_error")
        if chat:
            envelope, choice = _envelope(cr, model_name, "chat.completion"), _chat_choice(
                text, cr.tokens, gen.finish_reason, delta=False)
        else:
            envelope, choice = _envelope(cr, model_name, "text_completion"), _completion_choice(
                text, cr.tokens, gen.finish_reason)
        return {**envelope, "choices": [choice], "usage": _usage(cr), "llumnix": cr.summary()}

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        admit(body)
        ids = prompt_ids(body, manager, tokenizer, limits)
        return await generate(request, body, ids, limits.max_tokens(body.max_tokens, ids, chat=False), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        admit(body)
        if tokenizer is None:
            raise BadRequest(f"model {model_name} has random weights and no chat template: use /v1/completions",
                             "model")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise BadRequest("give max_tokens or max_completion_tokens, not both", "max_tokens")
        try:
            text = tokenizer.apply_chat_template([m.as_template_input() for m in body.messages])
        except ChatTemplateError as e:
            raise BadRequest(str(e), "messages") from None
        limits.check_text(text, "messages")
        ids = tokenizer.encode(text)
        limits.check_prompt(ids, "messages")
        max_tokens = limits.max_tokens(body.max_tokens or body.max_completion_tokens, ids, chat=True)
        return await generate(request, body, ids, max_tokens, chat=True)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "owned_by": "llumnix",
                    "vocab_size": manager.vocab_size,
                    "kv_bytes_per_block": manager.any_info.get("kv_bytes_per_block"),
                    "max_context_tokens": manager.max_context_tokens,
                    "instances": len(manager.live_instances()),
                }
            ],
        }

    @app.get("/health")
    async def health():
        live = len(manager.live_instances())
        dead = sum(1 for i in manager.instances.values() if not i.alive)
        body = {"status": "ok" if live else "unavailable", "instances": live, "instances_alive": live,
                "instances_dead": dead, "instances_starting": len(manager.starting)}
        return JSONResponse(status_code=200 if live else 503, content=body)

    registry = metrics_registry(manager)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/migrate")
    async def admin_migrate(body: MigrateRequest):
        try:
            result = await manager.migrate_request(body.request_id, body.dst)
        except KeyError as e:
            return error_response(404, str(e.args[0]), "request_id", kind="not_found")
        return JSONResponse(status_code=200 if result.get("started") else 409, content=result)

    @app.get("/admin/instances")
    async def admin_instances():
        # JSON has no infinities: a draining instance's freeness (-inf) and an unknown one (nan) become null.
        return [
            {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
            for row in manager.instance_rows()
        ]

    page = config.admin_page_size

    @app.get("/admin/steps")
    async def admin_steps(instance_id: int | None = None, start: int = Query(0, ge=0),
                          limit: int = Query(page, ge=1, le=page)):
        return await manager.step_logs(instance_id, start, limit)

    @app.get("/admin/migrations")
    async def admin_migrations(start: int = Query(0, ge=0), limit: int = Query(page, ge=1, le=page)):
        return manager.migration_rows(start, limit)

    @app.get("/admin/scaling")
    async def admin_scaling():
        return manager.scaling_status()

    @app.post("/admin/drain")
    async def admin_drain(body: DrainRequest):
        try:
            result = await manager.drain(body.instance_id)
        except KeyError as e:
            return error_response(404, str(e.args[0]), "instance_id", kind="not_found")
        return JSONResponse(status_code=200 if result.get("draining") else 409, content=result)

    @app.post("/admin/start-instance")
    async def admin_start_instance():
        result = await manager.start_instance(placement_timeout_s=config.placement_timeout_s)
        if result.get("started"):
            return result
        code = "instance_not_placed" if result.get("placed") is False else "instance_start_failed"
        return error_response(503, f"instance {result['instance_id']} did not start: {result['reason']}",
                              kind="service_unavailable", code=code)

    return app


# -- Prometheus metrics ---------------------------------------------------------------------------------------------
# Per-instance metrics: the key of ``ClusterManager.instance_rows()`` -> (metric name, help). prometheus_client appends
# ``_total`` to a counter's sample name.
INSTANCE_GAUGES = {
    "alive": ("llumnix_instance_up", "1 for a live instance (a dead or stopped one has no series)"),
    "running": ("llumnix_instance_running_requests", "running (and frozen) requests"),
    "waiting": ("llumnix_instance_waiting_requests", "queued requests"),
    "free_blocks": ("llumnix_instance_free_blocks", "free KV blocks"),
    "total_blocks": ("llumnix_instance_total_blocks", "KV blocks of the instance"),
    "watermark_blocks": ("llumnix_instance_watermark_blocks", "blocks kept free when admitting prompts"),
    "head_demand_blocks": ("llumnix_instance_head_demand_blocks", "blocks the head-of-line request needs"),
    "freeness": ("llumnix_instance_freeness", "free blocks per running request after queued demand"),
    "migrations_in_flight": ("llumnix_instance_migrations_in_flight", "migrations in or out now"),
}
INSTANCE_COUNTERS = {
    "steps": ("llumnix_instance_steps", "engine steps run"),
    "busy_s": ("llumnix_instance_busy_seconds", "seconds spent executing steps"),
    "finished": ("llumnix_instance_finished_requests", "requests finished on the instance"),
    "preemptions": ("llumnix_instance_preemptions", "requests preempted (recompute)"),
    "migrations_committed": ("llumnix_instance_migrations_committed", "migrations out committed"),
    "migrations_aborted": ("llumnix_instance_migrations_aborted", "migrations out aborted"),
    "migration_downtime_s": ("llumnix_instance_migration_downtime_seconds", "stop-and-copy time"),
    "migration_bytes": ("llumnix_instance_migration_bytes", "KV bytes sent by committed migrations"),
}


class ClusterCollector(Collector):
    """The cluster's metrics, read from its ``ClusterManager`` at every scrape.

    The manager already keeps every value (instance loads and counters, cluster counters, latency sums), so this is
    prometheus_client's custom-collector pattern for state owned elsewhere: metric families built at collection time,
    rather than Gauge / Counter objects that would hold a second copy to keep in step."""

    def __init__(self, manager: ClusterManager) -> None:
        self.manager = manager

    def collect(self) -> Iterator[Metric]:
        m = self.manager
        rows = [r for r in m.instance_rows() if r["alive"]]  # a dead instance's series go (Prometheus: stale)
        for family, metrics in ((GaugeMetricFamily, INSTANCE_GAUGES), (CounterMetricFamily, INSTANCE_COUNTERS)):
            for key, (name, doc) in metrics.items():
                fam = family(name, doc, labels=["instance"])
                for r in rows:
                    fam.add_metric([str(r["instance_id"])], float(r[key]))
                yield fam
        for key, value in m.counters.items():
            yield CounterMetricFamily(f"llumnix_{key}", f"cluster total of {key.replace('_', ' ')}", value=value)
        yield GaugeMetricFamily("llumnix_requests_active", "requests not yet finished", value=len(m.active))
        status = m.scaling_status()
        fam = GaugeMetricFamily("llumnix_instances", "instance actors by state (their sum is the cost now)",
                                labels=["state"])
        for state in ("starting", "serving", "draining"):
            fam.add_metric([state], float(status[state]))
        yield fam
        yield CounterMetricFamily(
            "llumnix_instance_seconds",
            "instance time since the first launch (start-up included): its rate is the average number of instances",
            value=status["instance_seconds"],
        )
        for name, stats, doc in (
            ("llumnix_dispatch_seconds", m.dispatch_latency, "dispatch: policy choice + instance ack"),
            ("llumnix_dispatch_decision_seconds", m.decision_latency, "the dispatch policy's choice"),
        ):
            yield SummaryMetricFamily(name, doc, count_value=stats.count, sum_value=stats.total_s)


def metrics_registry(manager: ClusterManager) -> CollectorRegistry:
    """A registry of the cluster's metrics alone (not the process-wide default one), for ``GET /metrics``."""
    registry = CollectorRegistry()
    registry.register(ClusterCollector(manager))
    return registry


def metric_samples(text: str, name: str, **labels: str) -> list[float]:
    """The values of the samples called ``name`` (a counter's ``..._total``, a summary's ``..._sum`` / ``..._count``)
    whose labels include ``labels``, in Prometheus text such as ``GET /metrics`` returns."""
    return [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]


RAY_AUTH_ENV = "RAY_AUTH_MODE"


def init_ray(address: str | None, **options: Any) -> None:
    """Join the Ray cluster at ``address``, or start a local one (no dashboard; ``options`` go to ``ray.init``).

    Ray's token authentication stays on: a new local cluster uses (or makes) the token in ``~/.ray/auth_token``, and
    only a process holding it can join the cluster or run code in it. To join a multi-node cluster by address, every
    node runs with ``RAY_AUTH_MODE=token`` and the same token (README, "Operating it safely")."""
    import ray

    if ray.is_initialized():
        return
    mode = os.environ.get(RAY_AUTH_ENV)
    if mode is not None and mode.lower() != "token":
        log.warning("%s=%s: this Ray cluster takes no authentication; anyone who reaches its ports can run code as this "
                    "user. Unset it: token authentication is the default.", RAY_AUTH_ENV, mode)  # fmt: skip
    if address is None:
        ray.init(include_dashboard=False, **options)
    else:
        ray.init(address=address, **options)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def bind_http_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` for the HTTP server (uvicorn listens on it), or ``StartupError`` naming
    --port (taken) or --host (not an address of this machine). Binding it before Ray and the instances start is the
    port check, and holding it until uvicorn listens leaves no window for another process to take the port."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise StartupError(f"--host {host}: not a name or address this machine can bind ({e.strerror}); use an "
                           "address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port in TIME_WAIT is free
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise StartupError(f"--port {port}: {host}:{port} is already in use (another server holds it); choose a "
                               "free --port or stop the process holding it") from None
        if e.errno == errno.EACCES:
            raise StartupError(f"--port {port}: no permission to bind {host}:{port} (ports below 1024 need "
                               "privileges); choose a --port of 1024 or above") from None
        raise StartupError(f"--host {host}: cannot bind {host}:{port} ({e.strerror}); use an address of this machine, "
                           "e.g. 127.0.0.1 or 0.0.0.0") from None
    return sock


def serve(config: ServeConfig) -> None:
    """Run the cluster and the HTTP server until interrupted (``llumnix serve``).

    Before any instance actor starts it checks that the HTTP port can be bound on ``--host`` and that the Ray cluster
    has the CPUs / GPUs the instances ask for; either failing raises ``StartupError`` (one line naming the flag). Ray
    is shut down at the end if this call started it."""
    import ray
    import uvicorn

    started = time.time()
    if not is_loopback(config.host) and config.api_key is None:
        log.warning("--host %s takes connections from other machines, but no API key is set: anyone who reaches this "
                    "port can use the model. Set LLUMNIX_API_KEY (or --api-key), or bind 127.0.0.1 behind a proxy "
                    "that authenticates.", config.host)
    sock = bind_http_socket(config.host, config.port)
    try:
        owns_ray = not ray.is_initialized()
        init_ray(config.address)
        try:
            app = create_app(config)
            app.state.manager.check_resources()
            port = sock.getsockname()[1]
            log.info("serving on http://%s:%d (Ray up in %.1f s)", config.host, port, time.time() - started)
            server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
            try:
                server.run(sockets=[sock])
            except SystemExit:  # uvicorn exits when the lifespan fails (it has logged the traceback)
                if server.started:
                    raise
            if not server.started:  # the lifespan failed (e.g. the instances did not start)
                raise StartupError(startup_failure(app, "the server did not start")) from None
        finally:
            if owns_ray:
                ray.shutdown()
    finally:
        sock.close()


def startup_failure(app: FastAPI, what: str) -> str:
    """``what``, with the error that stopped the app's lifespan (the instances' start), else a pointer to the log."""
    error = getattr(app.state, "startup_error", None)
    return f"{what}: {type(error).__name__}: {error}" if error is not None else f"{what} (see the log above)"


class BackgroundServer:
    """The frontend on a free port in a thread of this process (Ray must be initialised): for tests and benchmarks.

    ``with BackgroundServer(config) as server: httpx.get(server.url + "/health")``; ``server.manager`` is the live
    ClusterManager. Leaving the block stops the server and kills the instance actors. Without an admin key in
    ``config`` it makes a random one, so that /admin/* is on: send ``server.admin_headers`` there (and
    ``server.api_headers`` to /v1/* when ``config`` has an API key).
    """

    def __init__(self, config: ServeConfig, startup_timeout_s: float = 120.0) -> None:
        if config.admin_key is None:
            config = config.model_copy(update={"admin_key": SecretStr(secrets.token_urlsafe(32))})
        self.config = config
        self.admin_key = config.admin_key.get_secret_value()
        self.admin_headers = {"Authorization": f"Bearer {self.admin_key}"}
        self.api_headers = {"Authorization": f"Bearer {config.api_key.get_secret_value()}"} if config.api_key else {}
        self.app = create_app(config)
        self.manager: ClusterManager = self.app.state.manager
        self.url = f"http://{config.host}:{config.port}"  # port 0: the real one is known once started
        self.startup_timeout_s = startup_timeout_s

    def __enter__(self) -> BackgroundServer:
        import threading

        import uvicorn

        self._server = uvicorn.Server(
            uvicorn.Config(self.app, host=self.config.host, port=self.config.port, log_level="warning", lifespan="on")
        )
        self._thread = threading.Thread(target=self._run, name="llumnix-frontend", daemon=True)
        self._thread.start()
        deadline = time.time() + self.startup_timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(startup_failure(self.app, "the frontend failed to start"))
            if time.time() > deadline:
                self.__exit__(None, None, None)
                raise TimeoutError(f"the frontend did not start within {self.startup_timeout_s:.0f} s")
            time.sleep(0.05)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.config.host}:{port}"
        return self

    def _run(self) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn's exit when the lifespan fails: __enter__ raises its cause
            self._server.run()

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


__all__ = [
    "BackgroundServer",
    "ChatCompletionRequest",
    "StartupError",
    "bind_http_socket",
    "ClusterCollector",
    "CompletionRequest",
    "create_app",
    "decode_tokens",
    "encode_text",
    "metric_samples",
    "metrics_registry",
    "serve",
]
