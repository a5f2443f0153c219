"""Protocol unit tests: commit and every abort path, with block accounting checked after each; the llumlet's rules."""

import math

import pytest

from llumnix.core.block_manager import BlockManager
from llumnix.core.llumlet import Llumlet, LlumletConfig
from llumnix.core.local_scheduler import LocalScheduler, SchedulerConfig
from llumnix.core.migration import Migration, MigrationConfig, MigrationPhase, answer_locally
from llumnix.core.migration_protocol import Abort, Commit, Copied, Copy, Failed, PreAlloc, PreAllocated
from llumnix.core.request import HIGH, Request, RequestStatus


def instance(iid, blocks=64, priorities=False, local_priority="artifact", **llumlet):
    cfg = SchedulerConfig(enable_priorities=priorities, local_priority=local_priority)
    return Llumlet(iid, LocalScheduler(BlockManager(blocks, 16, 0.0), cfg),
                   LlumletConfig(enable_priorities=priorities, **llumlet))


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


def new_migration(src, dst, r, config=None):
    assert dst.reserve_in(0, src.instance_id)
    return Migration(0, r, src, dst.instance_id, config or MigrationConfig())


def test_multi_stage_commit_moves_request_and_frees_source():
    src, dst = instance(0), instance(1)
    r, t = running_request(src, prompt=100, output=300)
    mig = new_migration(src, dst, r, MigrationConfig(last_stage_max_blocks=1))
    assert src.migrations_out == 1 and dst.migrations_in == 1 and r.request_id in src.migrating
    action = mig.start(t)
    assert isinstance(action, PreAlloc) and action.num_blocks == (r.seq_len - 1) // 16  # complete blocks only
    copy = answer_locally(mig, action, dst, t)
    assert isinstance(copy, Copy) and copy.stage == 0 and not copy.final
    t = decode(src, t, 40)  # the request keeps decoding during stage 0: 40 tokens -> 2-3 more blocks
    copy = answer_locally(mig, mig.on_result(Copied(), t), dst, t)
    while copy is not None and not copy.final:
        t = decode(src, t, 1)
        copy = answer_locally(mig, mig.on_result(Copied(), t), dst, t)
    assert copy.final and r.status is RequestStatus.FROZEN and mig.phase is MigrationPhase.STOP_AND_COPY
    assert src.scheduler.schedule(t) is None  # frozen: not scheduled during stop-and-copy
    src_table = list(src.blocks.table(r.request_id))
    commit = mig.on_result(Copied(), t + 0.02)
    assert isinstance(commit, Commit) and commit.request is r and mig.phase is MigrationPhase.COMMITTING
    assert mig.on_result(dst.commit_in(commit.migration_id, r), t + 0.02) is None
    assert mig.phase is MigrationPhase.COMMITTED
    assert abs(mig.downtime_s - 0.02) < 1e-9
    assert r.status is RequestStatus.RUNNING and r in dst.scheduler.running and r.instances[-1] == 1
    assert src.blocks.num_used_blocks == 0 and src.scheduler.num_requests == 0
    assert dst.blocks.num_blocks_of(r.request_id) == len(src_table)
    # the stages together copied exactly the source's table, in order, once
    copied = [b for s in mig.stages for b in s.src_blocks]
    assert copied == src_table and mig.blocks == len(src_table)
    assert src.migrations_out == 0 and dst.migrations_in == 0 and src.is_idle()
    rec = r.migrations[-1]
    assert rec.committed and rec.src == 0 and rec.dst == 1 and rec.stages == len(mig.stages) and rec.abort_reason == ""
    decode(dst, t, 1000)
    assert r.finished and r.num_generated == r.output_tokens
    src.blocks.check()
    dst.blocks.check()
    assert dst.blocks.num_used_blocks == 0


def assert_aborted_and_running(src, dst, mig, r):
    assert mig.phase is MigrationPhase.ABORTED
    assert r.status is RequestStatus.RUNNING and r in src.scheduler.running
    assert dst.blocks.num_used_blocks == 0
    assert src.migrations_out == 0 and dst.migrations_in == 0 and not src.migrating
    assert not r.migrations[-1].committed and r.migrations[-1].abort_reason == mig.abort_reason
    src.blocks.check()
    dst.blocks.check()


