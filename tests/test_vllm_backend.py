"""vLLM as an instance backend: a tiny random LLaMA served by two in-process vLLM engines (CPU), and by a Ray
serving cluster of two vLLM instance actors (``llumnix serve --backend vllm``).

Skipped without vLLM (the main environment has none; ``make test-vllm`` runs them in ``.venv-vllm``).
"""

import asyncio
import json
import math
import os
import time

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (make install-vllm; see docs/vllm.md)")
pytest.importorskip("transformers", reason="transformers is needed to write the tiny test model")

import httpx  # noqa: E402

from llumnix.core.llumlet import LlumletConfig  # noqa: E402
from llumnix.core.request import HIGH, Request, RequestStatus  # noqa: E402
from llumnix.runtime.frontend import metric_samples  # noqa: E402
from llumnix.runtime.serve_config import ServeConfigError, build_serve_config  # noqa: E402
from llumnix.runtime.vllm_instance import VllmInstance, VllmInstanceConfig, migrate  # noqa: E402
from llumnix.runtime.vllm_model import write_random_llama  # noqa: E402

pytestmark = pytest.mark.slow

NUM_BLOCKS = 64  # 63 usable (vLLM keeps a null block) x 32 tokens
BLOCK_SIZE = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The ``tiny`` preset with seed 0: what ``llumnix serve --backend vllm --model tiny`` serves."""
    return str(write_random_llama(tmp_path_factory.mktemp("tiny-llama"), "tiny", seed=0))


@pytest.fixture(scope="module")
def engines(model_dir):
    """Two engines of one module: both are needed for migration, each holds ~0.4 GB with this KV cap."""
    cfg = VllmInstanceConfig(
        model_dir, block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS, max_model_len=1024, enable_priorities=True
    )
    a = VllmInstance(0, cfg, LlumletConfig(enable_priorities=True))
    b = VllmInstance(1, cfg, LlumletConfig(enable_priorities=True))
    yield a, b
    for inst in (a, b):
        assert not inst.has_work()
    for inst in (a, b):
        inst.shutdown()  # at teardown rather than from a finalizer at interpreter exit


def _run(inst: VllmInstance, req: Request) -> list[int]:
    inst.add_request(req)
    done = inst.run_until_idle()
    assert done == [req] and req.finished
    return req.output_token_ids


def test_add_step_finish(engines):
    a, _ = engines
    req = Request(1, 0.0, 70, 24)
    t_before = a.clock()
    out = _run(a, req)
    assert len(out) == req.num_generated == 24
    assert len(set(out)) > 4, "greedy output collapsed; the tiny model's weights are too flat to test continuity"
    assert len(req.prompt_token_ids) == 70 and all(0 <= t < 1024 for t in req.prompt_token_ids + out)
    assert t_before <= req.first_token_s <= req.finish_s
    assert req.instances == [0] and req.preemptions_s == []
    assert a.llumlet.load().num_free_blocks == NUM_BLOCKS - 1


def test_load_follows_vllm_state(engines):
    a, _ = engines
    total = NUM_BLOCKS - 1
    idle = a.llumlet.load()
    assert (idle.num_running, idle.num_waiting, idle.num_free_blocks, idle.num_total_blocks) == (0, 0, total, total)
    assert idle.freeness == math.inf  # an empty instance is infinitely free (the artifact's load)

    reqs = [Request(10 + i, float(i), 300, 8) for i in range(3)]  # 10 blocks each once prefilled
    freeness = [idle.freeness]
    for r in reqs:
        a.add_request(r)
        queued = a.llumlet.load()  # the waiting request's demand counts before it is admitted
        assert queued.num_waiting == 1 and queued.freeness < freeness[-1]
        a.step()
        load = a.llumlet.load()
        assert load.num_waiting == 0 and load.num_running >= 1
        assert 0 < total - load.num_free_blocks <= 10 * load.num_running + load.num_running
        freeness.append(load.freeness)
    assert freeness == sorted(freeness, reverse=True) and freeness[-1] < freeness[0] / 2
    assert a.llumlet.pick_migration_candidate() is reqs[-1]  # LCFS over vLLM's running list

    high = Request(20, 10.0, 40, 4, priority=HIGH)
    a.add_request(high)
    load = a.llumlet.load()
    assert load.num_high == 1 and load.dispatch_freeness < load.dispatch_freeness_high  # the reserve is on
    a.run_until_idle()
    assert all(r.finished for r in [*reqs, high])
    assert a.llumlet.load().freeness == math.inf


def test_priority_admits_high_first_and_preemptions_are_recorded(engines):
    a, _ = engines
    # 4 x 480-token prompts fill 60 of 63 blocks; then everybody grows and vLLM must preempt.
    normal = [Request(30 + i, float(i), 480, 120) for i in range(4)]
    for r in normal:
        a.add_request(r)
    a.step()  # admits what fits (chunked prefill may spread it over steps)
    late_normal = Request(40, 5.0, 300, 4)
    high = Request(41, 6.0, 300, 4, priority=HIGH)
    a.add_request(late_normal)
    a.add_request(high)
    assert a.scheduler.waiting[:2] == [high, late_normal]  # vLLM's priority queue, seen through the view
    a.run_until_idle()
    assert all(r.finished and r.num_generated == r.output_tokens for r in [*normal, late_normal, high])
    assert high.first_token_s <= late_normal.first_token_s
    assert a.num_preemptions > 0 and sum(len(r.preemptions_s) for r in normal) == a.num_preemptions


@pytest.mark.parametrize("with_kv", [False, True], ids=["recompute", "kv-copy"])
def test_migration_is_token_identical(engines, with_kv):
    a, b = engines
    reference = _run(a, Request(50, 0.0, 150, 40))

    req = Request(50, 0.0, 150, 40)
    a.add_request(req)
    for _ in range(15):
        a.step()
    assert 10 <= req.num_generated < 40 and req.status is RequestStatus.RUNNING
    generated_at_migration = req.num_generated
    loaded_before = b.connector.num_loaded_tokens

    migrate(a, b, req.request_id, with_kv=with_kv)
    assert a.llumlet.load().num_free_blocks == NUM_BLOCKS - 1  # the source freed its blocks
    assert b.scheduler.waiting == [req]
    b.run_until_idle()

    assert req.finished and req.output_token_ids == reference
    assert req.instances == [0, 1] and len(req.migrations) == 1
    # With KV, everything but the newest token comes from the payload; without, it is all recomputed.
    expected_loaded = 150 + generated_at_migration - 1 if with_kv else 0
    assert b.connector.num_loaded_tokens - loaded_before == expected_loaded


def test_kv_payload_is_what_continues_the_request(engines):
    """A corrupted payload changes the continuation: the destination really decodes from the copied KV."""
    a, b = engines
    reference = _run(a, Request(60, 0.0, 150, 30))
    req = Request(60, 0.0, 150, 30)
    a.add_request(req)
    for _ in range(10):
        a.step()
    migrated = a.migrate_out(req.request_id, with_kv=True)
    assert migrated.kv is not None and migrated.kv.num_tokens == 150 + req.num_generated - 1
    for t in migrated.kv.layers.values():
        t.zero_()
    b.migrate_in(migrated)
    b.run_until_idle()
    assert req.finished and req.num_generated == 30
    assert req.output_token_ids[:10] == reference[:10] and req.output_token_ids != reference


# -- the Ray serving cluster over vLLM instances ------------------------------------------------------------------
CLUSTER_BLOCKS = 48  # usable blocks of 32 tokens per instance actor


def test_serve_config_for_vllm(model_dir):
    spec = build_serve_config({}, {"backend": "vllm", "model": model_dir}).instance
    assert (spec.block_size, spec.vllm_migration) == (32, "recompute")
    with pytest.raises(ServeConfigError, match="block_size 16: vLLM's CPU attention needs a multiple of 32"):
        build_serve_config({}, {"backend": "vllm", "block_size": 16})
    with pytest.raises(ServeConfigError, match="neither a preset"):
        build_serve_config({}, {"backend": "vllm", "model": "/no/such/model"})
    assert build_serve_config({}, {}).instance.block_size == 16  # the other backends keep theirs


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    """Two vLLM instance actors serving ``--model tiny``: each writes the preset (seed 0) into an empty model cache on
    its own, so they and the in-process engines serve the same weights. Migration copies KV (``vllm_migration: kv``);
    the recompute path differs only in sending no KV (its token identity is tested in-process above)."""
    import ray

    from llumnix.runtime.frontend import BackgroundServer, init_ray

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "LLUMNIX_MODEL_CACHE")}
    os.environ.update(LLUMNIX_MODEL_CACHE=str(tmp_path_factory.mktemp("model-cache")))
    init_ray(None, num_cpus=2, log_to_driver=False)  # the actors inherit the environment
    config = build_serve_config({}, {
        "backend": "vllm", "model": "tiny", "instances": 2, "port": 0, "num_cpus_per_instance": 0.5,
        "num_blocks": CLUSTER_BLOCKS, "vllm_migration": "kv",
        # loads as they are at every change, plus what was dispatched since (not the artifact's per-step view, where a
        # burst between two reports all goes to one instance and an idle instance keeps showing its last step's load)
        "load_reports": "fresh",
    })  # fmt: skip
    try:
        with BackgroundServer(config, startup_timeout_s=240) as srv:
            yield srv
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _reference(engine: VllmInstance, request_id: int, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of one in-process engine, the request alone."""
    return _run(engine, Request(request_id, 0.0, len(prompt), max_tokens, prompt_token_ids=list(prompt)))


