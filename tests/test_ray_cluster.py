"""The Ray serving cluster: HTTP API, streaming, live migration between actors, fail-over; and its pure helpers.

One local Ray (2 CPUs) for the module; clusters of 2 tiny-LLaMA instances on CPU with small KV pools. Every instance
is built with the same seed, so a request's greedy tokens do not depend on where (or across how many) it ran.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from click.testing import CliRunner

from llumnix.cli import main
from llumnix.core.block_manager import BlockManager
from llumnix.core.llumlet import InstanceLoad, Llumlet
from llumnix.core.local_scheduler import LocalScheduler
from llumnix.core.request import Request
from llumnix.policies.dispatch import make_dispatch_policy
from llumnix.runtime.frontend import BackgroundServer, decode_tokens, encode_text, metric_samples
from llumnix.runtime.kv_transport import pack, unpack
from llumnix.runtime.serve_config import ServeConfig, ServeConfigError, build_serve_config

pytestmark = pytest.mark.timeout(300)

LONG_PROMPT = [(7 * i + 3) % 1024 for i in range(300)]


def cluster_config(**overrides):
    values = {"instances": 2, "port": 0, "num_cpus_per_instance": 0.5, "num_blocks": 128, **overrides}
    return build_serve_config({}, values)


# -- pure helpers -------------------------------------------------------------------------------------------------
def load(iid: int, free: int) -> InstanceLoad:
    """An idle instance's report, computed by its llumlet (so it carries its load inputs)."""
    ll = Llumlet(iid, LocalScheduler(BlockManager(128, 16, 0.01)))
    ll.blocks.allocate_blocks("other", 128 - free)
    return ll.load()


def test_pending_accounting_spreads_a_burst_between_reports():
    policy = make_dispatch_policy("freeness")
    reports = {0: load(0, 127), 1: load(1, 126)}
    pending: dict[int, list] = {0: [], 1: []}
    chosen = []
    for i in range(6):
        req = Request(i, 0.0, 160, 16)
        iid = policy.choose(req, [reports[k].with_pending(pending[k]) for k in reports])
        pending[iid].append((10, False))
        chosen.append(iid)
    assert chosen.count(0) == 3 and chosen.count(1) == 3


def test_kv_payload_round_trip():
    for dtype in (torch.float32, torch.bfloat16):
        data = torch.randn(2, 2, 3, 4, 2, 8).to(dtype)
        back = unpack(pack(data, 3))
        assert back.dtype == dtype and torch.equal(back, data)
    assert unpack(pack(3, 3)) == 3  # the profile executor's payload is a block count


def test_serve_config_merges_yaml_and_flags(tmp_path: Path):
    cfg = build_serve_config(
        {"instances": 4, "policy": "infaas++", "num_blocks": 64, "instance": {"seed": 5}},
        {"instances": 3, "num-blocks": 32},
    )
    assert (cfg.instances, cfg.policy, cfg.instance.num_blocks, cfg.instance.seed) == (3, "infaas++", 32, 5)
    assert not cfg.migrates
    assert build_serve_config({}, {"device": "cuda"}).gpus_per_instance == 1.0
    assert build_serve_config({}, {"device": "cuda", "num_gpus_per_instance": 0.5}).gpus_per_instance == 0.5
    with pytest.raises(ServeConfigError, match="policy"):
        build_serve_config({"policy": "fifo"})
    with pytest.raises(ServeConfigError, match="instances"):
        build_serve_config({"instances": 0})
    with pytest.raises(ServeConfigError, match="bogus"):
        build_serve_config({"bogus": 1})
    assert build_serve_config({}, {"invariant_batch": 8}).instance.invariant_batch == 8
    with pytest.raises(ServeConfigError, match="invariant_batch is a torch backend setting"):
        build_serve_config({"backend": "profile", "invariant_batch": 8})


