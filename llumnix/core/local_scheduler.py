"""An instance's local scheduler with vLLM 0.1.x semantics (the Llumnix artifact's fork, osdi24ae
``vllm/core/scheduler.py`` and ``block_manager.py``).

FCFS waiting queue; a step is either one prefill batch (admitted from the head of the queue while the batch stays
under ``max_batched_tokens`` and ``max_num_seqs`` and the block manager can allocate above its watermark; the first
request that does not fit stops admission) or one decode step for every running request. Preemption is by recompute
of the most recently arrived running request: its blocks are freed and it goes back to the head of the waiting queue,
keeping the tokens it generated (they are recomputed in its next prefill). vLLM 0.1 preempts while *no block is
free* before a request's turn in the decode pass (``can_append_slot``: one free block per running sequence, whether
or not it needs one now; osdi24ae ``vllm/core/block_manager.py:169-174``, ``scheduler.py:265-295``); ``preemption:
block_needed`` preempts only when a request needs a block and none is free.

Priorities in the artifact's local scheduler barely matter: a high-priority request is queued just before the last
waiting one (its check ``waiting[idx] == 0`` never holds, osdi24ae ``scheduler.py:103-112``) and preemption ignores
priority (``:277-282``); that is ``local_priority: artifact``. ``strict`` lets high priority jump the queue and be
preempted last (this project's earlier rule); ``off`` ignores priorities here.

The scheduler never touches tensors or clocks: the runtime passes ``now`` and executes the returned ``StepPlan``.
"""

from __future__ import annotations

import bisect
import enum
from collections import deque
from dataclasses import dataclass, field

from llumnix.core.block_manager import BlockManager, blocks_for
from llumnix.core.records import StepRecord
from llumnix.core.request import Request, RequestStatus

LOCAL_PRIORITY_MODES = ("artifact", "strict", "off")
PREEMPTION_RULES = ("no_free_block", "block_needed")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = field(default=256, metadata={"help": "Most running sequences per instance."})
    max_batched_tokens: int = field(default=12_288, metadata={"help": "Most prompt tokens in one prefill step."})
    enable_priorities: bool = field(
        default=False, metadata={"help": "Requests carry priorities this scheduler honours (see local_priority)."}
    )
    local_priority: str = field(
        default="artifact",
        metadata={"help": "With priorities, how an instance's own queue treats them: the artifact's (barely), strict "
                          "(queue jumping, preempted last) or off.", "choices": LOCAL_PRIORITY_MODES},
    )
    preemption: str = field(
        default="no_free_block",
        metadata={"help": "When a decode pass preempts: while no block is free (vLLM 0.1), or only when a request "
                          "needs a block and none is free.", "choices": PREEMPTION_RULES},
    )
    chunked_prefill: bool = field(
        default=False, metadata={"help": "Reserved: vLLM 0.1.x had no chunked prefill; True is rejected."}
    )

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_batched_tokens < 1:
            raise ValueError(f"max_batched_tokens must be >= 1, got {self.max_batched_tokens}")
        if self.local_priority not in LOCAL_PRIORITY_MODES:
            raise ValueError(f"local_priority must be one of {LOCAL_PRIORITY_MODES}, got {self.local_priority!r}")
        if self.preemption not in PREEMPTION_RULES:
            raise ValueError(f"preemption must be one of {PREEMPTION_RULES}, got {self.preemption!r}")
        if self.chunked_prefill:
            raise ValueError("chunked_prefill=True is not supported: the paper's engine (vLLM 0.1.x) has none")