def _stream(url: str, on_chunk, **body) -> tuple[list[int], dict]:
    """Stream a completion, calling ``on_chunk(chunk, tokens so far)`` as each chunk arrives; its tokens and the final
    ``llumnix`` block."""
    tokens, final = [], {}
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as resp:
        for line in resp.iter_lines():
            if line and line != "data: [DONE]":
                chunk = json.loads(line[len("data: "):])
                tokens += chunk["choices"][0]["token_ids"]
                final = chunk.get("llumnix", final)
                on_chunk(chunk, tokens)
    return tokens, final


def _metric(text: str, name: str, instance: int) -> float:
    (value,) = metric_samples(text, name, instance=str(instance))
    return value


def test_cluster_serves_like_one_engine(cluster, engines):
    a, _ = engines
    bodies = [{"prompt": [(i * 37 + j) % 1024 for j in range(20 + 45 * i)], "max_tokens": 10 + 6 * i} for i in range(6)]

    async def send():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{cluster.url}/v1/completions", json=b) for b in bodies))

    used = set()
    for i, (body, resp) in enumerate(zip(bodies, asyncio.run(send()), strict=True)):
        assert resp.status_code == 200, resp.text
        out = resp.json()
        assert out["choices"][0]["token_ids"] == _reference(a, 100 + i, body["prompt"], body["max_tokens"])
        assert out["model"] == "vllm:tiny"
        used.update(out["llumnix"]["instances"])
    assert used == {0, 1}  # the global scheduler dispatched to both vLLM instances
    health = httpx.get(f"{cluster.url}/health").json()
    assert health == {"status": "ok", "instances": 2, "instances_alive": 2, "instances_dead": 0, "instances_starting": 0}