def test_serve_command_merges_config_file_and_flags(tmp_path: Path, monkeypatch):
    """``llumnix serve --config FILE``: the file's settings are the flags' defaults, flags given win."""
    import llumnix.runtime.frontend as frontend

    served = []
    monkeypatch.setattr(frontend, "serve", served.append)

    def serve(*args) -> ServeConfig:
        r = CliRunner().invoke(main, ["serve", *map(str, args)])
        assert r.exit_code == 0, r.output
        return served.pop()

    path = tmp_path / "serve.yaml"
    path.write_text("instances: 4\npolicy: infaas++\nnum_blocks: 64\npairing_interval: 0.2\nscale-interval: 5\n"
                    "instance:\n  seed: 5\n  priorities: true\n")
    cfg = serve("--instances", 3, "--config", path, "--num-blocks", 32, "--no-priorities")
    assert (cfg.instances, cfg.policy, cfg.instance.num_blocks, cfg.instance.seed) == (3, "infaas++", 32, 5)
    assert (cfg.pairing_interval_s, cfg.scale_interval_s, cfg.instance.priorities) == (0.2, 5.0, False)
    assert serve() == build_serve_config()  # the flags' defaults are the config's
    assert not serve("--no-migration").migration and serve("--priorities").instance.priorities
    path.write_text("bogus: 1\n")
    r = CliRunner().invoke(main, ["serve", "--config", str(path)])
    assert r.exit_code != 0 and "unknown setting 'bogus'" in r.output and not served


def test_a_cluster_too_small_for_the_instances_fails_fast():
    from llumnix.runtime.cluster import ClusterManager, StartupError

    with pytest.raises(StartupError, match=r"4 --instances x 1 CPU \(--num-cpus-per-instance\) = 4 CPU, but the Ray "
                       "cluster has 2: use fewer --instances or a smaller --num-cpus-per-instance"):
        ClusterManager(build_serve_config({"instances": 4}))._check_resources({"CPU": 2.0})
    with pytest.raises(StartupError, match="GPU"):
        ClusterManager(build_serve_config({"instances": 2, "device": "cuda"}))._check_resources({"CPU": 8.0})
    ClusterManager(build_serve_config({"instances": 4, "num_cpus_per_instance": 0.5}))._check_resources({"CPU": 2.0})


def test_text_tokenisation_is_bytes_mod_vocab():
    assert encode_text("Aé", 1024) == [65, 0xC3, 0xA9]
    assert encode_text("A", 50) == [65 % 50]
    assert decode_tokens([1, 22]) == " 1 22"


# -- the cluster (the ray_local fixture is in conftest.py) -------------------------------------------------------


@pytest.fixture(scope="module")
def server(ray_local):
    with BackgroundServer(cluster_config()) as srv:
        yield srv


def complete(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def stream_live(url: str, on_chunk, **body) -> tuple[list[int], dict, list[str]]:
    """Stream and call ``on_chunk`` as each chunk arrives (while the request is still generating)."""
    tokens, final, raw = [], {}, []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line:
                continue
            raw.append(line)
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[len("data: ") :])
            assert "error" not in chunk, chunk
            tokens += chunk["choices"][0]["token_ids"]
            final = chunk.get("llumnix", final)
            on_chunk(chunk, tokens)
    return tokens, final, raw


async def _concurrent(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(client.post(f"{url}/v1/completions", json=b) for b in bodies))


def test_concurrent_requests_all_complete_with_exactly_max_tokens(server):
    """A burst while one long request runs: every request gets exactly its tokens, and the burst's first request goes
    to the instance that holds nothing (an empty instance's freeness is +inf), so the burst uses the other instance."""
    started, long_out = threading.Event(), {}

    def long_request() -> None:
        long_out["tokens"], long_out["final"], _ = stream_live(
            server.url, lambda chunk, tokens: started.set(), prompt=LONG_PROMPT[:64], max_tokens=120, ignore_eos=True
        )

    runner = threading.Thread(target=long_request)
    runner.start()
    assert started.wait(60), "the long request produced no token"
    bodies = [
        {"prompt": [(i * 31 + j) % 1024 for j in range(10 + 7 * i)], "max_tokens": 12 + 5 * i, "ignore_eos": True}
        for i in range(10)
    ] + [{"prompt": "hello llumnix", "max_tokens": 20}]
    responses = asyncio.run(_concurrent(server.url, bodies))
    runner.join(120)
    assert len(long_out["tokens"]) == 120
    (busy,) = long_out["final"]["instances"]
    instances = set()
    for body, resp in zip(bodies, responses, strict=True):
        assert resp.status_code == 200, resp.text
        out = resp.json()
        choice = out["choices"][0]
        assert len(choice["token_ids"]) == body["max_tokens"]
        assert choice["finish_reason"] == "length"
        assert choice["text"] == decode_tokens(choice["token_ids"])
        assert out["usage"]["completion_tokens"] == body["max_tokens"]
        instances.update(out["llumnix"]["instances"])
    assert 1 - busy in instances  # the dispatch policy used the idle instance


