"""One real instance: the same LocalScheduler / Llumlet as the simulator around an executor, stepped in real time.

``EngineInstance`` is single-threaded and synchronous: a caller (a Ray actor's loop, a benchmark, a test) calls
``step()``; migration stages are applied between steps through ``at_boundary`` actions, as in the simulator.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from llumnix.core.block_manager import BlockManager
from llumnix.core.llumlet import Llumlet, LlumletConfig
from llumnix.core.local_scheduler import LocalScheduler, SchedulerConfig, StepKind, StepPlan
from llumnix.core.migration import Migration, MigrationConfig, Stage
from llumnix.core.request import Request
from llumnix.engine.executor import Executor


@dataclass
class StepRecord:
    kind: StepKind
    batch_size: int
    start_s: float
    duration_s: float
    migrating: bool


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
        self.steps: list[StepRecord] = []
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
        self.steps.append(StepRecord(plan.kind, len(plan.requests), now, end - now, bool(self.llumlet.migrating)))
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


# Starts one stage's KV copy from src to dst; the returned poll is True once the copy has landed.
StageTransfer = Callable[["EngineInstance", "EngineInstance", Stage], Callable[[], bool]]


def copy_stage(src: EngineInstance, dst: EngineInstance, stage: Stage) -> int:
    """Move one stage's KV blocks between two executors in this process; return the blocks copied."""
    if stage.src_blocks:
        dst.executor.write_blocks(stage.dst_blocks, src.executor.read_blocks(stage.src_blocks))
    return len(stage.src_blocks)


def migrate_in_process(
    mig_id: int,
    req: Request,
    src: EngineInstance,
    dst: EngineInstance,
    config: MigrationConfig | None = None,
    steps_per_stage: int = 1,
    on_stage: Callable[[Stage, float], None] | None = None,
    transfer: StageTransfer | None = None,
) -> Migration:
    """Live-migrate ``req`` from ``src`` to ``dst`` (same process). Between stage copies the source keeps stepping
    (``steps_per_stage`` steps), so new blocks appear and are copied by the next stage, as on a real cluster where the
    copy runs alongside decoding. The downtime is the stop-and-copy stage, measured on the wall clock.

    ``transfer`` starts a stage's copy and returns a poll that says when it has landed; with an asynchronous one (a
    side CUDA stream) the source keeps stepping until the copy is done, at least ``steps_per_stage`` steps. The
    default copies synchronously (``copy_stage``)."""
    mig = Migration(mig_id, req, src.llumlet, dst.llumlet, config or MigrationConfig())
    start_copy = transfer or _sync_transfer
    stage = mig.start(src.clock())
    while stage is not None:
        t0 = src.clock()
        copied = start_copy(src, dst, stage)
        if not stage.final:
            steps = 0
            while steps < steps_per_stage or not copied():
                src.step()
                steps += 1
        _sync(src, dst)
        if on_stage is not None:
            on_stage(stage, src.clock() - t0)
        stage = mig.end_stage(src.clock())
    return mig


def _sync_transfer(src: EngineInstance, dst: EngineInstance, stage: Stage) -> Callable[[], bool]:
    copy_stage(src, dst, stage)
    return lambda: True


def _sync(*instances: EngineInstance) -> None:
    for inst in instances:
        sync = getattr(inst.executor, "synchronize", None)
        if sync is not None:
            sync()


__all__ = ["EngineInstance", "StageTransfer", "StepPlan", "copy_stage", "migrate_in_process"]