def test_abort_when_destination_lacks_blocks():
    src, dst = instance(0), instance(1, blocks=4)
    r, t = running_request(src, prompt=200)
    mig = new_migration(src, dst, r)
    assert answer_locally(mig, mig.start(t), dst, t) is None
    assert_aborted_and_running(src, dst, mig, r)
    assert mig.abort_reason == "destination lacks free blocks"


def test_abort_when_request_finishes_during_a_stage():
    src, dst = instance(0), instance(1)
    r, t = running_request(src, prompt=100, output=6)
    mig = new_migration(src, dst, r)
    assert isinstance(answer_locally(mig, mig.start(t), dst, t), Copy)
    decode(src, t, 10)  # finishes on the source meanwhile
    assert r.finished
    action = mig.on_result(Copied(), t + 10)
    assert isinstance(action, Abort) and mig.phase is MigrationPhase.ABORTED
    assert dst.blocks.num_used_blocks > 0  # the destination still holds stage 0's blocks until it hears the abort
    assert answer_locally(mig, action, dst, t + 10) is None
    assert dst.blocks.num_used_blocks == 0 and src.blocks.num_used_blocks == 0 and dst.migrations_in == 0


def test_abort_when_request_preempted_during_a_stage():
    src, dst = instance(0, blocks=20), instance(1)
    r, t = running_request(src, prompt=100, output=150, rid=5)  # 7 blocks growing to 16
    other = Request(1, -1.0, 100, 150)  # arrived earlier: r is the preemption victim
    src.scheduler.add_request(other)
    mig = new_migration(src, dst, r)
    assert isinstance(answer_locally(mig, mig.start(t), dst, t), Copy)
    t = decode(src, t, 60)
    assert r.preemptions_s, "setup: the request must have been preempted"
    assert answer_locally(mig, mig.on_result(Copied(), t), dst, t) is None
    assert mig.phase is MigrationPhase.ABORTED and "preempted" in mig.abort_reason
    assert dst.blocks.num_used_blocks == 0
    src.blocks.check()


@pytest.mark.parametrize("failure", ["copy", "commit", "runtime"])
def test_abort_during_stop_and_copy_unfreezes_on_source(failure):
    """A failed final copy, a failed commit (the destination died) or the runtime's own abort: the request resumes
    on the source, where it was, and its downtime counts the frozen time."""
    src, dst = instance(0), instance(1)
    r, t = running_request(src, prompt=20, output=100)  # 2 blocks: goes straight to stop-and-copy
    mig = new_migration(src, dst, r)
    copy = answer_locally(mig, mig.start(t), dst, t)
    assert copy.final and r.status is RequestStatus.FROZEN
    if failure == "copy":
        action = mig.on_result(Failed("channel broke"), t + 0.01)
    elif failure == "commit":
        assert isinstance(mig.on_result(Copied(), t + 0.01), Commit)
        action = mig.on_result(Failed("destination died"), t + 0.01)
    else:
        action = mig.abort(t + 0.01, "source stopping")
    assert isinstance(action, Abort) and answer_locally(mig, action, dst, t + 0.01) is None
    assert_aborted_and_running(src, dst, mig, r)
    assert mig.downtime_s == pytest.approx(0.01)
    decode(src, t, 1000)
    assert r.finished


def test_results_must_answer_the_phase():
    src, dst = instance(0), instance(1)
    r, t = running_request(src)
    mig = new_migration(src, dst, r)
    mig.start(t)
    with pytest.raises(ValueError, match="does not answer phase pre_alloc"):
        mig.on_result(Copied(), t)
    with pytest.raises(RuntimeError, match="already started"):
        mig.start(t)


