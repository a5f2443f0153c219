from llumnix.core.block_manager import BlockManager
from llumnix.core.local_scheduler import LocalScheduler, SchedulerConfig, StepKind
from llumnix.core.request import HIGH, Request, RequestStatus


def make(num_blocks=20, watermark=0.0, **cfg):
    return LocalScheduler(BlockManager(num_blocks, 16, watermark), SchedulerConfig(**cfg))


def run_until_done(s: LocalScheduler, limit=10_000):
    finished, t = [], 0.0
    for _ in range(limit):
        plan = s.schedule(t)
        if plan is None:
            break
        t += 1.0
        finished += s.on_step_done(plan, t)
    return finished


def test_prefill_first_then_decode_and_finish():
    s = make()
    s.add_request(Request(0, 0.0, 20, 3))
    s.add_request(Request(1, 0.1, 10, 2))
    plan = s.schedule(0.0)
    assert plan.kind is StepKind.PREFILL and [r.request_id for r in plan.requests] == [0, 1]
    assert plan.prefill_tokens == [20, 10]
    s.on_step_done(plan, 1.0)
    plan = s.schedule(1.0)
    assert plan.kind is StepKind.DECODE and len(plan.requests) == 2
    done = s.on_step_done(plan, 2.0)
    assert [r.request_id for r in done] == [1]
    assert done[0].first_token_s == 1.0 and done[0].finish_s == 2.0 and done[0].status is RequestStatus.FINISHED
    run_until_done(s)
    assert s.blocks.num_free_blocks == 20 and s.num_requests == 0


def test_prefill_bounded_by_batched_tokens_and_seqs():
    s = make(num_blocks=100, max_batched_tokens=50, max_num_seqs=2)
    for i in range(4):
        s.add_request(Request(i, i, 20, 5))
    plan = s.schedule(0)
    assert [r.request_id for r in plan.requests] == [0, 1]  # 2 seqs max (3 would fit 60 > 50 tokens anyway)
    s.on_step_done(plan, 1)
    assert s.schedule(1).kind is StepKind.DECODE  # max_num_seqs reached: no more prefills


def test_watermark_blocks_admission():
    s = make(num_blocks=100, watermark=0.1)  # 10 blocks held back from admission
    s.add_request(Request(0, 0, 16 * 89 + 1, 5))  # 90 blocks: exactly the usable pool
    s.add_request(Request(1, 1, 16, 5))
    plan = s.schedule(0)
    assert [r.request_id for r in plan.requests] == [0]  # the second would dip into the watermark


def test_preempts_most_recent_arrival_by_recompute_to_head_of_queue():
    s = make(num_blocks=4)  # 64 tokens
    a, b = Request(0, 0.0, 16, 40), Request(1, 1.0, 16, 40)
    s.add_request(a)
    s.add_request(b)
    c = Request(2, 2.0, 16, 5)
    t = 0.0
    plan = s.schedule(t)
    s.on_step_done(plan, t := t + 1)  # both prefilled, 1 block each, seq_len 17 each
    s.add_request(c)  # queued behind: only... let it be admitted
    plan = s.schedule(t)
    assert plan.kind is StepKind.PREFILL and plan.requests == [c]
    s.on_step_done(plan, t := t + 1)
    # Now 3 blocks used. Decode: a and b both need a 2nd block (seq_len 17), c none (17 > 16 also needs one).
    plan = s.schedule(t)
    assert plan.kind is StepKind.DECODE
    assert plan.preempted  # someone was preempted: the most recently arrived first
    assert plan.preempted[0] is c
    assert s.waiting[0] is c and c.status is RequestStatus.WAITING and c.preemptions_s == [t]
    assert c.num_generated == 1  # kept: it is recomputed with its output on the next prefill
    s.on_step_done(plan, t := t + 1)
    done = run_until_done(s)
    assert {r.request_id for r in done} == {0, 1, 2}
    assert c.prefill_starts_s[-1] > c.preemptions_s[0]
    s.blocks.check()
    assert s.blocks.num_free_blocks == 4


def test_recompute_prefill_includes_generated_tokens():
    s = make(num_blocks=3, preemption="block_needed")
    a, b = Request(0, 0.0, 16, 30), Request(1, 1.0, 15, 30)
    s.add_request(a)
    s.add_request(b)
    s.on_step_done(s.schedule(0), 1)
    for t in range(2, 40):
        plan = s.schedule(t)
        if plan.preempted:
            victim = plan.preempted[0]
            assert victim is b
            gen = victim.num_generated
            s.on_step_done(plan, t)
            break
        s.on_step_done(plan, t)
    run = run_until_done(s)
    assert b in run
    assert b.prefill_starts_s and len(b.prefill_ends_s) == 2
    assert gen >= 1


def test_vllm01_preempts_when_no_block_is_free_even_if_none_is_needed():
    """vLLM 0.1's decode pass preempts before a request's turn while no block is free (one free block per running
    sequence), whether or not that request needs a new block now; ``block_needed`` waits until one does."""
    for rule, expect_preempted in (("no_free_block", True), ("block_needed", False)):
        s = make(num_blocks=4, preemption=rule)
        a, b = Request(0, 0.0, 20, 12), Request(1, 1.0, 20, 12)  # 2 blocks each, at most 32 tokens
        s.add_request(a)
        s.on_step_done(s.schedule(0), 1)  # a: 2 blocks, 21 tokens
        s.add_request(b)
        s.on_step_done(s.schedule(1), 2)  # b admitted (watermark 0): 2 blocks, 21 tokens
        assert s.blocks.num_free_blocks == 0
        plan = s.schedule(2)  # neither needs a new block (22 tokens fit 2 blocks), but none is free
        assert bool(plan.preempted) is expect_preempted
        if expect_preempted:
            assert plan.preempted == [b] and s.waiting[0] is b