def test_migration_between_vllm_actors_is_seamless_and_loads_are_reported(cluster, engines):
    a, _ = engines
    url = cluster.url
    prompt = [(11 * j + 5) % 1024 for j in range(300)]
    reference = _reference(a, 200, prompt, 60)
    seen: dict[str, dict] = {}

    def on_chunk(chunk, tokens):
        if len(tokens) == 4:  # the request runs on one instance: its load shows it
            seen["metrics"] = httpx.get(f"{url}/metrics").text
            seen["owner"] = cluster.manager.active[chunk["id"]].owner
            seen["moved"] = httpx.post(f"{url}/admin/migrate", json={"request_id": chunk["id"]}, timeout=30,
                                       headers=cluster.admin_headers).json()

    tokens, final = _stream(url, on_chunk, prompt=prompt, max_tokens=60)
    assert tokens == reference  # token-identical across the move, no gap and no repeat in the stream

    moved, src = seen["moved"], seen["owner"]
    assert moved["started"] and moved["src"] == src, moved
    assert final["migrations"] == 1 and final["instances"] == [src, moved["dst"]], final
    (record,) = final["migration_records"]
    assert (record["src"], record["dst"]) == (src, moved["dst"]) and record["committed"] and record["downtime_s"] < 1.0

    text = seen["metrics"]  # while the 300-token prompt held ~10 of the source's blocks
    total = _metric(text, "llumnix_instance_total_blocks", src)
    assert total == CLUSTER_BLOCKS
    assert _metric(text, "llumnix_instance_running_requests", src) == 1
    assert total - 11 <= _metric(text, "llumnix_instance_free_blocks", src) <= total - 10
    assert _metric(text, "llumnix_instance_freeness", src) < _metric(text, "llumnix_instance_freeness", 1 - src)

    deadline = time.time() + 30  # the reports after the move: everything freed, KV bytes and the commit counted
    while time.time() < deadline:
        text = httpx.get(f"{url}/metrics").text
        if all(_metric(text, "llumnix_instance_free_blocks", i) == CLUSTER_BLOCKS for i in (0, 1)):
            break
        time.sleep(0.2)
    assert all(_metric(text, "llumnix_instance_freeness", i) == math.inf for i in (0, 1))  # both empty
    assert _metric(text, "llumnix_instance_migrations_committed_total", src) == 1
    assert _metric(text, "llumnix_instance_migration_bytes_total", src) > 0
    checks = asyncio.run(cluster.manager.check_instances())
    for check in checks.values():
        assert check["free_blocks"] == check["num_blocks"] and not (check["running"] or check["waiting"])
    assert checks[moved["dst"]]["kv_loaded_tokens"] >= len(prompt) + 3  # the copied KV, not a recompute, continued it