def test_streaming_matches_the_non_streaming_answer(server):
    body = {"prompt": "stream me", "max_tokens": 24}
    expected = complete(server.url, **body).json()["choices"][0]["token_ids"]
    chunks = []
    tokens, final, raw = stream_live(server.url, lambda c, t: chunks.append(c), **body)
    assert tokens == expected
    assert raw[-1] == "data: [DONE]"
    assert len(chunks) == 24 and all(len(c["choices"][0]["token_ids"]) == 1 for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, "length"]
    assert final["first_token_s"] <= final["finish_s"]


def test_malformed_requests_get_a_4xx_and_do_not_disturb_others(server):
    url = server.url
    good = [{"prompt": [5 + i] * 20, "max_tokens": 30} for i in range(4)]
    bad = [
        ({"max_tokens": 5}, "prompt"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "x", "ignore_eos": False}, "ignore_eos"),
        ({"prompt": "x", "temperature": 0.7}, "greedy"),
        ({"prompt": [1, 2, 5000]}, "[0, 1024)"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": ""}, "empty"),
        ({"prompt": "x", "max_tokens": 10_000}, "exceeds"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "stop": "a"}, "stop strings need a model with a tokenizer"),
    ]

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            goods = [client.post(f"{url}/v1/completions", json=b) for b in good]
            bads = [client.post(f"{url}/v1/completions", json=b) for b, _ in bad]
            raw = client.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
            return await asyncio.gather(*goods), await asyncio.gather(*bads, raw)

    good_resps, bad_resps = asyncio.run(run())
    for (body, needle), resp in zip(bad, bad_resps[:-1], strict=True):
        assert 400 <= resp.status_code < 500, (body, resp.text)
        assert needle in resp.json()["error"]["message"], (body, resp.text)
    assert bad_resps[-1].status_code == 400 and "not valid JSON" in bad_resps[-1].json()["error"]["message"]
    for body, resp in zip(good, good_resps, strict=True):
        assert resp.status_code == 200 and len(resp.json()["choices"][0]["token_ids"]) == body["max_tokens"]
    assert httpx.post(f"{url}/admin/migrate", json={"request_id": "cmpl-999999"},
                      headers=server.admin_headers).status_code == 404


def test_forced_migration_commits_and_the_stream_is_seamless(server):
    url = server.url
    body = {"prompt": LONG_PROMPT, "max_tokens": 160}
    reference = complete(url, **body).json()
    assert reference["llumnix"]["migrations"] == 0
    results = []

    def migrate_once(chunk, tokens):
        if len(tokens) == 4:
            results.append(httpx.post(f"{url}/admin/migrate", json={"request_id": chunk["id"]}, timeout=30,
                                       headers=server.admin_headers).json())

    tokens, final, _ = stream_live(url, migrate_once, **body)
    assert results and results[0]["started"], results
    assert final["migrations"] == 1, final
    assert final["instances"] == [results[0]["src"], results[0]["dst"]]
    records = final["migration_records"]
    assert len(records) == 1 and records[0]["committed"] and records[0]["stages"] >= 2  # committed, multi-stage
    assert 0 < final["migration_downtime_s"] < 1.0
    assert tokens == reference["choices"][0]["token_ids"]  # the same greedy tokens as the unmigrated run
    metrics = httpx.get(f"{url}/metrics").text
    assert sum(metric_samples(metrics, "llumnix_instance_migrations_committed_total")) >= 1
    for check in asyncio.run(server.manager.check_instances()).values():
        assert check["free_blocks"] == check["num_blocks"] and check["incoming_migrations"] == 0


