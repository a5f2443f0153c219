"""The real engine under the shared scheduler: live migration is token-identical whenever it happens."""

import pytest

from llumnix.core.migration import MigrationConfig, MigrationPhase
from llumnix.core.request import Request
from llumnix.engine.device import torch_threads
from llumnix.engine.executor import TorchExecutor
from llumnix.runtime.instance import EngineInstance, migrate_in_process


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads("cpu", 1):
        yield


def instance(iid, blocks=96):
    return EngineInstance(iid, TorchExecutor("tiny", num_blocks=blocks, seed=0), watermark=0.0)


def requests():
    return [Request(i, float(i), 30 + 17 * i, 40) for i in range(3)]


@pytest.fixture(scope="module")
def reference():
    a = instance(0)
    reqs = requests()
    for r in reqs:
        a.add_request(r)
    a.run_until_idle()
    assert all(len(r.output_token_ids) == 40 for r in reqs)
    return {r.request_id: r.output_token_ids for r in reqs}


@pytest.mark.parametrize("steps_before", [1, 7, 20, 28])
@pytest.mark.parametrize("last_stage_blocks", [0, 2])
def test_migrated_request_is_token_identical(reference, steps_before, last_stage_blocks):
    src, dst = instance(0), instance(1)
    reqs = requests()
    for r in reqs:
        src.add_request(r)
    for _ in range(steps_before):
        src.step()
    mig = migrate_in_process(0, reqs[2], src, dst, MigrationConfig(last_stage_max_blocks=last_stage_blocks))
    assert mig.phase is MigrationPhase.COMMITTED
    src.run_until_idle()
    dst.run_until_idle()
    for r in reqs:
        assert r.output_token_ids == reference[r.request_id]
    assert reqs[2].instances == [0, 1]
    assert src.blocks.num_used_blocks == 0 and dst.blocks.num_used_blocks == 0


def test_aborted_migration_keeps_running_on_source(reference):
    src, dst = instance(0), instance(1, blocks=2)  # destination too small: ABORT at PRE-ALLOC
    reqs = requests()
    for r in reqs:
        src.add_request(r)
    for _ in range(5):
        src.step()
    mig = migrate_in_process(0, reqs[2], src, dst)
    assert mig.phase is MigrationPhase.ABORTED
    src.run_until_idle()
    assert [r.output_token_ids for r in reqs] == [reference[i] for i in range(3)]
    assert dst.blocks.num_used_blocks == 0 and src.blocks.num_used_blocks == 0


def test_batch_invariant_migration_into_a_busy_destination():
    """Batch-invariant decoding (invariant_batch): the migrated request's steps give the same bits in its new batch
    (here beside two other requests, on a source that keeps two) as in its old one, so its tokens are exactly its
    unmigrated tokens by construction, not by a margin."""
    def busy(iid):
        return EngineInstance(iid, TorchExecutor("tiny", num_blocks=160, seed=0, invariant_batch=4), watermark=0.0)

    ref_inst, reqs = busy(0), requests()
    for r in reqs:
        ref_inst.add_request(r)
    ref_inst.run_until_idle()
    reference = {r.request_id: r.output_token_ids for r in reqs}
    src, dst, reqs = busy(0), busy(1), requests()
    for r in reqs:
        src.add_request(r)
    others = [Request(10 + i, 0.0, 50 + 9 * i, 45) for i in range(2)]
    for r in others:
        dst.add_request(r)
    for _ in range(9):
        src.step()
        dst.step()
    mig = migrate_in_process(0, reqs[1], src, dst, MigrationConfig())
    assert mig.phase is MigrationPhase.COMMITTED
    src.run_until_idle()
    dst.run_until_idle()
    assert [r.output_token_ids for r in reqs] == [reference[r.request_id] for r in reqs]
    assert reqs[1].instances == [0, 1] and all(len(r.output_token_ids) == 45 for r in others)
    assert src.blocks.num_used_blocks == 0 and dst.blocks.num_used_blocks == 0