def test_a_pre_allocation_of_the_wrong_size_aborts():
    src, dst = instance(0), instance(1)
    r, t = running_request(src, prompt=100)
    mig = new_migration(src, dst, r)
    action = mig.start(t)
    assert isinstance(mig.on_result(PreAllocated([0]), t), Abort) and "pre-allocated 1 blocks" in mig.abort_reason
    assert action.num_blocks != 1


def test_destination_draining_refuses():
    src, dst = instance(0), instance(1)
    r, t = running_request(src)
    mig = new_migration(src, dst, r)
    dst.draining = True
    assert answer_locally(mig, mig.start(t), dst, t) is None
    assert_aborted_and_running(src, dst, mig, r)
    assert mig.abort_reason == "destination is draining"
    assert not dst.reserve_in(1, 0)  # and it takes no new migration


def test_destination_slots_and_pre_alloc_need_a_reservation():
    dst = instance(1, max_migrations=1)
    assert dst.pre_alloc(7, 1).reason == "destination holds no slot for the migration"
    assert dst.reserve_in(7, 0) and dst.reserve_in(7, 0)  # idempotent
    assert not dst.reserve_in(8, 0) and not dst.load().can_migrate_in
    assert isinstance(dst.commit_in(9, Request(0, 0.0, 1, 1)), Failed)
    assert dst.drop_incoming_from(0) == 1 and dst.migrations_in == 0 and dst.is_idle()


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
    assert not ll.can_migrate(h) and ll.can_migrate(a)
    ll.migrating.add(b.request_id)
    assert ll.pick_migration_candidate() is a and not ll.can_migrate(b)
    assert not ll.can_migrate(Request(9, 0.0, 10, 50))  # not held here



def test_fewest_blocks_candidate_keeps_lcfs_eligibility():
    """``candidate: fewest-blocks`` (llumnix-sized): of the requests LCFS may move (running, with output, not
    migrating, not high priority), the one holding the fewest KV blocks; the last-arrived of equals."""
    ll = instance(0, priorities=True, candidate="fewest-blocks")
    lcfs = instance(1, priorities=True)
    reqs = {}
    for target in (ll, lcfs):
        big, small, mid, twin, high = (Request(0, 0.0, 100, 50), Request(1, 1.0, 20, 50), Request(2, 2.0, 60, 50),
                                       Request(3, 3.0, 20, 50), Request(4, 4.0, 5, 50, priority=HIGH))
        for r in (big, small, mid, twin, high):
            target.scheduler.add_request(r)
        assert target.pick_migration_candidate() is None  # nothing has output yet
        target.scheduler.on_step_done(target.scheduler.schedule(0), 1)
        late = Request(5, 5.0, 1, 50)  # the smallest, but no output yet
        target.scheduler.add_request(late)
        reqs[target.instance_id] = (big, small, mid, twin, high, late)
    big, small, mid, twin, high, late = reqs[0]
    assert [ll.blocks.num_blocks_of(r.request_id) for r in (big, small, mid, twin, high)] == [7, 2, 4, 2, 1]
    assert ll.pick_migration_candidate() is twin  # 2 blocks, and arrived after small
    assert lcfs.pick_migration_candidate() is reqs[1][3]  # LCFS: the last-arrived normal one with output
    ll.migrating.add(twin.request_id)
    assert ll.pick_migration_candidate() is small
    ll.migrating.update({small.request_id, mid.request_id, big.request_id})
    assert ll.pick_migration_candidate() is None  # high priority never moves, late has no output