def test_metrics_are_the_managers_state_read_back_by_the_parser():
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from llumnix.runtime.frontend import INSTANCE_COUNTERS, INSTANCE_GAUGES, metrics_registry

    row = dict.fromkeys((*INSTANCE_GAUGES, *INSTANCE_COUNTERS), 1.0) | {"instance_id": 3, "freeness": -math.inf}
    dead = row | {"instance_id": 5, "alive": False}
    manager = SimpleNamespace(
        instance_rows=lambda: [row, dead], counters={"requests": 5}, active={}, dispatch_latency=SimpleNamespace(count=4,
        total_s=0.2), decision_latency=SimpleNamespace(count=4, total_s=0.1),
        scaling_status=lambda: {"starting": 0, "serving": 1, "draining": 0, "instance_seconds": 2.5},
    )  # fmt: skip
    text = generate_latest(metrics_registry(manager)).decode()
    assert metric_samples(text, "llumnix_instance_freeness", instance="3") == [-math.inf]
    assert metric_samples(text, "llumnix_instance_steps_total", instance="3") == [1.0]
    assert metric_samples(text, "llumnix_instance_up", instance="4") == []
    assert metric_samples(text, "llumnix_instance_up") == [1.0]  # a dead instance has no series
    assert 'instance="5"' not in text
    assert metric_samples(text, "llumnix_requests_total") == [5.0]
    assert metric_samples(text, "llumnix_instances", state="serving") == [1.0]
    assert metric_samples(text, "llumnix_instance_seconds_total") == [2.5]
    assert metric_samples(text, "llumnix_dispatch_seconds_sum") == [0.2]


def test_chat_needs_a_real_model(server):
    resp = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 400 and "random weights" in resp.json()["error"]["message"]


def test_health_models_and_metrics(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "instances": 2, "instances_alive": 2,
                                                        "instances_dead": 0, "instances_starting": 0}
    model = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    assert model["vocab_size"] == 1024 and model["max_context_tokens"] == 127 * 16
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("llumnix_instance_running_requests", "llumnix_instance_waiting_requests", "llumnix_instance_free_blocks",
                 "llumnix_instance_freeness", "llumnix_instance_migrations_aborted_total", "llumnix_dispatch_seconds_count"):
        assert metric_samples(text, name), name


def test_pairing_policy_migrates_on_its_own(ray_local, server):
    """With the threshold above an idle instance's freeness minus one long request's blocks, the pairing loop keeps
    moving that request; its stream stays identical to an unmigrated run."""
    body = {"prompt": LONG_PROMPT * 3, "max_tokens": 100}
    reference = complete(server.url, **body).json()["choices"][0]["token_ids"]
    with BackgroundServer(cluster_config(migration_threshold=100.0, pairing_interval_s=0.05)) as srv:
        tokens, final, _ = stream_live(srv.url, lambda c, t: None, **body)
        assert final["migrations"] >= 1, final
        assert tokens == reference
        assert srv.manager.counters["migrations_started"] >= 1


def test_killing_an_instance_loses_no_request(ray_local):
    import ray

    with BackgroundServer(cluster_config()) as srv:
        manager = srv.manager
        bodies = [{"prompt": [(3 * i + j) % 1024 for j in range(40)], "max_tokens": 120} for i in range(6)]

        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                tasks = [asyncio.create_task(client.post(f"{srv.url}/v1/completions", json=b)) for b in bodies]
                deadline = time.time() + 60
                while time.time() < deadline:  # wait until every request streams tokens
                    await asyncio.sleep(0.02)
                    active = list(manager.active.values())
                    if len(active) == len(bodies) and all(len(cr.tokens) >= 3 for cr in active):
                        break
                victim = next(iter(manager.active.values())).owner
                held = [cr.request_id for cr in manager.active.values() if cr.owner == victim]
                ray.kill(manager.instances[victim].actor, no_restart=True)
                return victim, held, await asyncio.gather(*tasks)

        victim, held, responses = asyncio.run(run())
        assert held
        for body, resp in zip(bodies, responses, strict=True):
            assert resp.status_code == 200, resp.text
            out = resp.json()
            assert len(out["choices"][0]["token_ids"]) == body["max_tokens"]
            if out["id"] in held:
                assert out["llumnix"]["redispatches"] == 1 and out["llumnix"]["instances"][-1] != victim
        assert manager.counters["redispatched"] >= len(held)
        health = httpx.get(f"{srv.url}/health").json()
        assert (health["instances"], health["instances_alive"], health["instances_dead"]) == (1, 1, 1), health
        metrics = httpx.get(f"{srv.url}/metrics").text  # the dead instance's series are gone, the survivor's stay
        for name in ("llumnix_instance_up", "llumnix_instance_running_requests", "llumnix_instance_free_blocks",
                     "llumnix_instance_steps_total"):
            assert metric_samples(metrics, name, instance=str(victim)) == [], name
            assert metric_samples(metrics, name, instance=str(1 - victim)), name
        assert metric_samples(metrics, "llumnix_instance_failures_total") == [1.0]
        # the survivor still serves
        assert len(complete(srv.url, prompt="after", max_tokens=5).json()["choices"][0]["token_ids"]) == 5


