"""The HTTP frontend exposed safely: API and admin keys, request limits, OpenAI-shaped errors, a client that goes away
freeing its request on its instance (migrating or not), paged and bounded admin logs, ``stream_options``.

One local Ray (2 CPUs) and one cluster for the module: 2 profile-backend instances (real block accounting, steps that
sleep for profiled times), so a long request streams for seconds while the tests act on it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from types import SimpleNamespace

import httpx
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from llumnix.cli import main
from llumnix.core.records import MigrationRecord
from llumnix.runtime.cluster import ClusterManager
from llumnix.runtime.frontend import BackgroundServer, BadRequest, Limits, create_app, is_loopback, metric_samples
from llumnix.runtime.serve_config import build_serve_config
from llumnix.runtime.streams import ClientRequest

pytestmark = pytest.mark.timeout(120)

API_KEY = "api-7f3c9a1e5b2d4c8e"
ADMIN_KEY = "admin-2b8d6f0a4c1e3957"
SETTINGS = {
    "instances": 2, "port": 0, "backend": "profile", "speed": 2, "num_blocks": 128, "num_cpus_per_instance": 0.5,
    "api_key": API_KEY, "admin_key": ADMIN_KEY, "max_request_bytes": 4096, "max_prompt_tokens": 200,
    "max_tokens_default": 8, "max_tokens_cap": 1000, "max_active_requests": 2, "admin_page_size": 5,
    "step_log_size": 40,
}  # fmt: skip
API = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROMPT = [(7 * i + 3) % 1000 for i in range(150)]  # 10 blocks: a migration of it takes several stages


@pytest.fixture(scope="module")
def server(ray_local):
    with BackgroundServer(build_serve_config({}, SETTINGS)) as srv:
        yield srv


def complete(url: str, headers=API, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)


def openai_error(resp: httpx.Response, status: int, needle: str = "") -> dict:
    """The response is ``status`` with OpenAI's error body (its message containing ``needle``)."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert needle in error["message"], error
    return error


async def wait_until(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def assert_all_freed(srv: BackgroundServer) -> None:
    """No request left on any instance, every block free again (the instances' own accounting)."""
    deadline = time.monotonic() + 20
    while True:
        checks = asyncio.run(srv.manager.check_instances())
        clean = all(c["free_blocks"] == c["num_blocks"] and not c["running"] and not c["waiting"] and not c["frozen"]
                    and c["migrations_out"] == 0 and c["migrations_in"] == 0 for c in checks.values())
        if clean and not srv.manager.active:
            return
        assert time.monotonic() < deadline, (checks, list(srv.manager.active))
        time.sleep(0.05)


async def stream_then_leave(url: str, chunks_before: int, on_chunk=None, **body) -> str:
    """Open a streaming completion, read ``chunks_before`` chunks, then close the connection; the request's id."""
    async with httpx.AsyncClient(headers=API, timeout=60) as client:
        async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as resp:
            assert resp.status_code == 200, await resp.aread()
            seen = 0
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    seen += 1
                    if on_chunk is not None:
                        await on_chunk(chunk, seen)
                    if seen == chunks_before:
                        return chunk["id"]  # leaving the blocks closes the connection mid-stream
    raise AssertionError("the stream ended early")


# -- keys ------------------------------------------------------------------------------------------------------------
def test_v1_needs_the_api_key_and_admin_the_admin_key(server):
    url = server.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}, ADMIN):
        resp = httpx.get(f"{url}/v1/models", headers=headers)
        error = openai_error(resp, 401, "API key")
        assert error["code"] == "invalid_api_key" and resp.headers["www-authenticate"] == "Bearer"
        assert API_KEY not in resp.text and ADMIN_KEY not in resp.text
    openai_error(complete(url, headers={}, prompt=[1, 2]), 401)
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"bearer {API_KEY}"}).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200  # open: load balancers and scrapers
    assert metric_samples(httpx.get(f"{url}/metrics").text, "llumnix_instance_up")
    for headers in ({}, API, {"Authorization": "Bearer admin-2b8d6f0a4c1e3958"}):
        openai_error(httpx.get(f"{url}/admin/instances", headers=headers), 401)
        openai_error(httpx.post(f"{url}/admin/drain", json={"instance_id": 0}, headers=headers), 401)
    assert len(httpx.get(f"{url}/admin/instances", headers=ADMIN).json()) == 2
    assert server.manager.counters["instances_drained"] == 0  # no refused call reached the cluster


