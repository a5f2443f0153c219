"""What goes wrong around the serving cluster, and what the server does then: `llumnix serve` refusing to start (a port
taken, too few CPUs) before any actor starts; /admin/start-instance when Ray has no CPU for another instance; an
instance killed under streaming load (every stream ends, none hangs, the survivors hold nothing afterwards, the dead
instance leaves /metrics and /health's count).

One local Ray (2 CPUs) for the module; clusters of profile-backend instances (real block accounting, steps that sleep
for profiled times). Its tests start their own servers, one at a time, so each knows what the 2 CPUs hold.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from types import SimpleNamespace

import httpx
import pytest
from click.testing import CliRunner
from test_http_security import openai_error

from llumnix.cli import main
from llumnix.runtime.frontend import INSTANCE_COUNTERS, INSTANCE_GAUGES, BackgroundServer, metric_samples
from llumnix.runtime.serve_config import build_serve_config

pytestmark = pytest.mark.timeout(300)

PROFILE = {"port": 0, "backend": "profile", "speed": 2, "num_blocks": 128}
PENDING = ("PENDING_CREATION", "DEPENDENCIES_UNREADY")




def one_error_line(result) -> str:
    """``llumnix serve`` failed with click's one-line error (no traceback); that line."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output
    return errors[0]


def pending_actors() -> list[str]:
    from ray._private import state

    return [a["ActorID"] for a in state.actors().values() if a["State"] in PENDING]


def instance_series(text: str, instance: int) -> list[str]:
    """The per-instance metrics that have a sample for ``instance``."""
    names = [name for name, _ in INSTANCE_GAUGES.values()] + [f"{name}_total" for name, _ in INSTANCE_COUNTERS.values()]
    return [name for name in names if metric_samples(text, name, instance=str(instance))]


# -- llumnix serve: checks before anything starts ----------------------------------------------------------------------
def test_serve_refuses_a_taken_port_or_a_foreign_host_before_ray_starts(monkeypatch):
    import llumnix.runtime.frontend as frontend

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the port check")

    monkeypatch.setattr(frontend, "init_ray", no_ray)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--backend", "profile", "--port", str(port)])
    line = one_error_line(result)
    assert f"--port {port}: 127.0.0.1:{port} is already in use" in line and "choose a free --port" in line, line
    result = CliRunner().invoke(main, ["serve", "--backend", "profile", "--host", "198.51.100.231", "--port", "0"])
    line = one_error_line(result)  # TEST-NET-2 (documentation): no address of this machine
    assert line.startswith("Error: --host 198.51.100.231: cannot bind") and "use an address of this machine" in line


def test_serve_refuses_more_cpus_than_ray_has_before_any_actor_starts(ray_local, monkeypatch):
    from llumnix.runtime.cluster import ClusterManager

    launched = []
    monkeypatch.setattr(ClusterManager, "launch_actor", lambda self, iid: launched.append(iid))
    args = ["serve", "--backend", "profile", "--port", "0", "--instances", "3", "--num-cpus-per-instance", "1"]
    line = one_error_line(CliRunner().invoke(main, args))
    assert "3 --instances x 1 CPU (--num-cpus-per-instance) = 3 CPU, but the Ray cluster has 2" in line, line
    assert "use fewer --instances or a smaller --num-cpus-per-instance" in line
    assert launched == [] and ray_local.is_initialized()  # no actor; the Ray it did not start is left running


def test_a_failed_start_of_the_instances_is_named_by_serve_and_by_the_background_server(ray_local, monkeypatch):
    """When the instances' start fails (in the app's lifespan, where uvicorn only logs it), `llumnix serve`'s one error
    line and BackgroundServer's exception carry the cause, not just "see the log above" (a CI log's tail lost it)."""
    from llumnix.runtime.cluster import ClusterManager

    async def fails(self):
        raise RuntimeError("instance 0's engine could not load its model")

    monkeypatch.setattr(ClusterManager, "start", fails)
    result = CliRunner().invoke(main, ["serve", "--backend", "profile", "--port", "0"])
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)  # not uvicorn's exit status 3
    last = result.output.rstrip().splitlines()[-1]  # after uvicorn's log of the traceback
    assert last == "Error: the server did not start: RuntimeError: instance 0's engine could not load its model", last
    with pytest.raises(RuntimeError, match="^the frontend failed to start: RuntimeError: instance 0's engine could not"):
        with BackgroundServer(build_serve_config({}, PROFILE)):
            pass