def test_high_priority_in_the_local_queue():
    """strict: high priority jumps the queue; artifact: it lands just before the last waiting request (the artifact's
    comparison never matches); off, or priorities disabled: FCFS."""
    cases = (
        (True, "strict", [3, 0, 1, 2]),
        (True, "artifact", [0, 1, 3, 2]),
        (True, "off", [0, 1, 2, 3]),
        (False, "strict", [0, 1, 2, 3]),
    )
    for enable, mode, expected in cases:
        s = make(num_blocks=100, enable_priorities=enable, local_priority=mode, max_num_seqs=1)
        for i in range(3):
            s.add_request(Request(i, i, 10, 2))
        s.add_request(Request(3, 3, 10, 2, priority=HIGH))
        assert [r.request_id for r in s.waiting] == expected, (enable, mode)


def test_freeze_unfreeze_release_adopt():
    s = make(num_blocks=10)
    r = Request(0, 0, 20, 10)
    s.add_request(r)
    s.on_step_done(s.schedule(0), 1)
    s.freeze(r)
    assert s.schedule(1) is None and r.status is RequestStatus.FROZEN
    s.unfreeze(r)
    assert s.schedule(1).requests == [r]


def test_a_stop_token_finishes_a_request_early():
    s = make()
    s.add_request(Request(0, 0.0, 20, 10, stop_token_ids=frozenset({7})))
    s.add_request(Request(1, 0.1, 20, 10))  # no stop tokens: token 7 means nothing to it
    done = []
    for t, tokens in enumerate(([3, 3], [5, 7], [7, 7])):
        done += s.on_step_done(s.schedule(float(t)), float(t + 1), tokens)
    assert [r.request_id for r in done] == [0] and done[0].output_token_ids == [3, 5, 7] and done[0].finish_s == 3.0
    assert s.running[0].output_token_ids == [3, 7, 7]
    run_until_done(s)
    assert s.blocks.num_free_blocks == 20


def test_abort_finishes_a_waiting_or_running_request_and_frees_it():
    s = make(num_blocks=4, enable_priorities=True)
    s.add_request(Request(0, 0.0, 40, 10))
    s.on_step_done(s.schedule(0.0), 1.0)  # 0 runs (3 blocks)
    s.add_request(Request(1, 0.5, 40, 10, priority=HIGH))  # does not fit: waits
    plan = s.schedule(1.0)
    assert plan.kind is StepKind.DECODE and [r.request_id for r in s.waiting] == [1]
    s.on_step_done(plan, 1.5)
    assert s.num_high == 1 and s.waiting_demand_blocks == 3 and s.waiting_demand_tokens == 40
    waiting = s.abort(1, 2.0)
    assert waiting.status is RequestStatus.FINISHED and waiting.finish_s == 2.0
    assert not s.waiting and s.num_high == 0 and s.waiting_demand_blocks == 0 and s.waiting_demand_tokens == 0
    running = s.abort(0, 3.0)
    assert running.status is RequestStatus.FINISHED and not s.running and s.blocks.num_free_blocks == 4
    assert s.abort(0, 4.0) is None and s.schedule(4.0) is None


def test_abort_of_a_preempted_request_keeps_the_queue_counters():
    """A preempted request waits to be recomputed: aborting it takes it out of every waiting counter (the llumlet's
    load reads them: freeness, num_preempted_waiting), and the requests left are counted exactly."""
    s = make(num_blocks=4, enable_priorities=True, local_priority="strict")
    a, b = Request(0, 0.0, 16, 40), Request(1, 1.0, 16, 40, priority=HIGH)
    c, d = Request(2, 2.0, 16, 5), Request(3, 3.0, 60, 4)
    for r in (a, b):
        s.add_request(r)
    s.on_step_done(s.schedule(0.0), 1.0)
    s.add_request(c)
    s.on_step_done(s.schedule(1.0), 2.0)
    s.add_request(d)  # 4 blocks: waits behind
    plan = s.schedule(2.0)
    assert plan.preempted == [c] and s.preempted_waiting == {2} and [r.request_id for r in s.waiting] == [2, 3]
    s.on_step_done(plan, 3.0)
    assert s.abort(2, 3.0) is c and c.finished
    assert s.preempted_waiting == set() and [r.request_id for r in s.waiting] == [3]
    assert (s.waiting_demand_tokens, s.waiting_demand_blocks, s.num_high) == (60, 4, 1)
    assert s.abort(1, 3.0) is b and s.num_high == 0  # a running high-priority one
    assert s.abort(3, 3.0) is d and (s.waiting_demand_tokens, s.waiting_demand_blocks) == (0, 0)
    assert {r.request_id for r in run_until_done(s)} == {0} and s.num_requests == 0 and s.blocks.num_free_blocks == 4
