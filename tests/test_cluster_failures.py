"""What goes wrong around the serving cluster, and what the server does then: `llumnix serve` refusing to start (a port
taken, too few CPUs) before any actor starts; /admin/start-instance when Ray has no CPU for another instance.

One local Ray (2 CPUs) for the module; clusters of profile-backend instances (real block accounting, steps that sleep
for profiled times). Its tests start their own servers, one at a time, so each knows what the 2 CPUs hold.
"""

from __future__ import annotations

import socket
import time

import httpx
import pytest
from click.testing import CliRunner

from llumnix.cli import main
from llumnix.runtime.frontend import BackgroundServer, metric_samples
from llumnix.runtime.serve_config import build_serve_config

pytestmark = pytest.mark.timeout(300)

PROFILE = {"port": 0, "backend": "profile", "speed": 2, "num_blocks": 128}
PENDING = ("PENDING_CREATION", "DEPENDENCIES_UNREADY")


def openai_error(resp: httpx.Response, status: int, needle: str = "") -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text)
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert needle in error["message"], error
    return error


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


# -- /admin/start-instance without a free CPU --------------------------------------------------------------------------
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

