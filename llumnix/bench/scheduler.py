"""Fig 16: does global scheduling stall the instances as the cluster grows? (``llumnix bench scheduler``)

Each instance is the real ``LocalScheduler`` + ``Llumlet`` whose steps take the profile's time (``ProfileExecutor``
arithmetic, slept with ``asyncio.sleep``); the global scheduler runs the real dispatch and pairing policies. Two
designs:

- ``llumlet`` (Llumnix): at each step boundary an instance computes its own ``InstanceLoad`` and posts it (a dict
  write: a push that nobody waits on); the global scheduler dispatches from the latest posted loads (plus the requests
  it sent since, as ``InstanceLoad.with_pending`` adds them) and pairs migrations on a 100 ms timer;
- ``centralized``: at each step boundary an instance asks the global scheduler and waits for its answer; the
  scheduler, one request at a time, consults every instance's current state (N ``load()`` calls) before answering,
  and dispatches new requests the same way (they queue with the step consults).

Measured, per run: the stall (seconds an instance spends at a step boundary on scheduling before its next step may
start) over all steps, and the dispatch latency (arrival to the request being queued on its instance) over all requests.

Method and its limits: everything runs in one process and one asyncio loop (256 Ray actors do not fit 2 cores), so
there is no RPC cost in either design: the centralized numbers are a lower bound (a real consult adds a network round
trip per instance or per fan-out), and both designs share one CPU with the instances' own bookkeeping. ``loop_lag_ms``
(how late the step sleeps wake up) shows how loaded that CPU was; compare designs at equal instance counts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from llumnix.core.block_manager import BlockManager, blocks_for
from llumnix.core.llumlet import InstanceLoad, Llumlet
from llumnix.core.local_scheduler import LocalScheduler, SchedulerConfig
from llumnix.core.request import Request
from llumnix.engine.executor import ProfileExecutor
from llumnix.fields import dataclass_field
from llumnix.policies.system import GlobalScheduler, SystemConfig
from llumnix.profiles import DEFAULT_PROFILE

DESIGNS = ("llumlet", "centralized")


@dataclass(frozen=True)
class BenchConfig:
    requests: int | None = None  # per run; None: 8 per instance
    rate_per_instance: float = 1.0  # requests/s of real (profile) time
    speed: float = 1.0
    profile: str = DEFAULT_PROFILE
    max_wall_s: float = 120.0
    seed: int = 0
    prompt_tokens: tuple[int, int] = (32, 512)
    output_tokens: tuple[int, int] = (16, 256)
    pairing_interval_s: float = dataclass_field(SystemConfig, "pairing_interval_s")

    def __post_init__(self) -> None:
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"--requests must be >= 1, got {self.requests}")
        if self.rate_per_instance <= 0 or self.speed <= 0 or self.max_wall_s <= 0:
            raise ValueError("--rate-per-instance, --speed and --max-wall must be > 0")


class BenchInstance:
    def __init__(self, instance_id: int, profile, speed: float) -> None:
        blocks = BlockManager(profile.total_blocks, profile.block_size, profile.watermark)
        sched = LocalScheduler(blocks, SchedulerConfig(profile.max_num_seqs, profile.max_batched_tokens))
        self.llumlet = Llumlet(instance_id, sched)
        self.instance_id = instance_id
        self.executor = ProfileExecutor(profile, speed)
        self.speed = speed
        self.work = asyncio.Event()
        self.stalls: list[float] = []
        self.lags: list[float] = []

    def add(self, req: Request, now: float) -> None:
        req.dispatch_s = now
        self.llumlet.scheduler.add_request(req)
        self.work.set()

    async def run(self, bench: SchedulerBench) -> None:
        sched = self.llumlet.scheduler
        while not bench.stopped:
            t0 = time.perf_counter()
            await bench.at_boundary(self)
            stall = time.perf_counter() - t0
            self.work.clear()
            plan = sched.schedule(bench.now())
            if plan is None:
                await bench.wait_or_stop(self.work)
                continue
            if not plan.requests:
                continue
            self.stalls.append(stall)
            duration = self.executor.step_time_s(plan) / self.speed
            wake = time.perf_counter() + duration
            await asyncio.sleep(duration)
            self.lags.append(time.perf_counter() - wake)
            bench.finished += len(sched.on_step_done(plan, bench.now()))


class SchedulerBench:
    def __init__(self, num_instances: int, design: str, config: BenchConfig) -> None:
        from llumnix.profiles import Profile

        if design not in DESIGNS:
            raise ValueError(f"unknown design {design!r}; choose from {', '.join(DESIGNS)}")
        self.design = design
        self.config = config
        self.profile = Profile.load(config.profile)
        self.gs = GlobalScheduler(SystemConfig(policy="llumnix", pairing_interval_s=config.pairing_interval_s))
        self.instances = [BenchInstance(i, self.profile, config.speed) for i in range(num_instances)]
        for inst in self.instances:
            self.gs.dispatch.on_instance_added(inst.instance_id)
        self.reports: dict[int, InstanceLoad] = {i.instance_id: i.llumlet.load() for i in self.instances}
        self.pending: dict[int, list[tuple[int, bool]]] = {i.instance_id: [] for i in self.instances}
        self.requests = self._workload(num_instances)
        self.dispatch_s: list[float] = []
        self.pairing_s: list[float] = []
        self.finished = 0
        self.stopped = False
        self._t0 = time.perf_counter()
        self._stop = asyncio.Event()

    def _workload(self, n: int) -> list[Request]:
        cfg = self.config
        count = cfg.requests or 8 * n
        rng = np.random.default_rng(cfg.seed)
        rate = cfg.rate_per_instance * n * cfg.speed
        arrivals = np.cumsum(rng.exponential(1.0 / rate, count))
        prompts = rng.integers(cfg.prompt_tokens[0], cfg.prompt_tokens[1] + 1, count)
        outputs = rng.integers(cfg.output_tokens[0], cfg.output_tokens[1] + 1, count)
        return [Request(i, float(arrivals[i]), int(prompts[i]), int(outputs[i])) for i in range(count)]

    def now(self) -> float:
        return time.perf_counter() - self._t0

    async def wait_or_stop(self, event: asyncio.Event) -> None:
        waiter = asyncio.ensure_future(event.wait())
        stopper = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopper.cancel()

    # -- the two designs -----------------------------------------------------------------------------------------
    async def at_boundary(self, inst: BenchInstance) -> None:
        if self.design == "llumlet":
            self.reports[inst.instance_id] = inst.llumlet.load()  # post the report; nobody waits on it
            self.pending[inst.instance_id].clear()  # the report includes every request dispatched so far
            return
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(("step", inst, fut))
        await fut

    def _loads(self) -> list[InstanceLoad]:
        if self.design == "llumlet":
            return [self.reports[i].with_pending(self.pending[i]) for i in self.reports]
        return [inst.llumlet.load() for inst in self.instances]  # consult every instance now

    def _dispatch(self, req: Request, arrived: float) -> None:
        iid = self.gs.choose_instance(req, self._loads(), self.now())
        self.instances[iid].add(req, self.now())
        if self.design == "llumlet":
            self.pending[iid].append((blocks_for(req.prompt_tokens, self.profile.block_size), req.is_high))
        self.dispatch_s.append(time.perf_counter() - arrived)

    async def _central_scheduler(self) -> None:
        while True:
            kind, payload, arg = await self._queue.get()
            if kind == "step":
                self._loads()  # the state of every instance, before this instance may go on
                arg.set_result(None)
            else:
                self._dispatch(payload, arg)
            await asyncio.sleep(0)  # one request at a time, but let the instances run in between

    async def _arrivals(self) -> None:
        for req in self.requests:
            delay = req.arrival_s - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            arrived = time.perf_counter()
            if self.design == "llumlet":
                self._dispatch(req, arrived)
            else:
                self._queue.put_nowait(("dispatch", req, arrived))

    async def _pairing(self) -> None:
        while True:
            await asyncio.sleep(self.config.pairing_interval_s)
            t0 = time.perf_counter()
            self.gs.pairs(self._loads(), self.now())  # decisions only: this benchmark measures scheduling, not copies
            self.pairing_s.append(time.perf_counter() - t0)

    async def run(self) -> dict:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._t0 = time.perf_counter()
        helpers = [asyncio.ensure_future(self._arrivals())]
        if self.design == "centralized":
            helpers.append(asyncio.ensure_future(self._central_scheduler()))
        else:
            helpers.append(asyncio.ensure_future(self._pairing()))
        loops = [asyncio.ensure_future(inst.run(self)) for inst in self.instances]
        deadline = time.perf_counter() + self.config.max_wall_s
        while self.finished < len(self.requests) and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        wall = time.perf_counter() - self._t0
        self.stopped = True
        self._stop.set()
        for task in helpers + loops:
            task.cancel()
        await asyncio.gather(*helpers, *loops, return_exceptions=True)
        return self._row(wall)

    def _row(self, wall_s: float) -> dict:
        stalls = np.array([s for i in self.instances for s in i.stalls]) * 1e3
        lags = np.array([s for i in self.instances for s in i.lags]) * 1e3
        disp = np.array(self.dispatch_s) * 1e3

        def stat(a: np.ndarray, q: float | None = None) -> float:
            if not a.size:
                return float("nan")
            return float(a.mean()) if q is None else float(np.percentile(a, q))

        return {
            "instances": len(self.instances),
            "design": self.design,
            "requests": len(self.requests),
            "finished": self.finished,
            "steps": int(stalls.size),
            "stall_ms": stat(stalls),
            "stall_p50_ms": stat(stalls, 50),
            "stall_p99_ms": stat(stalls, 99),
            "dispatch_ms": stat(disp),
            "dispatch_p99_ms": stat(disp, 99),
            "loop_lag_ms": stat(lags),
            "pairing_ms": stat(np.array(self.pairing_s) * 1e3),
            "speed": self.config.speed,
            "wall_s": wall_s,
        }


def run_one(num_instances: int, design: str, config: BenchConfig) -> dict:
    return asyncio.run(SchedulerBench(num_instances, design, config).run())


def run_benchmark(
    instance_counts: list[int], designs: list[str], config: BenchConfig, progress: Callable[[str], None] | None = None
) -> pd.DataFrame:
    if not instance_counts or any(n < 1 for n in instance_counts):
        raise ValueError(f"--instances needs positive counts, got {instance_counts}")
    for d in designs:
        if d not in DESIGNS:
            raise ValueError(f"unknown design {d!r}; choose from {', '.join(DESIGNS)}")
    rows = []
    for n in instance_counts:
        for design in designs:
            row = run_one(n, design, config)
            rows.append(row)
            if progress is not None:
                progress(
                    f"{n:4d} instances {design:11s}: stall {row['stall_ms']:.3f} ms (p99 {row['stall_p99_ms']:.3f}), "
                    f"dispatch {row['dispatch_ms']:.3f} ms, {row['finished']}/{row['requests']} finished "
                    f"in {row['wall_s']:.1f} s"
                )
    return pd.DataFrame(rows)