class StepKind(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class StepPlan:
    kind: StepKind
    requests: list[Request]
    # For a prefill: tokens computed per request (its whole sequence so far: a recompute includes its outputs).
    prefill_tokens: list[int] = field(default_factory=list)
    # For a prefill: tokens already in the KV cache (0 in vLLM 0.1.x; kept for prefix reuse).
    start_positions: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # For a decode: the KV tokens the step attends over (sum of sequence lengths); computed when None.
    context_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.context_tokens is None:
            self.context_tokens = sum(r.seq_len for r in self.requests)

    @property
    def num_tokens(self) -> int:
        return sum(self.prefill_tokens) if self.kind is StepKind.PREFILL else len(self.requests)

    def record(self, instance_id: int, start_s: float, end_s: float, migrating: bool) -> StepRecord:
        prefill = self.kind is StepKind.PREFILL
        return StepRecord(
            instance_id, start_s, end_s, self.kind.value, len(self.requests),
            sum(self.prefill_tokens) if prefill else 0, sum(n * n for n in self.prefill_tokens) if prefill else 0,
            0 if prefill else int(self.context_tokens), migrating,
        )  # fmt: skip


def _order_key(r: Request, priorities: bool) -> tuple:
    return (-r.priority if priorities else 0, r.arrival_s, r.request_id)


class LocalScheduler:
    def __init__(self, block_manager: BlockManager, config: SchedulerConfig | None = None) -> None:
        self.blocks = block_manager
        self.config = config or SchedulerConfig()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # kept sorted by arrival (strict priorities: high first): last = victim
        self.frozen: dict[int, Request] = {}
        self.waiting_demand_blocks = 0  # sum of the blocks every waiting request needs to be admitted
        self.waiting_demand_tokens = 0  # sum of the waiting requests' lengths (tokens to prefill)
        self.preempted_waiting: set[int] = set()  # waiting requests that were preempted (and not re-admitted yet)
        self.num_high = 0  # high-priority requests held (waiting, running or frozen)
        self.num_preemptions = 0
        self._strict = self.config.enable_priorities and self.config.local_priority == "strict"

    # -- queue management ----------------------------------------------------------------------------------------
    def _key(self, r: Request) -> tuple:
        return _order_key(r, self._strict)

    def _push_waiting(self, req: Request, head: bool) -> None:
        req.status = RequestStatus.WAITING
        self.waiting_demand_blocks += blocks_for(req.seq_len, self.blocks.block_size)
        self.waiting_demand_tokens += req.seq_len
        if not self._strict:
            if head:
                self.waiting.appendleft(req)
            elif req.is_high and self.config.enable_priorities and self.config.local_priority == "artifact":
                self.waiting.insert(max(0, len(self.waiting) - 1), req)  # osdi24ae scheduler.py:103-112
            else:
                self.waiting.append(req)
            return
        # With priorities, high-priority requests enter the head of the queue (behind high-priority ones already
        # there, unless preempted); a preempted normal request goes back right behind the queued high ones.
        i = 0
        if not (head and req.is_high):
            while i < len(self.waiting) and self.waiting[i].is_high:
                i += 1
        if req.is_high or head:
            self.waiting.insert(i, req)
        else:
            self.waiting.append(req)

    def _pop_waiting(self) -> Request:
        req = self.waiting.popleft()
        self._unqueued(req)
        return req

    def _unqueued(self, req: Request) -> None:
        """Account a request that left the waiting queue."""
        self.waiting_demand_blocks -= blocks_for(req.seq_len, self.blocks.block_size)
        self.waiting_demand_tokens -= req.seq_len
        self.preempted_waiting.discard(req.request_id)

    def _insert_running(self, req: Request) -> None:
        req.status = RequestStatus.RUNNING
        keys = [self._key(r) for r in self.running]
        self.running.insert(bisect.bisect(keys, self._key(req)), req)

    def add_request(self, req: Request) -> None:
        """Queue a newly dispatched request."""
        if blocks_for(req.prompt_tokens + req.output_tokens, self.blocks.block_size) > (
            self.blocks.num_blocks - self.blocks.watermark_blocks
        ):
            raise ValueError(
                f"request {req.request_id} needs {req.prompt_tokens + req.output_tokens} tokens of KV, more than "
                f"this instance holds ({self.blocks.num_blocks} blocks of {self.blocks.block_size}); shorten it"
            )
        if req.is_high:
            self.num_high += 1
        self._push_waiting(req, head=False)

    def take_waiting(self) -> list[Request]:
        """Remove and return every waiting request (an instance being drained hands them back for re-dispatch)."""
        taken = list(self.waiting)
        self.waiting.clear()
        self.waiting_demand_blocks = 0
        self.waiting_demand_tokens = 0
        self.preempted_waiting.clear()
        self.num_high -= sum(r.is_high for r in taken)
        return taken

    # -- one step ------------------------------------------------------------------------------------------------
    def schedule(self, now: float) -> StepPlan | None:
        """Decide the next step, or None when there is nothing to run."""
        plan = self._schedule_prefill(now)
        if plan is not None:
            return plan
        return self._schedule_decode(now)

    def _schedule_prefill(self, now: float) -> StepPlan | None:
        cfg = self.config
        batch: list[Request] = []
        tokens: list[int] = []
        batched = 0
        while self.waiting:
            req = self.waiting[0]
            n = req.seq_len
            if batched + n > cfg.max_batched_tokens and batch:
                break
            if len(self.running) + len(self.frozen) + len(batch) + 1 > cfg.max_num_seqs:
                break
            if not self.blocks.can_allocate(n):
                break
            self._pop_waiting()
            self.blocks.allocate(req.request_id, n)
            batch.append(req)
            tokens.append(n)
            batched += n
        if not batch:
            return None
        for req in batch:
            req.prefill_starts_s.append(now)
            self._insert_running(req)
        return StepPlan(StepKind.PREFILL, batch, prefill_tokens=tokens, start_positions=[0] * len(batch))

    def _schedule_decode(self, now: float) -> StepPlan | None:
        if not self.running:
            return None
        bm = self.blocks
        bs = bm.block_size
        # Fast path (almost every step): the requests that cross a block boundary all get a block.
        tables = bm.tables
        need = []
        context = 0
        for r in self.running:
            n = r.prompt_tokens + r.num_generated
            context += n
            if len(tables[r.request_id]) * bs < n:
                need.append(r)
        free = bm.num_free_blocks
        if len(need) < free or (len(need) == free and self.config.preemption == "block_needed"):
            for r in need:
                bm.append_slot(r.request_id, r.seq_len)
            return StepPlan(StepKind.DECODE, list(self.running), context_tokens=context)
        preempted: list[Request] = []
        queue = deque(self.running)
        kept: list[Request] = []
        any_free = self.config.preemption == "no_free_block"
        while queue:
            req = queue.popleft()
            needs_block = bm.num_blocks_of(req.request_id) * bs < req.seq_len
            while (any_free or needs_block) and not bm.can_append_slot():
                victim = queue.pop() if queue else req
                self._preempt(victim, now)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                bm.append_slot(req.request_id, req.seq_len)
                kept.append(req)
        self.running = kept
        if not kept and not preempted:
            return None
        return StepPlan(StepKind.DECODE, list(kept), preempted=preempted)

    def _preempt(self, req: Request, now: float) -> None:
        self.blocks.free(req.request_id)
        req.preemptions_s.append(now)
        self.num_preemptions += 1
        self._push_waiting(req, head=True)
        self.preempted_waiting.add(req.request_id)

    def on_step_done(self, plan: StepPlan, now: float, token_ids: list[int] | None = None) -> list[Request]:
        """Account one generated token per request of ``plan``; return the requests that finished."""
        finished: list[Request] = []
        is_prefill = plan.kind is StepKind.PREFILL
        for i, req in enumerate(plan.requests):
            if req.status is not RequestStatus.RUNNING:
                raise RuntimeError(f"request {req.request_id} left the running set during its own step")
            req.num_generated += 1
            if token_ids is not None:
                req.output_token_ids.append(token_ids[i])
            if is_prefill:
                req.prefill_ends_s.append(now)
            if req.first_token_s is None:
                req.first_token_s = now
            stopped = token_ids is not None and token_ids[i] in req.stop_token_ids
            if req.num_generated >= req.output_tokens or stopped:
                finished.append(req)
        for req in finished:
            self._finish(req, now)
        return finished

    def _finish(self, req: Request, now: float) -> None:
        self.running.remove(req)
        self.blocks.free(req.request_id)
        req.status = RequestStatus.FINISHED
        req.finish_s = now
        if req.is_high:
            self.num_high -= 1

    def abort(self, request_id: int, now: float) -> Request | None:
        """Finish a waiting or running request now (its client stopped it, e.g. on a stop string), freeing its blocks;
        None if it is not here or frozen (a frozen request is being migrated: it finishes on its destination)."""
        for i, req in enumerate(self.waiting):
            if req.request_id == request_id:
                del self.waiting[i]
                self._unqueued(req)
                if req.is_high:
                    self.num_high -= 1
                req.status, req.finish_s = RequestStatus.FINISHED, now
                return req
        req = next((r for r in self.running if r.request_id == request_id), None)
        if req is not None:
            self._finish(req, now)
        return req

    # -- migration hooks (used by the llumlet; only at step boundaries) -------------------------------------------
    def freeze(self, req: Request) -> None:
        """Stop scheduling ``req`` but keep its blocks (stop-and-copy stage of a migration)."""
        self.running.remove(req)
        req.status = RequestStatus.FROZEN
        self.frozen[req.request_id] = req

    def unfreeze(self, req: Request) -> None:
        del self.frozen[req.request_id]
        self._insert_running(req)

    def release(self, req: Request) -> None:
        """Forget a request that migrated away (it is frozen here), freeing its blocks."""
        del self.frozen[req.request_id]
        self.blocks.free(req.request_id)
        if req.is_high:
            self.num_high -= 1

    def adopt(self, req: Request, blocks_owner: object) -> None:
        """Take over a migrated-in request whose KV now lives in the blocks pre-allocated under ``blocks_owner``."""
        self.blocks.rename(blocks_owner, req.request_id)
        if req.is_high:
            self.num_high += 1
        self._insert_running(req)

    # -- introspection -------------------------------------------------------------------------------------------
    @property
    def num_requests(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.frozen)

    def head_demand_blocks(self) -> int:
        return blocks_for(self.waiting[0].seq_len, self.blocks.block_size) if self.waiting else 0