def test_admin_is_off_without_an_admin_key():
    """Without an admin key, /admin/* does not exist (404), before any handler runs; /v1/* is open without an API
    key (a loopback server's default)."""
    config = build_serve_config({}, {"backend": "profile"})
    client = TestClient(create_app(config, manager=SimpleNamespace()))  # no lifespan: no cluster needed
    for method, path in (("GET", "/admin/steps"), ("GET", "/admin/instances"), ("POST", "/admin/drain"),
                         ("POST", "/admin/start-instance"), ("POST", "/admin/migrate")):
        error = openai_error(client.request(method, path, json={}), 404, "admin API is off")
        assert error["type"] == "not_found"
    openai_error(client.get("/v1/nowhere"), 404, "Invalid URL")


def test_keys_come_from_the_environment_and_stay_out_of_logs(monkeypatch, caplog):
    import llumnix.runtime.frontend as frontend

    served = []
    monkeypatch.setattr(frontend, "serve", served.append)
    env = {"LLUMNIX_API_KEY": API_KEY, "LLUMNIX_ADMIN_KEY": ADMIN_KEY}
    result = CliRunner().invoke(main, ["serve", "--backend", "profile"], env=env)
    assert result.exit_code == 0, result.output
    (config,) = served
    assert config.api_key.get_secret_value() == API_KEY and config.admin_key.get_secret_value() == ADMIN_KEY
    for text in (result.output, repr(config), str(config), json.dumps(config.model_dump(mode="json"))):
        assert API_KEY not in text and ADMIN_KEY not in text
    assert "LLUMNIX_API_KEY" in CliRunner().invoke(main, ["serve", "--help"]).output

    monkeypatch.undo()

    def no_ray(*args, **kwargs):
        raise RuntimeError("stop here")

    monkeypatch.setattr(frontend, "init_ray", no_ray)
    monkeypatch.setattr(frontend, "bind_http_socket", lambda host, port: SimpleNamespace(close=lambda: None))
    with caplog.at_level(logging.WARNING, logger="llumnix.runtime.frontend"):
        for host, key, warned in (("0.0.0.0", None, True), ("10.1.2.3", API_KEY, False), ("127.0.0.1", None, False),
                                  ("::1", None, False), ("localhost", None, False)):
            caplog.clear()
            overrides = {"host": host, "backend": "profile"} | ({"api_key": key} if key else {})
            with pytest.raises(RuntimeError, match="stop here"):
                frontend.serve(build_serve_config({}, overrides))
            assert ("no API key is set" in caplog.text) == warned, (host, caplog.text)
            assert API_KEY not in caplog.text
    assert not is_loopback("0.0.0.0") and is_loopback("127.0.0.2") and not is_loopback("example.org")


# -- limits and errors -----------------------------------------------------------------------------------------------
def test_request_limits(server):
    url = server.url
    openai_error(complete(url, prompt=[1] * 3000), 413, "4096 bytes")  # declared by Content-Length
    chunked = httpx.post(f"{url}/v1/completions", headers={**API, "content-type": "application/json"},
                         content=iter([b'{"prompt": "', b"a" * 5000, b'"}']), timeout=30)
    openai_error(chunked, 413, "4096 bytes")  # counted as it is read
    error = openai_error(complete(url, prompt="x" * 201), 400, "more than the limit of 200 prompt tokens")
    assert error["param"] == "prompt"
    openai_error(complete(url, prompt=[1] * 201), 400, "prompt has 201 tokens, more than the limit of 200")
    assert len(complete(url, prompt=[1] * 200).json()["choices"][0]["token_ids"]) == 8  # the default max_tokens
    error = openai_error(complete(url, prompt=[1, 2], max_tokens=1001), 400, "limit of 1000")
    assert error["param"] == "max_tokens"
    assert len(complete(url, prompt=[1, 2], max_tokens=12).json()["choices"][0]["token_ids"]) == 12