def test_freeness_virtual_usage_and_priority_reserve():
    """The artifact's two freeness measures (osdi24ae vllm/instance_info.py): migration over running + 1 if anything
    waits, dispatch over running + waiting; waiting requests count their tokens / block size; the high-priority
    reserve (total - cap) is held back from normal requests where high priority runs, and from high-priority
    requests where none does; an empty instance is infinitely free."""
    ll = instance(0, blocks=100, priorities=True)
    load = ll.load()
    assert load.freeness == load.dispatch_freeness == math.inf and load.num_running == 0 and load.is_idle
    ll.scheduler.add_request(Request(0, 0.0, 160, 10))  # 10 blocks (its first output gets a block at the next decode)
    ll.scheduler.on_step_done(ll.scheduler.schedule(0), 1)
    ll.scheduler.add_request(Request(1, 1.0, 312, 10))  # waiting: 312 / 16 = 19.5 blocks of demand
    load = ll.load()
    assert load.num_waiting == 1 and not load.is_idle
    assert load.freeness == (100 - 10 - 19.5) / 2  # (free - queued) / (running + 1 waiting)
    assert load.dispatch_freeness == (100 - 10 - 19.5) / 2  # (free - queued) / (running + waiting)
    ll.scheduler.add_request(Request(2, 2.0, 16, 10))
    assert ll.load().dispatch_freeness == (100 - 10 - 19.5 - 1) / 3 and ll.load().freeness == (100 - 10 - 20.5) / 2
    assert ll.priority_reserve_blocks() == 0 and ll.load().dispatch_freeness_high == (100 - 10 - 20.5 - 0) / 3
    ll.scheduler.add_request(Request(3, 3.0, 16, 10, priority=HIGH))
    assert ll.priority_reserve_blocks() == 100 - 100  # cap 1600 tokens = 100 blocks = everything
    ll.config = LlumletConfig(enable_priorities=True, high_priority_kv_tokens=320)
    reserve = 100 - 320 // 16
    load = ll.load()
    assert load.num_high == 1 and load.dispatch_freeness == (100 - 10 - 21.5 - reserve) / 4
    assert load.dispatch_freeness_high == (100 - 10 - 21.5) / 4  # it holds high priority: no reserve for them
    ll.draining = True
    assert ll.load().freeness == ll.load().dispatch_freeness == float("-inf")


def test_preempted_waiting_requests_are_counted():
    ll = instance(0, blocks=4)
    a, b = Request(0, 0.0, 20, 12), Request(1, 1.0, 20, 12)
    for r in (a, b):
        ll.scheduler.add_request(r)
        ll.scheduler.on_step_done(ll.scheduler.schedule(r.arrival_s), r.arrival_s + 1)
    plan = ll.scheduler.schedule(3)  # no block free: vLLM 0.1 preempts b
    assert plan.preempted == [b] and ll.load().num_preempted_waiting == 1
    ll.scheduler.on_step_done(plan, 4)
    run = [ll.scheduler.schedule(t) for t in range(5, 6)]
    assert run and ll.load().num_preempted_waiting in (0, 1)


@pytest.mark.parametrize("queued_demand", ["all", "head"])
@pytest.mark.parametrize("priorities", [False, True])
def test_pending_dispatches_count_as_if_queued(queued_demand, priorities):
    """A load plus the requests dispatched since it was reported equals the load the instance reports once it has
    queued them: one freeness rule for the global scheduler's view and the instance's own."""
    ll = instance(0, blocks=100, priorities=priorities, queued_demand=queued_demand, high_priority_kv_tokens=320,
                  local_priority="strict")
    ll.scheduler.add_request(Request(0, 0.0, 160, 10))
    ll.scheduler.on_step_done(ll.scheduler.schedule(0), 1)
    for waiting in ([], [Request(1, 1.0, 48, 10)]):
        for r in waiting:
            ll.scheduler.add_request(r)
        before = ll.load()
        pending = [Request(10, 2.0, 70, 10), Request(11, 3.0, 33, 10, priority=HIGH)]
        expected = before.with_pending([(before.pending_usage(r.prompt_tokens), r.is_high) for r in pending])
        for r in pending:
            ll.scheduler.add_request(r)
        assert ll.load() == expected
        for r in pending:
            ll.scheduler.waiting.remove(r)
            ll.scheduler.waiting_demand_blocks -= -(-r.prompt_tokens // 16)
            ll.scheduler.waiting_demand_tokens -= r.prompt_tokens
            ll.scheduler.num_high -= r.is_high
    draining = ll.load().with_draining()
    assert draining.with_pending([(1, False)]).freeness == -math.inf and not draining.can_migrate_in
