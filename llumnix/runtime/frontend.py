"""The HTTP frontend: an OpenAI-style completions API (FastAPI) over a ``ClusterManager``.

Endpoints
- ``POST /v1/completions``: ``prompt`` is text or a list of token ids; ``max_tokens`` (default 16); ``stream`` (SSE
  chunks, one per token, then ``data: [DONE]``); ``stop`` (a string or a list: the text ends before the first one
  generated, ``finish_reason`` "stop"); ``ignore_eos`` (default false for a real model: it stops at its
  end-of-sequence token; a random-weight preset has none, so there it must be true or absent and a request produces
  exactly ``max_tokens`` tokens). Decoding is greedy (``temperature`` absent or 0, ``n`` 1). Extension fields:
  ``priority`` (0 normal, 1 high) in the request; ``token_ids`` per choice and a ``llumnix`` block (instances,
  migrations, re-dispatches, timeline) in responses.
- ``POST /v1/chat/completions`` (real models): ``messages`` rendered by the model's chat template; ``max_tokens`` (or
  ``max_completion_tokens``) defaults to what the context has left; ``stream``, ``stop``, ``ignore_eos`` as above.
- ``GET /v1/models``: the model, its vocabulary size and the longest prompt + output a request may have.
- ``GET /health``: 200 while at least one instance is alive, else 503.
- ``GET /metrics``: Prometheus text: per instance running / waiting requests, free blocks, freeness, migrations
  committed / aborted, steps; cluster counters; dispatch latency; ``llumnix_instances{state}`` (starting, serving,
  draining) and ``llumnix_instance_seconds_total`` (the cost: instance time since launch, start-up included).
- ``POST /admin/migrate``: ``{"request_id": "cmpl-3", "dst": 1}`` migrates a running request now (``dst`` optional).
- ``GET /admin/instances``: one row per instance (load and counters), as the replay tool samples them.
- ``GET /admin/steps``: every engine step of every live instance (start/end on its clock, kind, batch, tokens).
- ``GET /admin/migrations``: every migration attempt (``MigrationRecord`` fields and the client request id), also
  those that ended after their request (a migration aborts when its request finishes first).
- ``GET /admin/scaling``: instance counts (starting / serving / draining), ``instance_seconds`` since the first launch
  and the start / ready / drain / stop events; two reads give the average number of instances between them (the cost).
- ``POST /admin/drain``: ``{"instance_id": 1}`` drains an instance and stops it once empty (as auto-scaling does);
  ``POST /admin/start-instance`` launches one more.

Text: a real model (``llumnix.engine.gguf_model``) has its own tokenizer (``llumnix.engine.tokenizer``), and streamed
text is released as whole characters (a stop string's possible beginning is held back until it is decided). A
random-weight preset has none, so tokenisation is deliberately trivial: text becomes its UTF-8 bytes, each byte ``b``
the token id ``b % vocab_size``; output text is the generated token ids written out, each preceded by a space
(" 17 903 44"), so streamed chunks concatenate to the whole text.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from llumnix.engine.tokenizer import ChatTemplateError, TextStream, TextTokenizer
from llumnix.runtime.cluster import ClusterManager, NoInstanceError
from llumnix.runtime.serve_config import ServeConfig
from llumnix.runtime.streams import ClientRequest

log = logging.getLogger(__name__)


def encode_text(text: str, vocab_size: int) -> list[int]:
    """Text to token ids: each UTF-8 byte ``b`` becomes ``b % vocab_size``."""
    return [b % vocab_size for b in text.encode("utf-8")]


def decode_tokens(token_ids: list[int]) -> str:
    return "".join(f" {t}" for t in token_ids)


class GenerationParams(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="ignored: the cluster serves one model")
    stream: bool = False
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
    max_tokens: StrictInt = Field(16, ge=1, description="most tokens to generate (exactly this many without EOS)")


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
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "param": param, "code": None}}
    )


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


def prompt_ids(body: CompletionRequest, manager: ClusterManager, tokenizer: TextTokenizer | None) -> list[int]:
    vocab = manager.vocab_size
    if isinstance(body.prompt, str):
        ids = tokenizer.encode(body.prompt) if tokenizer is not None else encode_text(body.prompt, vocab)
    else:
        ids = list(body.prompt)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"token ids must lie in [0, {vocab}); got {bad[:5]}", "prompt")
    if not ids:
        raise BadRequest("prompt is empty", "prompt")
    check_length(ids, body.max_tokens, manager)
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


async def _stream(gen: Generation, model: str, chat: bool) -> AsyncIterator[str]:
    """SSE chunks, one per token (a chat stream's first delta also carries the role), then ``data: [DONE]``."""
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
            if last:
                chunk["usage"] = _usage(cr)
                chunk["llumnix"] = cr.summary()
            yield f"data: {json.dumps(chunk)}\n\n"
        if cr.error is not None:
            yield f"data: {json.dumps({'error': {'message': cr.error, 'type': 'server_error'}})}\n\n"
            break
        if cr.done and gen.seen == len(cr.tokens):
            break
    yield "data: [DONE]\n\n"


def create_app(config: ServeConfig, manager: ClusterManager | None = None) -> FastAPI:
    """The ASGI app; its lifespan starts the cluster's actors (Ray must be initialised) and stops them."""
    manager = manager or ClusterManager(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await manager.start()
        try:
            yield
        finally:
            await manager.stop()

    app = FastAPI(title="llumnix", summary="Llumnix serving frontend", lifespan=lifespan)
    app.state.manager = manager
    model_name = config.instance.model_name
    tokenizer = tokenizer_for(config)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, exc: BadRequest):
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(NoInstanceError)
    async def _unavailable(request: Request, exc: NoInstanceError):
        return error_response(503, str(exc), kind="service_unavailable")

    async def generate(body: GenerationParams, ids: list[int], max_tokens: int, chat: bool):
        stops = stop_token_ids(body, tokenizer)
        cr = await manager.submit(ids, max_tokens, body.priority, stops)
        gen = Generation(cr, manager, tokenizer, body.stop_strings)
        if body.stream:
            return StreamingResponse(
                _stream(gen, model_name, chat), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        text = await gen.run_to_end()
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
    async def completions(body: CompletionRequest):
        return await generate(body, prompt_ids(body, manager, tokenizer), body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        if tokenizer is None:
            raise BadRequest(f"model {model_name} has random weights and no chat template: use /v1/completions", "model")
        try:
            ids = tokenizer.encode(tokenizer.apply_chat_template([m.as_template_input() for m in body.messages]))
        except ChatTemplateError as e:
            raise BadRequest(str(e), "messages") from None
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise BadRequest("give max_tokens or max_completion_tokens, not both", "max_tokens")
        max_tokens = body.max_tokens or body.max_completion_tokens or manager.max_context_tokens - len(ids)
        if max_tokens < 1:
            raise BadRequest(f"the conversation ({len(ids)} tokens) fills the {manager.max_context_tokens} tokens "
                             "one instance can hold", "messages")
        check_length(ids, max_tokens, manager)
        return await generate(body, ids, max_tokens, chat=True)

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
        body = {"status": "ok" if live else "unavailable", "instances_alive": live, "instances": len(manager.instances)}
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

    @app.get("/admin/steps")
    async def admin_steps():
        return await manager.step_logs()

    @app.get("/admin/migrations")
    async def admin_migrations():
        return manager.migration_rows()

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
        result = await manager.start_instance()
        return JSONResponse(status_code=200 if result.get("started") else 503, content=result)

    return app


# -- Prometheus metrics ---------------------------------------------------------------------------------------------
# Per-instance metrics: the key of ``ClusterManager.instance_rows()`` -> (metric name, help). prometheus_client appends
# ``_total`` to a counter's sample name.
INSTANCE_GAUGES = {
    "alive": ("llumnix_instance_up", "1 while the instance actor is alive"),
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
        rows = m.instance_rows()
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


def serve(config: ServeConfig) -> None:
    """Run the cluster and the HTTP server until interrupted (``llumnix serve``)."""
    import ray
    import uvicorn

    started = time.time()
    init_ray(config.address)
    try:
        app = create_app(config)
        log.info("serving on http://%s:%d (Ray up in %.1f s)", config.host, config.port, time.time() - started)
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning")
    finally:
        ray.shutdown()


class BackgroundServer:
    """The frontend on a free port in a thread of this process (Ray must be initialised): for tests and benchmarks.

    ``with BackgroundServer(config) as server: httpx.get(server.url + "/health")``; ``server.manager`` is the live
    ClusterManager. Leaving the block stops the server and kills the instance actors.
    """

    def __init__(self, config: ServeConfig, startup_timeout_s: float = 120.0) -> None:
        self.config = config
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
        self._thread = threading.Thread(target=self._server.run, name="llumnix-frontend", daemon=True)
        self._thread.start()
        deadline = time.time() + self.startup_timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the frontend failed to start (see the log above)")
            if time.time() > deadline:
                self.__exit__(None, None, None)
                raise TimeoutError(f"the frontend did not start within {self.startup_timeout_s:.0f} s")
            time.sleep(0.05)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.config.host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


__all__ = [
    "BackgroundServer",
    "ChatCompletionRequest",
    "ClusterCollector",
    "CompletionRequest",
    "create_app",
    "decode_tokens",
    "encode_text",
    "metric_samples",
    "metrics_registry",
    "serve",
]