def test_the_prompt_limit_is_checked_before_tokenising():
    class Tokenizer:
        max_token_chars = 16

        def encode(self, text):
            raise AssertionError("tokenised")

    config = build_serve_config({}, {"backend": "profile", "max_prompt_tokens": 100})
    limits = Limits(config, SimpleNamespace(max_context_tokens=2000), Tokenizer())
    limits.check_text("a" * 1600, "prompt")  # could be 100 tokens
    with pytest.raises(BadRequest, match="at least 101 tokens, more than the limit of 100") as e:
        limits.check_text("a" * 1601, "prompt")
    assert e.value.param == "prompt"
    assert Limits(config, SimpleNamespace(max_context_tokens=50), None).prompt_tokens == 49  # room for one output


def test_bad_text_models_and_routes_get_openai_errors(server):
    url = server.url
    post = {"headers": {**API, "content-type": "application/json"}, "timeout": 30}
    for raw in (b'{"prompt": "\\ud800 lone surrogate"}', b'{"prompt": "ok", "stop": ["\\udfff"]}'):
        openai_error(httpx.post(f"{url}/v1/completions", content=raw, **post), 400, "invalid Unicode")
    openai_error(httpx.post(f"{url}/v1/completions", content=b'{"prompt": "\xff\xfe not UTF-8"}', **post), 400)
    openai_error(httpx.post(f"{url}/v1/completions", content=b"{not json", **post), 400, "not valid JSON")
    error = openai_error(complete(url, model="gpt-4o", prompt=[1, 2]), 404, "gpt-4o")
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    model = httpx.get(f"{url}/v1/models", headers=API).json()["data"][0]["id"]
    assert complete(url, model=model, prompt=[1, 2], max_tokens=2).status_code == 200
    openai_error(httpx.get(f"{url}/v1/nowhere", headers=API), 404, "Invalid URL")
    openai_error(httpx.get(f"{url}/v1/completions", headers=API), 405)
    openai_error(complete(url, prompt=[1], stream_options={"include_usage": True}), 400, "stream_options")
    openai_error(httpx.get(f"{url}/admin/steps", params={"limit": 6}, headers=ADMIN), 400, "limit")


def test_stream_options_include_usage(server):
    body = {"prompt": [5] * 30, "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=API, timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        lines = [line for line in resp.iter_lines() if line]
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert lines[-1] == "data: [DONE]"
    *tokens, usage = chunks
    assert len(tokens) == 6 and all(c["usage"] is None and len(c["choices"]) == 1 for c in tokens)
    assert tokens[-1]["choices"][0]["finish_reason"] == "length" and "llumnix" in tokens[-1]
    assert usage["choices"] == [] and usage["id"] == tokens[0]["id"]
    assert usage["usage"] == {"prompt_tokens": 30, "completion_tokens": 6, "total_tokens": 36}


# -- clients that go away --------------------------------------------------------------------------------------------
def test_a_client_closing_its_stream_frees_its_request(server):
    manager = server.manager
    aborted = manager.counters["aborted"]
    request_id = asyncio.run(stream_then_leave(server.url, 3, prompt=PROMPT, max_tokens=1000))
    assert_all_freed(server)
    assert manager.counters["aborted"] == aborted + 1 and request_id not in manager.active
    text = httpx.get(f"{server.url}/metrics").text
    assert metric_samples(text, "llumnix_aborted_total") == [aborted + 1.0]


def test_a_client_leaving_a_non_streamed_request_frees_it(server):
    manager = server.manager
    aborted = manager.counters["aborted"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 1000}, headers=API,
                   timeout=httpx.Timeout(30, read=1.0))  # gives up after 1 s, closing the connection
    assert_all_freed(server)
    assert manager.counters["aborted"] == aborted + 1


def test_a_client_leaving_while_its_request_migrates_frees_it_everywhere(server):
    manager = server.manager
    aborted, started = manager.counters["aborted"], []

    async def migrate(chunk, seen):
        if seen == 3:
            async with httpx.AsyncClient(headers=ADMIN) as client:
                result = (await client.post(f"{server.url}/admin/migrate", json={"request_id": chunk["id"]})).json()
            assert result["started"], result
            started.append(result)

    asyncio.run(stream_then_leave(server.url, 3, on_chunk=migrate, prompt=PROMPT, max_tokens=1000))
    assert started
    assert_all_freed(server)
    assert manager.counters["aborted"] == aborted + 1


