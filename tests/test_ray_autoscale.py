"""Auto-scaling in the Ray serving cluster: the simulator's Scaler starts instance actors under load and drains them
when idle; a drained instance's requests migrate away (llumnix) or finish in place (infaas++), its queued ones are
dispatched again, and it stops once empty. No request is lost, and the cost (instance-seconds) is reported.

One local Ray (2 CPUs) for the module; profile-backend instances (steps only sleep) except the token-identity test,
which runs the tiny torch model so that a migrated request's greedy tokens can be compared with an unmigrated run.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
from click.testing import CliRunner

from llumnix.runtime.cli import replay as replay_command
from llumnix.runtime.cli import serve as serve_command
from llumnix.runtime.frontend import BackgroundServer, metric_samples
from llumnix.runtime.replay import cost_between
from llumnix.runtime.serve_config import ServeConfigError, build_serve_config

pytestmark = pytest.mark.timeout(180)


def config(**overrides):
    values = {"port": 0, "num_cpus_per_instance": 0.5, "num_blocks": 64, "backend": "profile", **overrides}
    return build_serve_config({}, values)


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what() if callable(what) else what}"
        time.sleep(interval_s)


async def _post_all(url: str, bodies: list[dict], during=None) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=150) as client:
        tasks = [asyncio.create_task(client.post(f"{url}/v1/completions", json=b)) for b in bodies]
        if during is not None:
            await during()
        return await asyncio.gather(*tasks)


def assert_complete(bodies: list[dict], responses: list[httpx.Response]) -> list[dict]:
    outs = []
    for body, resp in zip(bodies, responses, strict=True):
        assert resp.status_code == 200, resp.text
        out = resp.json()
        assert len(out["choices"][0]["token_ids"]) == body["max_tokens"]
        assert out["usage"]["completion_tokens"] == body["max_tokens"]
        outs.append(out)
    return outs


# -- configuration ------------------------------------------------------------------------------------------------
def test_autoscale_settings_validate_and_map_to_the_simulators_scaler():
    cfg = build_serve_config(
        {"autoscale": True, "scale_interval": 2, "min_instances": 1, "max_instances": 4, "initial_instances": 2},
        {"scale-up": 5.0, "scale-down": 30.0, "startup_delay_s": 1.5},
    )
    assert cfg.initial_count == 2
    sc = cfg.scaling_config()
    assert (sc.scale_up, sc.scale_down, sc.min_instances, sc.max_instances) == (5.0, 30.0, 1, 4)
    assert (sc.check_interval_s, sc.startup_delay_s) == (2.0, 1.5)
    assert build_serve_config({}, {"instances": 3}).scaling_config() is None
    assert build_serve_config({"autoscale": True, "instances": 3, "max_instances": 4}).initial_count == 3
    with pytest.raises(ServeConfigError, match="scale-up"):
        build_serve_config({"autoscale": True, "scale_up": 50, "scale_down": 40})
    with pytest.raises(ServeConfigError, match="initial number of instances"):
        build_serve_config({"autoscale": True, "initial_instances": 5, "max_instances": 4})
    from llumnix.runtime.cluster import ClusterManager

    with pytest.raises(RuntimeError, match="16 --max-instances x 1 CPU"):
        ClusterManager(build_serve_config({"autoscale": True, "instances": 1}))._check_resources({"CPU": 8.0})
    help_text = CliRunner().invoke(serve_command, ["--help"]).output
    for flag in ("--autoscale", "--scale-up", "--scale-down", "--min-instances", "--max-instances",
                 "--initial-instances", "--scale-interval", "--startup-delay"):
        assert flag in help_text, flag


def test_cost_between_two_scaling_reads():
    assert cost_between({"instance_seconds": 10.0, "time_s": 100.0}, {"instance_seconds": 40.0, "time_s": 115.0}) == (
        30.0,
        2.0,
    )


# -- the cluster (the ray_local fixture is in conftest.py) -------------------------------------------------------


def test_a_burst_scales_up_and_idleness_drains_back_to_min(ray_local, tmp_path: Path):
    """From 1 instance: a burst that overflows its KV pool starts more (llumnix policy: running requests migrate to
    them); once idle, instances drain one at a time back to the minimum. ``llumnix replay`` reports the cost."""
    trace = pd.DataFrame(
        {
            "request_id": range(14),
            "arrival_s": [0.02 * i for i in range(14)],
            "prompt_tokens": [100 + 7 * i for i in range(14)],
            "output_tokens": [90 + 3 * i for i in range(14)],
        }
    )
    trace.to_csv(tmp_path / "burst.csv", index=False)
    # Decisions from the start (not after the artifact's first 100 s), and loads as they are now: under per-step
    # reports an instance that went idle still shows its last step's request, which in pools this small (64 blocks)
    # keeps the cluster's freeness below --scale-down.
    cfg = config(instances=1, autoscale=True, scale_up=10, scale_down=40, min_instances=1, max_instances=3,
                 scale_interval_s=0.3, scale_first_check_s=0, load_reports="fresh")
    with BackgroundServer(cfg) as srv:
        out = tmp_path / "run"
        result = CliRunner().invoke(
            replay_command,
            ["--url", srv.url, "--trace", str(tmp_path / "burst.csv"), "--out", str(out), "--sample-interval", "0.2",
             "--no-progress", "--admin-key", srv.admin_key],
        )
        assert result.exit_code == 0, result.output
        summary = json.loads((out / "summary.json").read_text())
        assert summary["finished"] == 14 and summary["errors"] == 0
        reqs = pd.read_parquet(out / "requests.parquet")
        assert (reqs["num_generated"].to_numpy() == trace["output_tokens"].to_numpy()).all()
        assert summary["avg_instances_source"] == "frontend"
        assert 1.0 < summary["avg_instances"] <= 3.0, summary
        assert summary["scale_events"]["launch"] >= 1

        manager = srv.manager
        # Idle now: drained back to one serving instance, nothing starting or draining.
        wait_for(lambda: (s := manager.scaling_status())["serving"] == 1 and s["instances"] == 1, 60,
                 lambda: f"scale-down: {manager.scaling_status()}")
        status = httpx.get(f"{srv.url}/admin/scaling", headers=srv.admin_headers).json()
        events = status["events"]
        launched = {e["instance_id"] for e in events if e["event"] == "launch"}
        stopped = {e["instance_id"] for e in events if e["event"] == "stop"}
        assert len(launched) >= 2 and len(stopped) == len(launched) - 1, events
        assert not [e for e in events if e["event"] in ("failed", "start_failed")], events
        assert manager.counters["instances_started"] == len(launched) - 1
        assert manager.counters["failed"] == 0 and manager.counters["instance_failures"] == 0
        assert len(manager.instances) == 1 and not manager.active
        rows = httpx.get(f"{srv.url}/admin/instances", headers=srv.admin_headers).json()
        assert [r["instance_id"] for r in rows] == list(manager.instances)  # stopped instances left the rows
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert metric_samples(metrics, "llumnix_instances", state="serving") == [1.0]
        assert metric_samples(metrics, "llumnix_instance_seconds_total")
        assert metric_samples(metrics, "llumnix_instances_stopped_total")
        for check in asyncio.run(manager.check_instances()).values():
            assert check["free_blocks"] == check["num_blocks"]
        assert set(manager.retired) == stopped
        for inst in manager.retired.values():  # the stopped actors are gone from Ray
            with pytest.raises(ray_local.exceptions.RayActorError):
                ray_local.get(inst.actor.check.remote(), timeout=30)
        print("scaling:", {k: summary[k] for k in ("avg_instances", "instance_seconds", "scale_events", "wall_s")},
              "prefill p99", summary["prefill_p99_s"], "events", [(round(e["time_s"] - events[0]["time_s"], 2),
              e["instance_id"], e["event"]) for e in events])


def test_infaas_drain_requeues_waiting_and_finishes_running_in_place(ray_local):
    """No migration: a drained instance's running requests finish there, its queued ones are dispatched again."""
    cfg = config(instances=2, policy="infaas++", max_num_seqs=2, speed=2.0)
    bodies = [{"prompt": [(5 * i + j) % 1000 for j in range(40)], "max_tokens": 50} for i in range(8)]
    with BackgroundServer(cfg) as srv:
        manager = srv.manager
        drained = {}

        async def drain_when_queued():
            deadline = time.time() + 60
            while time.time() < deadline:
                await asyncio.sleep(0.02)
                queued = [i for i in manager.live_instances() if i.load and i.load.num_waiting >= 1
                          and i.load.num_running >= 1]
                if queued:
                    victim = queued[0]
                    async with httpx.AsyncClient(headers=srv.admin_headers) as client:
                        resp = await client.post(f"{srv.url}/admin/drain", json={"instance_id": victim.instance_id})
                    drained.update(resp.json())
                    return

        outs = assert_complete(bodies, asyncio.run(_post_all(srv.url, bodies, drain_when_queued)))
        assert drained.get("draining") and drained["requeued"] >= 1, drained
        victim = drained["instance_id"]
        requeued = [o for o in outs if o["llumnix"]["instances"][0] == victim and o["llumnix"]["redispatches"]]
        finished_there = [o for o in outs if o["llumnix"]["instances"] == [victim]]
        assert len(requeued) == drained["requeued"] and finished_there
        assert all(o["llumnix"]["migrations"] == 0 for o in outs)
        assert all(o["llumnix"]["instances"][-1] != victim for o in requeued)
        wait_for(lambda: victim not in manager.instances, 30, "the drained instance to stop")
        assert manager.counters["requeued_on_drain"] == drained["requeued"]
        print("infaas++ drain:", drained, "finished on the drained instance:", len(finished_there))
        assert httpx.get(f"{srv.url}/health").json()["instances"] == 1
        assert httpx.post(f"{srv.url}/admin/drain", json={"instance_id": victim},
                          headers=srv.admin_headers).status_code == 404
        last = next(iter(manager.instances))
        assert httpx.post(f"{srv.url}/admin/drain", json={"instance_id": last},
                          headers=srv.admin_headers).status_code == 409  # the last one


