"""The HTTP frontend: an OpenAI-style completions API (FastAPI) over a ``ClusterManager``.

Endpoints
- ``POST /v1/completions``: ``prompt`` is text or a list of token ids; ``max_tokens`` (default 16); ``stream`` (SSE
  chunks, one per token, then ``data: [DONE]``); ``ignore_eos`` must be true or absent: the models have random weights
  and no end-of-sequence token, so a request always produces exactly ``max_tokens`` tokens. Decoding is greedy
  (``temperature`` absent or 0, ``n`` 1). Extension fields: ``priority`` (0 normal, 1 high) in the request;
  ``token_ids`` per choice and a ``llumnix`` block (instances, migrations, re-dispatches, timeline) in responses.
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

Tokenisation is deliberately trivial (there is no trained tokenizer for random weights): text becomes its UTF-8 bytes,
each byte ``b`` the token id ``b % vocab_size``; output text is the generated token ids written out, each preceded by a
space (" 17 903 44"), so streamed chunks concatenate to the whole text.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from llumnix.runtime.cluster import ClusterManager, NoInstanceError
from llumnix.runtime.serve_config import ServeConfig
from llumnix.runtime.streams import ClientRequest

log = logging.getLogger(__name__)


def encode_text(text: str, vocab_size: int) -> list[int]:
    """Text to token ids: each UTF-8 byte ``b`` becomes ``b % vocab_size``."""
    return [b % vocab_size for b in text.encode("utf-8")]


def decode_tokens(token_ids: list[int]) -> str:
    return "".join(f" {t}" for t in token_ids)


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="ignored: the cluster serves one model")
    prompt: str | list[StrictInt] = Field(description="text, or a list of token ids")
    max_tokens: StrictInt = Field(16, ge=1, description="tokens to generate (exactly this many: no EOS)")
    stream: bool = False
    ignore_eos: bool | None = Field(None, description="must be true or absent")
    temperature: float | None = Field(None, description="must be 0 or absent: decoding is greedy")
    n: StrictInt = Field(1, description="must be 1")
    priority: StrictInt = Field(0, description="0 normal, 1 high (honoured with --priorities)")
    user: str | None = None

    @field_validator("ignore_eos")
    @classmethod
    def _eos(cls, v: bool | None) -> bool | None:
        if v is False:
            raise ValueError("ignore_eos must be true or absent: the model has no end-of-sequence token")
        return v

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


def prompt_ids(body: CompletionRequest, manager: ClusterManager) -> list[int]:
    vocab = manager.vocab_size
    if isinstance(body.prompt, str):
        ids = encode_text(body.prompt, vocab)
    else:
        ids = list(body.prompt)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"token ids must lie in [0, {vocab}); got {bad[:5]}", "prompt")
    if not ids:
        raise BadRequest("prompt is empty", "prompt")
    limit = manager.max_context_tokens
    if len(ids) + body.max_tokens > limit:
        raise BadRequest(
            f"prompt ({len(ids)} tokens) + max_tokens ({body.max_tokens}) = {len(ids) + body.max_tokens} exceeds "
            f"the {limit} tokens one instance can hold; shorten the prompt or lower max_tokens",
            "max_tokens",
        )
    return ids


def _choice(cr: ClientRequest, tokens: list[int], finished: bool) -> dict[str, Any]:
    return {
        "index": 0,
        "text": decode_tokens(tokens),
        "token_ids": tokens,
        "logprobs": None,
        "finish_reason": "length" if finished else None,
    }


def _usage(cr: ClientRequest) -> dict[str, int]:
    return {
        "prompt_tokens": len(cr.prompt_ids),
        "completion_tokens": len(cr.tokens),
        "total_tokens": len(cr.prompt_ids) + len(cr.tokens),
    }


def _envelope(cr: ClientRequest, model: str, obj: str = "text_completion") -> dict[str, Any]:
    return {"id": cr.request_id, "object": obj, "created": int(cr.arrival_s), "model": model}


async def _stream(cr: ClientRequest, model: str) -> AsyncIterator[str]:
    sent = 0
    while True:
        await cr.wait_for_change(sent)
        tokens = cr.tokens[sent:]
        for i, tok in enumerate(tokens):
            last = cr.finish_s is not None and i == len(tokens) - 1
            chunk = {**_envelope(cr, model), "choices": [_choice(cr, [tok], last)]}
            if last:
                chunk["usage"] = _usage(cr)
                chunk["llumnix"] = cr.summary()
            yield f"data: {json.dumps(chunk)}\n\n"
        sent += len(tokens)
        if cr.error is not None:
            yield f"data: {json.dumps({'error': {'message': cr.error, 'type': 'server_error'}})}\n\n"
            break
        if cr.finish_s is not None:
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

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        ids = prompt_ids(body, manager)
        cr = await manager.submit(ids, body.max_tokens, body.priority)
        if body.stream:
            return StreamingResponse(
                _stream(cr, model_name), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        while not cr.done:
            await cr.wait_for_change(len(cr.tokens))
        if cr.error is not None:
            return error_response(503, cr.error, kind="server_error")
        return {
            **_envelope(cr, model_name),
            "choices": [_choice(cr, cr.tokens, True)],
            "usage": _usage(cr),
            "llumnix": cr.summary(),
        }

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


def init_ray(address: str | None) -> None:
    """Join ``address`` or start a local Ray cluster (no dashboard; token auth off for a local cluster)."""
    import ray

    if ray.is_initialized():
        return
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(include_dashboard=False)
    else:
        ray.init(address=address)


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
    "ClusterCollector",
    "CompletionRequest",
    "create_app",
    "decode_tokens",
    "encode_text",
    "metric_samples",
    "metrics_registry",
    "serve",
]