def test_a_refused_migration_leaves_the_request_running_on_its_source(cluster, engines):
    """The destination lacks the free KV for the request (the paper's PRE-ALLOC refusal): nothing moves, the request
    keeps decoding on its source and its stream is unaffected."""
    import threading

    a, _ = engines
    url, manager = cluster.url, cluster.manager
    big = [[(13 * j + k) % 1024 for j in range(900)] for k in (1, 2)]  # 29 blocks each, of 48 per instance
    reference = _reference(a, 300, big[1], 40)
    blocker = threading.Thread(target=httpx.post, args=(f"{url}/v1/completions",),
                               kwargs={"json": {"prompt": big[0], "max_tokens": 300}, "timeout": 120})
    blocker.start()
    deadline = time.time() + 30
    while not any(len(cr.tokens) >= 1 for cr in list(manager.active.values())) and time.time() < deadline:
        time.sleep(0.02)
    (held,) = [cr.owner for cr in list(manager.active.values())]
    results = []

    def on_chunk(chunk, tokens):
        if len(tokens) == 4:
            body = {"request_id": chunk["id"], "dst": held}
            results.append(httpx.post(f"{url}/admin/migrate", json=body, timeout=30, headers=cluster.admin_headers).json())

    tokens, final = _stream(url, on_chunk, prompt=big[1], max_tokens=40)
    blocker.join(timeout=120)
    assert results and results[0]["started"] and results[0]["src"] != held, results
    assert tokens == reference
    assert final["migrations"] == 0 and final["instances"] == [results[0]["src"]], final
    (record,) = final["migration_records"]
    assert (record["src"], record["dst"]) == (results[0]["src"], held) and not record["committed"]  # aborted


# -- the real model (smollm2-135m) on vLLM ---------------------------------------------------------------------------
REAL_MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def real_cluster(cluster):
    """One vLLM instance actor serving the real model, in ``cluster``'s Ray session (so with its empty model cache:
    the frontend dequantises the GGUF, the actor writes the Hugging Face directory vLLM loads)."""
    from llumnix.engine import gguf_model
    from llumnix.runtime.frontend import BackgroundServer

    try:
        gguf_model.gguf_path(REAL_MODEL)
    except gguf_model.ModelNotInstalledError as e:
        pytest.skip(f"{e} (make test installs it)")
    config = build_serve_config({}, {
        "backend": "vllm", "model": REAL_MODEL, "instances": 1, "port": 0, "num_cpus_per_instance": 0.5,
        "num_blocks": 32,
    })  # fmt: skip
    with BackgroundServer(config, startup_timeout_s=300) as srv:
        yield srv


def test_real_model_on_vllm_gives_the_torch_engines_greedy_text(real_cluster):
    """vLLM serving the same dequantised weights (fp32) answers chat and completion requests with exactly the torch
    engine's greedy tokens, stops at the model's end-of-sequence token and at stop strings. (In bf16 the two engines'
    kernels round differently and texts part after 15-50 tokens on some prompts: docs/vllm.md.)"""
    import torch

    from llumnix.engine.executor import TorchExecutor
    from llumnix.engine.tokenizer import TextTokenizer
    from llumnix.runtime.instance import EngineInstance

    tokenizer = TextTokenizer.for_model(REAL_MODEL)
    ours = EngineInstance(0, TorchExecutor(REAL_MODEL, num_blocks=64), watermark=0.0)
    conversations = [[{"role": "user", "content": q}]
                     for q in ("What is the capital of France?", "Give me three tips for writing clear code.")]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2-core VM is busy with the cluster's actors
    try:
        reference = []
        for i, messages in enumerate(conversations):
            prompt = tokenizer.encode(tokenizer.apply_chat_template(messages))
            req = Request(i, 0.0, len(prompt), 96, prompt_token_ids=prompt, stop_token_ids=tokenizer.stop_token_ids)
            ours.add_request(req)
            ours.run_until_idle()
            reference.append(req.output_token_ids)
    finally:
        torch.set_num_threads(threads)
    for messages, tokens in zip(conversations, reference, strict=True):
        resp = httpx.post(f"{real_cluster.url}/v1/chat/completions", json={"messages": messages, "max_tokens": 96},
                          timeout=300)  # fmt: skip
        assert resp.status_code == 200, resp.text
        choice = resp.json()["choices"][0]
        assert choice["token_ids"] == tokens and choice["finish_reason"] == "stop"
        assert choice["message"]["content"] == tokenizer.decode(tokens)
    assert resp.json()["model"] == f"vllm:{REAL_MODEL}"
    body = {"prompt": "The capital of France is", "max_tokens": 16, "stop": ["."]}
    out = httpx.post(f"{real_cluster.url}/v1/completions", json=body, timeout=300).json()
    assert out["choices"][0]["text"] == " Paris" and out["choices"][0]["finish_reason"] == "stop"