# -- /admin/start-instance without a free CPU --------------------------------------------------------------------------
def test_an_actor_the_actor_table_does_not_list_yet_is_not_placed(monkeypatch):
    """RayLauncher.placed: Ray registers a new actor asynchronously, so just after launch its actor table may not
    list it ({}): not placed yet. (Taken for placed, a start that could never be placed waited for the 600 s startup
    timeout: a CI run's start-instance request below timed out that way.) Pending without a worker: not placed; with
    a worker, or in any later state: placed; the private API gone: placed, left to the startup timeout."""
    from ray._private import state

    from llumnix.runtime.actors import RayLauncher

    handle = SimpleNamespace(_actor_id=SimpleNamespace(hex=lambda: "ab"))
    launcher = RayLauncher()
    for info, placed in (({}, False), ({"State": "PENDING_CREATION", "Pid": 0}, False),
                         ({"State": "DEPENDENCIES_UNREADY", "Pid": 0}, False), ({"State": "PENDING_CREATION", "Pid": 7}, True),
                         ({"State": "ALIVE", "Pid": 7}, True), ({"State": "DEAD", "Pid": 0}, True)):
        monkeypatch.setattr(state, "actors", lambda actor_id, info=info: info)
        assert launcher.placed(handle) is placed, info

    def moved(actor_id):
        raise AttributeError("moved")

    monkeypatch.setattr(state, "actors", moved)
    assert launcher.placed(handle) is True