def test_a_destination_dying_mid_migration_loses_nothing(ray_local):
    """Whichever stage the kill lands in (the source aborts and keeps the request, or the destination had adopted
    it and the frontend recomputes it), the client gets all its tokens."""
    import ray

    with BackgroundServer(cluster_config()) as srv:
        killed = []

        def migrate_then_kill(chunk, tokens):
            if len(tokens) == 4:
                result = httpx.post(f"{srv.url}/admin/migrate", json={"request_id": chunk["id"]}, timeout=30,
                                    headers=srv.admin_headers).json()
                assert result["started"], result
                ray.kill(srv.manager.instances[result["dst"]].actor, no_restart=True)
                killed.append(result["dst"])

        tokens, final, _ = stream_live(srv.url, migrate_then_kill, prompt=LONG_PROMPT, max_tokens=150)
        assert killed and len(tokens) == 150
        assert final["migrations"] + final["redispatches"] <= 2
        survivor = 1 - killed[0]
        check = asyncio.run(srv.manager.check_instances())[survivor]
        assert check["incoming_migrations"] == 0 and check["migrations_out"] == 0
        assert check["free_blocks"] == check["num_blocks"]


def test_serve_command_joins_a_running_cluster(ray_local, tmp_path: Path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "serve.yaml"
    config.write_text("instances: 3\nbackend: profile\nspeed: 50\nnum_blocks: 64\nnum_cpus_per_instance: 0\n")
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "llumnix.cli", "serve", "--config", str(config), "--address", address,
           "--instances", "1", "--port", str(port), "--policy", "infaas++"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "llumnix serve did not come up"
            time.sleep(0.3)
        assert httpx.get(f"{url}/health").json()["instances"] == 1  # the flag beat the file's 3
        out = complete(url, prompt=[1, 2, 3], max_tokens=7).json()
        assert len(out["choices"][0]["token_ids"]) == 7 and out["model"] == "profile:a10-llama-7b"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_the_local_ray_cluster_takes_only_clients_holding_its_token(ray_local, tmp_path: Path):
    """Ray's token authentication is on (``init_ray``): a process without the token (another user's home, none in
    the environment), or with a wrong one, cannot join the cluster and so cannot run code in it; one holding the token
    can."""
    address = ray_local.get_runtime_context().gcs_address
    join = "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); print('joined', ray.is_initialized())"
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base["RAY_gcs_server_port_wait_time_s"] = "2"  # a refused client gives up after two tries

    def joins(**env: str) -> bool:
        proc = subprocess.run([sys.executable, "-c", join, address], env={**base, **env}, capture_output=True,
                              text=True, timeout=120)
        return proc.returncode == 0 and "joined True" in proc.stdout

    stranger = str(tmp_path)  # a home without ~/.ray/auth_token
    assert not joins(HOME=stranger, RAY_AUTH_MODE="token")
    assert not joins(HOME=stranger, RAY_AUTH_MODE="disabled")
    assert not joins(HOME=stranger)
    assert not joins(HOME=stranger, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 32)
    assert joins(RAY_AUTH_MODE="token")  # this user's token, in ~/.ray/auth_token


def test_the_kv_rendezvous_store_listens_on_loopback_only():
    import psutil

    from llumnix.runtime.dist_channel import serve_store

    server, address = serve_store("127.0.0.1")
    try:
        port = int(address.rpartition(":")[2])
        listening = [c.laddr for c in psutil.Process().net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert listening and {a.ip for a in listening} == {"127.0.0.1"}, listening
    finally:
        server.close()