def test_draining_migrates_running_requests_token_identically(ray_local):
    """llumnix policy, tiny torch model: draining an instance migrates its running requests away; they finish with
    the same greedy tokens as an unmigrated run, and the instance stops with clean block accounting everywhere."""
    cfg = config(instances=2, backend="torch", num_blocks=128)
    prompts = [[(11 * i + 3 * j) % 1024 for j in range(60 + 20 * i)] for i in range(4)]
    bodies = [{"prompt": p, "max_tokens": 90} for p in prompts]
    with BackgroundServer(cfg) as srv:
        manager = srv.manager
        reference = [o["choices"][0]["token_ids"] for o in assert_complete(bodies, asyncio.run(_post_all(srv.url, bodies)))]
        drained = {}

        async def drain_when_running():
            deadline = time.time() + 60
            while time.time() < deadline:
                await asyncio.sleep(0.02)
                active = list(manager.active.values())
                if len(active) == len(bodies) and all(len(cr.tokens) >= 3 for cr in active):
                    break
            owners = [cr.owner for cr in manager.active.values()]
            victim = max(set(owners), key=owners.count)
            drained.update(await manager.drain(victim))
            drained["held"] = owners.count(victim)

        outs = assert_complete(bodies, asyncio.run(_post_all(srv.url, bodies, drain_when_running)))
        assert drained["draining"] and drained["held"] >= 1, drained
        victim = drained["instance_id"]
        moved = [o for o in outs if o["llumnix"]["instances"][0] == victim]
        assert len(moved) == drained["held"]
        assert sum(o["llumnix"]["migrations"] for o in moved) >= 1
        for out, ref in zip(outs, reference, strict=True):
            assert out["choices"][0]["token_ids"] == ref
        wait_for(lambda: victim not in manager.instances, 30, "the drained instance to stop")
        for check in asyncio.run(manager.check_instances()).values():
            assert check["free_blocks"] == check["num_blocks"] and check["incoming_migrations"] == 0
        assert manager.counters["instances_stopped"] == 1 and manager.counters["failed"] == 0
        print("llumnix drain:", drained, "migrations:", [o["llumnix"]["migrations"] for o in moved],
              "downtime_s:", [round(o["llumnix"]["migration_downtime_s"], 4) for o in moved],
              "stop after drain:", [round(e["time_s"] - manager.scale_events[-2]["time_s"], 3)
                                    for e in list(manager.scale_events)[-1:]])