def test_start_instance_without_a_free_cpu_answers_503_and_leaves_no_pending_actor(ray_local):
    """Two instances of 1 CPU hold the local Ray's 2: a third cannot be placed. The route answers 503 after
    --placement-timeout (not after --startup-timeout's 600 s), and the actor it launched is killed, not left queued
    for a CPU (it would take one the moment an instance stops)."""
    config = build_serve_config({}, {**PROFILE, "instances": 2, "num_cpus_per_instance": 1.0,
                                     "placement_timeout_s": 2.0})
    with BackgroundServer(config) as srv:
        manager = srv.manager
        resp = httpx.post(f"{srv.url}/admin/start-instance", headers=srv.admin_headers, timeout=120)
        error = openai_error(resp, 503, "instance 2 did not start: Ray gave the new instance no resources within 2 s")
        assert (error["type"], error["code"]) == ("service_unavailable", "instance_not_placed")
        assert "1 CPU (--num-cpus-per-instance)" in error["message"] and "0 CPU free" in error["message"], error
        assert not manager.starting and manager.counters["instance_start_failures"] == 1
        assert [e["event"] for e in manager.scale_events if e["instance_id"] == 2] == ["launch", "start_failed"]
        deadline = time.monotonic() + 60  # hang guard: Ray records the kill asynchronously
        while pending_actors():
            assert time.monotonic() < deadline, pending_actors()
            time.sleep(0.1)
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert metric_samples(metrics, "llumnix_instances", state="starting") == [0.0]
        assert metric_samples(metrics, "llumnix_instances", state="serving") == [2.0]
        assert metric_samples(metrics, "llumnix_instance_start_failures_total") == [1.0]
        resp = httpx.post(f"{srv.url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 5}, timeout=120)
        assert resp.status_code == 200 and len(resp.json()["choices"][0]["token_ids"]) == 5  # it still serves


# -- chaos: an instance killed under streaming load --------------------------------------------------------------------
async def _stream(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """One streamed completion, read to its end: its tokens, last finish_reason, error event and whether [DONE] came."""
    out = {"tokens": [], "finish_reason": None, "error": None, "done": False, "id": None}
    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                out["done"] = True
                break
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                out["error"] = chunk["error"]
                continue
            out["id"] = chunk["id"]
            choice = chunk["choices"][0]
            out["tokens"] += choice["token_ids"]
            out["finish_reason"] = choice["finish_reason"] or out["finish_reason"]
    return out


def test_killing_an_instance_under_streaming_load_ends_every_stream_and_leaks_nothing(ray_local):
    """20 concurrent streams on 3 instances, the pairing loop migrating requests between them all along; the
    instance holding the most is killed once every stream has tokens, while the others serve the rest. Every stream ends: exactly its max_tokens, or an
    error event, then [DONE]; none hangs (the whole run has a hang guard). Afterwards every live instance's own
    accounting shows all blocks free and no request, the dead one is gone from /metrics and /health counts it dead.
    tests/test_ray_cluster.py's kill tests check the re-dispatched requests' tokens on the torch engine."""
    import ray

    # Fresh load reports (they count the requests dispatched since): the burst spreads over the 3 instances. A high
    # migration threshold and a short pairing interval keep requests migrating, so the kill lands among migrations.
    config = build_serve_config({}, {**PROFILE, "instances": 3, "num_cpus_per_instance": 0.5, "load_reports": "fresh",
                                     "migration_threshold": 100.0, "pairing_interval_s": 0.05})
    bodies = [{"prompt": [(11 * i + j) % 1000 for j in range(16 + 3 * i)], "max_tokens": 40 + 4 * i}
              for i in range(20)]
    with BackgroundServer(config) as srv:
        manager = srv.manager

        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                tasks = [asyncio.create_task(_stream(client, srv.url, b)) for b in bodies]
                deadline = time.monotonic() + 120  # until every stream has tokens (or, on a slow machine, kill anyway)
                while time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                    active = list(manager.active.values())
                    if len(active) == len(bodies) and all(len(cr.tokens) >= 2 for cr in active):
                        break
                owners = [cr.owner for cr in manager.active.values() if cr.owner is not None]
                victim = max(set(owners), key=owners.count)
                held = {cr.request_id for cr in manager.active.values() if cr.owner == victim}
                ray.kill(manager.instances[victim].actor, no_restart=True)
                return victim, held, await asyncio.wait_for(asyncio.gather(*tasks), 240)  # the hang guard

        victim, held, results = asyncio.run(run())
        assert 0 < len(held) < len(bodies) and manager.counters["instance_failures"] == 1
        errors = []
        for body, out in zip(bodies, results, strict=True):
            assert out["done"], out
            if out["error"] is None:
                assert len(out["tokens"]) == body["max_tokens"] and out["finish_reason"] == "length", out
            else:
                assert out["error"]["type"] == "server_error" and out["error"]["message"], out
                assert len(out["tokens"]) < body["max_tokens"]
                errors.append(out["error"]["message"])
        print(f"killed instance {victim} holding {len(held)} of {len(bodies)} streams; "
              f"{len(bodies) - len(errors)} completed, {len(errors)} ended with an error {errors[:3]}; "
              f"re-dispatched {manager.counters['redispatched']}, migrations {manager.counters['migrations_started']}")

        deadline = time.monotonic() + 60  # hang guard: aborts and migration ends reach the instances asynchronously
        while True:
            checks = asyncio.run(manager.check_instances())
            clean = all(c["free_blocks"] == c["num_blocks"] and not c["running"] and not c["waiting"]
                        and not c["frozen"] and c["migrations_out"] == 0 and c["migrations_in"] == 0
                        for c in checks.values())
            if clean and not manager.active:
                break
            assert time.monotonic() < deadline, (checks, list(manager.active))
            time.sleep(0.05)
        assert sorted(checks) == sorted({0, 1, 2} - {victim})

        health = httpx.get(f"{srv.url}/health").json()
        assert (health["status"], health["instances"], health["instances_dead"]) == ("ok", 2, 1), health
        metrics = httpx.get(f"{srv.url}/metrics").text  # (its loads are per-step reports: as of each last step)
        assert instance_series(metrics, victim) == []
        for survivor in checks:
            assert len(instance_series(metrics, survivor)) == len(INSTANCE_GAUGES) + len(INSTANCE_COUNTERS)
        assert metric_samples(metrics, "llumnix_instance_up") == [1.0, 1.0]