def test_an_abandoned_request_frozen_in_a_migration_is_dropped_where_it_lands():
    """Frozen in a stop-and-copy, the request cannot be aborted on its source; when its migration ends it is aborted
    where the migration left it: on the destination if it committed, back on the source if it aborted."""
    manager = ClusterManager(build_serve_config({}, {"backend": "profile"}))
    sent = []
    manager._abort_engine_request = lambda instance_id, engine_id: sent.append((instance_id, engine_id))
    for committed, where in ((True, 1), (False, 0)):
        sent.clear()
        cr = ClientRequest("cmpl-1", [1, 2], 10, 0, 0.0)
        cr.new_attempt(7, 0)
        manager.active[cr.request_id], manager._by_engine[7] = cr, cr
        assert manager.abort(cr) and not manager.abort(cr)  # the second: it had ended already
        assert cr.error == "client disconnected" and cr.request_id not in manager.active
        assert sent == [(0, 7)]  # tried on its instance at once (refused there while frozen)
        record = MigrationRecord(migration_id=3, request_id=7, src=0, dst=1, start_s=0.0, end_s=1.0, stages=2,
                                 blocks=3, downtime_s=0.1, committed=committed, abort_reason="" if committed else "x")
        manager._migration_ended(record)
        assert sent == [(0, 7), (where, 7)]
    assert manager.counters["aborted"] == 2


def test_requests_beyond_the_limit_get_429_until_some_leave(server):
    """Two requests held (the module's limit), a third gets 429 with Retry-After; once their clients leave, the
    cluster takes requests again."""

    async def run():
        opened, release = asyncio.Event(), asyncio.Event()

        async def held(n):
            async def on_chunk(chunk, seen):
                if len(server.manager.active) == 2:
                    opened.set()
                await release.wait()

            await stream_then_leave(server.url, 1, on_chunk=on_chunk, prompt=[n] * 20, max_tokens=1000)

        tasks = [asyncio.create_task(held(n)) for n in (1, 2)]
        await asyncio.wait_for(opened.wait(), 20)
        async with httpx.AsyncClient(headers=API) as client:
            third = await client.post(f"{server.url}/v1/completions", json={"prompt": [3], "max_tokens": 2})
        release.set()
        await asyncio.gather(*tasks)
        return third

    third = asyncio.run(run())
    error = openai_error(third, 429, "limit of 2 requests")
    assert error["code"] == "rate_limit_exceeded" and third.headers["retry-after"] == "1"
    assert_all_freed(server)
    assert complete(server.url, prompt=[3], max_tokens=2).status_code == 200


# -- admin logs --------------------------------------------------------------------------------------------------------
def test_admin_steps_are_paged_and_the_log_bounded(server):
    url = server.url
    assert complete(url, prompt=[1] * 20, max_tokens=60).status_code == 200  # 60+ steps on one instance
    rows = {i: [] for i in (0, 1)}
    for iid in rows:
        start = 0
        while True:
            page = httpx.get(f"{url}/admin/steps", params={"instance_id": iid, "start": start},
                             headers=ADMIN).json()
            assert len(page) <= 5 and {r["instance_id"] for r in page} <= {iid}
            if not page:
                break
            rows[iid] += page
            start = page[-1]["seq"] + 1
    busiest = max(rows.values(), key=len)
    assert len(busiest) == 40  # the instance keeps its last 40 steps (step_log_size)
    seqs = [r["seq"] for r in busiest]
    assert seqs == list(range(seqs[0], seqs[0] + 40)) and seqs[0] > 0  # the oldest were dropped
    first = httpx.get(f"{url}/admin/steps", params={"start": 0, "limit": 2}, headers=ADMIN).json()
    assert sorted(r["seq"] for r in first if r["instance_id"] == busiest[0]["instance_id"]) == seqs[:2]
    migrations = httpx.get(f"{url}/admin/migrations", params={"limit": 5}, headers=ADMIN).json()
    assert len(migrations) <= 5 and all("seq" in m and "client_request_id" in m for m in migrations)
