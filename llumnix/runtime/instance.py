"""One real instance: the same LocalScheduler / Llumlet as the simulator around an executor, stepped in real time.

``EngineInstance`` is single-threaded and synchronous: a caller (a Ray actor's loop, a benchmark, a test) calls
``step()``; migration stages are applied between steps through ``at_boundary`` actions, as in the simulator.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from llumnix.core.block_manager import BlockManager
from llumnix.core.llumlet import Llumlet, LlumletConfig
from llumnix.core.local_scheduler import LocalScheduler, SchedulerConfig, StepPlan
from llumnix.core.migration import Migration, MigrationConfig, answer_locally
from llumnix.core.migration_protocol import Copied, Copy
from llumnix.core.records import StepRecord
from llumnix.core.request import Request
from llumnix.engine.executor import Executor
from llumnix.engine.kv_transfer import ExecutorTransfer, KVTransfer


class EngineInstance:
    def __init__(
        self,
        instance_id: int,
        executor: Executor,
        scheduler_config: SchedulerConfig | None = None,
        llumlet_config: LlumletConfig | None = None,
        watermark: float = 0.01,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.instance_id = instance_id
        self.executor = executor
        blocks = BlockManager(executor.num_blocks, executor.block_size, watermark)
        executor.bind(blocks)
        self.llumlet = Llumlet(instance_id, LocalScheduler(blocks, scheduler_config), llumlet_config)
        self.clock = clock
        self.steps: list[StepRecord] = []  # every step run, on ``clock``
        self.on_token: Callable[[Request, int], None] | None = None  # streaming hook (token id per step)

    @property
    def scheduler(self) -> LocalScheduler:
        return self.llumlet.scheduler

    @property
    def blocks(self) -> BlockManager:
        return self.llumlet.blocks

    def add_request(self, req: Request) -> None:
        req.instances.append(self.instance_id)
        if req.dispatch_s is None:
            req.dispatch_s = self.clock()
        self.scheduler.add_request(req)

    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    def step(self) -> list[Request]:
        """Run one step if there is work; return the requests that finished."""
        now = self.clock()
        plan = self.scheduler.schedule(now)
        if plan is None or not plan.requests:
            return []
        tokens = self.executor.execute(plan)
        end = self.clock()
        self.steps.append(plan.record(self.instance_id, now, end, bool(self.llumlet.migrating)))
        finished = self.scheduler.on_step_done(plan, end, tokens)
        if self.on_token is not None:
            for req, tok in zip(plan.requests, tokens, strict=True):
                self.on_token(req, tok)
        return finished

    def run_until_idle(self, max_steps: int = 1_000_000) -> list[Request]:
        done: list[Request] = []
        for _ in range(max_steps):
            if not self.has_work():
                break
            done += self.step()
        return done


def migrate_in_process(
    mig_id: int,
    req: Request,
    src: EngineInstance,
    dst: EngineInstance,
    config: MigrationConfig | None = None,
    steps_per_stage: int = 1,
    on_stage: Callable[[Copy, float], None] | None = None,
    transfer: KVTransfer | None = None,
) -> Migration:
    """Live-migrate ``req`` from ``src`` to ``dst`` (same process), driving the source's ``Migration`` to its end.
    While a non-final stage's copy is in flight the source keeps stepping (at least ``steps_per_stage`` steps, and
    until the copy has landed), so new blocks appear and are copied by the next stage, as on a real cluster where the
    copy runs alongside decoding. The downtime is the stop-and-copy stage, measured on the source's clock.

    ``transfer`` moves the blocks (default: ``ExecutorTransfer``, synchronous; a ``PoolTransfer`` on CUDA copies on a
    side stream while the source steps). ``on_stage`` sees each stage's copy and how long it took."""
    transfer = transfer or ExecutorTransfer(src.executor, {dst.instance_id: dst.executor})
    if not dst.llumlet.reserve_in(mig_id, src.instance_id):
        raise RuntimeError(f"instance {dst.instance_id} takes no migration now (draining or at its limit)")
    mig = Migration(mig_id, req, src.llumlet, dst.instance_id, config or MigrationConfig())
    copy = answer_locally(mig, mig.start(src.clock()), dst.llumlet, src.clock())
    while copy is not None:
        t0 = src.clock()
        pending = transfer.start(copy)
        if not copy.final:
            steps = 0
            while steps < steps_per_stage or not pending.done():
                src.step()
                steps += 1
        transfer.synchronize()
        _sync(src, dst)
        if on_stage is not None:
            on_stage(copy, src.clock() - t0)
        copy = answer_locally(mig, mig.on_result(Copied(pending.num_bytes), src.clock()), dst.llumlet, src.clock())
    return mig


def _sync(*instances: EngineInstance) -> None:
    for inst in instances:
        sync = getattr(inst.executor, "synchronize", None)
        if sync is not None:
            sync()


__all__ = ["EngineInstance", "StepPlan", "migrate_in_process"]
