"""Protocol unit tests: commit and every abort path, with block accounting checked after each."""

from llumnix.core.block_manager import BlockManager
from llumnix.core.llumlet import Llumlet, LlumletConfig
from llumnix.core.local_scheduler import LocalScheduler, SchedulerConfig
from llumnix.core.migration import Migration, MigrationConfig, MigrationPhase
from llumnix.core.request import HIGH, Request, RequestStatus


def instance(iid, blocks=64, priorities=False):
    cfg = SchedulerConfig(enable_priorities=priorities)
    return Llumlet(iid, LocalScheduler(BlockManager(blocks, 16, 0.0), cfg), LlumletConfig(enable_priorities=priorities))


def running_request(ll: Llumlet, prompt=100, output=200, rid=0, steps=3, priority=0):
    r = Request(rid, 0.0, prompt, output, priority=priority)
    ll.scheduler.add_request(r)
    t = 0.0
    for _ in range(steps):
        ll.scheduler.on_step_done(ll.scheduler.schedule(t), t + 1)
        t += 1
    return r, t


def decode(ll: Llumlet, t: float, n: int) -> float:
    for _ in range(n):
        plan = ll.scheduler.schedule(t)
        if plan is None:
            return t
        t += 1
        ll.scheduler.on_step_done(plan, t)
    return t


def test_multi_stage_commit_moves_request_and_frees_source():
    src, dst = instance(0), instance(1)
    r, t = running_request(src, prompt=100, output=300)
    mig = Migration(0, r, src, dst, MigrationConfig(last_stage_max_blocks=1))
    stage = mig.start(t)
    assert stage.index == 0 and not stage.final
    assert len(stage.src_blocks) == (r.seq_len - 1) // 16  # complete blocks only while it keeps decoding
    t = decode(src, t, 40)  # the request keeps decoding during stage 0: 40 tokens -> 2-3 more blocks
    stage = mig.end_stage(t)
    while stage is not None and not stage.final:
        t = decode(src, t, 1)
        stage = mig.end_stage(t)
    assert stage.final and r.status is RequestStatus.FROZEN
    assert src.scheduler.schedule(t) is None  # frozen: not scheduled during stop-and-copy
    src_table = list(src.blocks.table(r.request_id))
    assert mig.end_stage(t + 0.02) is None
    assert mig.phase is MigrationPhase.COMMITTED
    assert abs(mig.downtime_s - 0.02) < 1e-9
    assert r.status is RequestStatus.RUNNING and r in dst.scheduler.running
    assert src.blocks.num_used_blocks == 0 and src.scheduler.num_requests == 0
    assert dst.blocks.num_blocks_of(r.request_id) == len(src_table)
    # the stages together copied exactly the source's table, in order, once
    copied = [b for s in mig.stages for b in s.src_blocks]
    assert copied == src_table
    assert src.migrations_out == 0 and dst.migrations_in == 0
    decode(dst, t, 1000)
    assert r.finished and r.num_generated == r.output_tokens
    src.blocks.check()
    dst.blocks.check()
    assert dst.blocks.num_used_blocks == 0


def test_abort_when_destination_lacks_blocks():
    src, dst = instance(0), instance(1, blocks=4)
    r, t = running_request(src, prompt=200)
    assert mig_abort_leaves_running(src, dst, r, t) == "destination lacks free blocks"


def mig_abort_leaves_running(src, dst, r, t):
    mig = Migration(0, r, src, dst)
    assert mig.start(t) is None
    assert mig.phase is MigrationPhase.ABORTED
    assert r.status is RequestStatus.RUNNING and r in src.scheduler.running
    assert dst.blocks.num_used_blocks == 0
    assert src.migrations_out == 0 and dst.migrations_in == 0 and not src.migrating
    return mig.abort_reason


def test_abort_when_request_finishes_during_a_stage():
    src, dst = instance(0), instance(1)
    r, t = running_request(src, prompt=100, output=6)
    mig = Migration(0, r, src, dst)
    assert mig.start(t) is not None
    decode(src, t, 10)  # finishes on the source meanwhile
    assert r.finished
    assert mig.end_stage(t + 10) is None and mig.phase is MigrationPhase.ABORTED
    assert dst.blocks.num_used_blocks == 0 and src.blocks.num_used_blocks == 0


def test_abort_when_request_preempted_during_a_stage():
    src, dst = instance(0, blocks=20), instance(1)
    r, t = running_request(src, prompt=100, output=150, rid=5)  # 7 blocks growing to 16
    other = Request(1, -1.0, 100, 150)  # arrived earlier: r is the preemption victim
    src.scheduler.add_request(other)
    mig = Migration(0, r, src, dst)
    assert mig.start(t) is not None
    t = decode(src, t, 60)
    assert r.preemptions_s, "setup: the request must have been preempted"
    assert mig.end_stage(t) is None and mig.phase is MigrationPhase.ABORTED
    assert "preempted" in mig.abort_reason
    assert dst.blocks.num_used_blocks == 0
    src.blocks.check()


def test_abort_during_stop_and_copy_unfreezes_on_source():
    src, dst = instance(0), instance(1)
    r, t = running_request(src, prompt=20, output=100)  # 2 blocks: goes straight to stop-and-copy
    mig = Migration(0, r, src, dst)
    stage = mig.start(t)
    assert stage.final and r.status is RequestStatus.FROZEN
    mig.abort(t + 0.01, "destination died")
    assert r.status is RequestStatus.RUNNING and r in src.scheduler.running
    assert dst.blocks.num_used_blocks == 0
    assert mig.downtime_s > 0
    decode(src, t, 1000)
    assert r.finished


def test_destination_draining_refuses():
    src, dst = instance(0), instance(1)
    r, t = running_request(src)
    dst.draining = True
    assert mig_abort_leaves_running(src, dst, r, t) == "destination lacks free blocks"


def test_candidate_is_last_arrived_normal_with_output():
    ll = instance(0, priorities=True)
    a = Request(0, 0.0, 10, 50)
    b = Request(1, 1.0, 10, 50)
    h = Request(2, 2.0, 10, 50, priority=HIGH)
    for r in (a, b, h):
        ll.scheduler.add_request(r)
    assert ll.pick_migration_candidate() is None  # nothing has output yet
    ll.scheduler.on_step_done(ll.scheduler.schedule(0), 1)
    assert ll.pick_migration_candidate() is b  # high priority is never migrated
    ll.migrating.add(b.request_id)
    assert ll.pick_migration_candidate() is a


def test_freeness_virtual_usage_and_priority_reserve():
    ll = instance(0, blocks=100, priorities=True)
    load = ll.load()
    assert load.freeness == 100 and load.num_running == 0
    ll.scheduler.add_request(Request(0, 0.0, 160, 10))  # 10 blocks + 1 for its first output
    ll.scheduler.on_step_done(ll.scheduler.schedule(0), 1)
    ll.scheduler.add_request(Request(1, 1.0, 320, 10))  # waiting: 20 blocks of demand
    load = ll.load()
    assert load.num_waiting == 1
    assert load.freeness == (100 - 10 - 20) / 2  # (free - queued) / (running + 1 waiting)
    ll.scheduler.add_request(Request(2, 2.0, 16, 10, priority=HIGH))
    reserve = ll.priority_reserve_blocks()
    assert reserve == 100 - 100  # cap 1600 tokens = 100 blocks = everything
    ll.config = LlumletConfig(enable_priorities=True, high_priority_kv_tokens=320)
    load = ll.load()
    assert load.freeness_high - load.freeness == 80 / 2 and load.num_high == 1
    ll.draining = True
    assert ll.load().freeness == float("-inf")
