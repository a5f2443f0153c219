"""The simulator: a virtual clock and an event heap around the same LocalScheduler / Llumlet / Migration / policy
objects that the real cluster runs. Step durations come from a profile; a migration stage lasts its bytes over the
profile's migration bandwidth plus a per-stage handshake.

Migration actions that touch the source's running set (beginning and ending stages) happen at the source's step
boundaries, as in the real engine, so a frozen request is never part of a step in flight.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from llumnix.core.block_manager import BlockManager, blocks_for
from llumnix.core.llumlet import LOAD_REPORTS, InstanceLoad, Llumlet, LlumletConfig, reported_load
from llumnix.core.local_scheduler import LocalScheduler, SchedulerConfig, StepKind, StepPlan
from llumnix.core.migration import Migration, MigrationConfig, answer_locally
from llumnix.core.migration_protocol import Action, Copied, Copy
from llumnix.core.request import Request
from llumnix.fields import dataclass_field
from llumnix.metrics.tables import InstanceSample, instance_rows
from llumnix.policies.system import GlobalScheduler, SystemConfig

log = logging.getLogger(__name__)

ARRIVAL, STEP_DONE, STAGE_DONE, PAIR_TICK, SCALE_TICK, READY, SAMPLE = range(7)


@dataclass(frozen=True)
class SimConfig:
    num_instances: int = field(default=16, metadata={"help": "Instances (the initial number with --autoscale)."})
    system: SystemConfig = field(default_factory=SystemConfig, metadata={"help": "Dispatch, migration and scaling."})
    migration: MigrationConfig = field(default_factory=MigrationConfig, metadata={"help": "Migration stages."})
    queued_demand: str = dataclass_field(LlumletConfig, "queued_demand")
    high_priority_kv_tokens: int = dataclass_field(LlumletConfig, "high_priority_kv_tokens")
    max_migrations_per_instance: int = dataclass_field(LlumletConfig, "max_migrations")
    preemption: str = dataclass_field(SchedulerConfig, "preemption")
    load_reports: str = field(
        default="per-step",
        metadata={"help": "What the global scheduler sees of an instance: its load as of its last step, reported when "
                          "that step ends (the artifact's report-driven view, osdi24ae llm_engine_manager.py), or its "
                          "load now (fresh).", "choices": LOAD_REPORTS},
    )
    sample_interval_s: float = field(default=1.0, metadata={"help": "Seconds between per-instance timeline samples."})
    seed: int = field(default=0, metadata={"help": "Seed recorded with the run (the simulation itself is deterministic)."})
    # What a real cluster adds around the engines (zero in the paper-scale runs, as the paper's simulator): a request
    # reaches the global scheduler ``dispatch_latency_s`` after its arrival (client -> HTTP frontend -> dispatch ->
    # instance queue), and the client sees each token ``delivery_latency_s`` after the step that made it (instance
    # -> frontend -> client). Measured on a real cluster by ``llumnix insitu-profile``.
    dispatch_latency_s: float = field(
        default=0.0,
        metadata={"help": "Seconds from a request's arrival to its dispatch (a real cluster's frontend and RPC)."},
    )
    delivery_latency_s: float = field(
        default=0.0,
        metadata={"help": "Seconds from a step's end to its token reaching the client (a real cluster's RPC and HTTP)."},
    )
    max_drain_s: float = field(
        default=1e6,
        metadata={"help": "Safety net against a wedged simulation (a bug): virtual seconds after the last arrival."},
    )
    record_decisions: bool = field(
        default=False, metadata={"help": "Keep every global-scheduler decision (GlobalScheduler.decisions)."}
    )

    def __post_init__(self) -> None:
        if self.num_instances < 1:
            raise ValueError(f"--instances must be >= 1, got {self.num_instances}")
        if self.sample_interval_s <= 0:
            raise ValueError(f"sample_interval_s must be > 0, got {self.sample_interval_s}")
        for name in ("dispatch_latency_s", "delivery_latency_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")


class SimInstance:
    def __init__(self, instance_id: int, llumlet: Llumlet, launch_s: float) -> None:
        self.instance_id = instance_id
        self.llumlet = llumlet
        self.launch_s = launch_s
        self.ready = False
        self.stop_s: float | None = None
        self.plan: StepPlan | None = None
        self.boundary: list[Callable[[float], None]] = []  # actions waiting for the current step to end
        self.report: InstanceLoad | None = None  # its load as the global scheduler last heard it (per-step reports)
        self.step_report: InstanceLoad | None = None  # its load when the step in flight was scheduled

    @property
    def scheduler(self) -> LocalScheduler:
        return self.llumlet.scheduler

    @property
    def busy(self) -> bool:
        return self.plan is not None


@dataclass
class SimResult:
    requests: list[Request]
    samples: list[tuple]  # rows of llumnix.metrics.INSTANCE_COLUMNS
    migrations: list[Migration]
    instance_spans: list[tuple[int, float, float]]  # (instance id, launch_s, stop_s)
    end_s: float
    config: SimConfig
    avg_instances_per_step: float = float("nan")  # the artifact's cost: mean instance count over every step

    @property
    def avg_instances(self) -> float:
        if self.end_s <= 0:
            return float(len(self.instance_spans))
        busy = sum(max(0.0, min(stop, self.end_s) - start) for _, start, stop in self.instance_spans)
        return busy / self.end_s


class Simulator:
    def __init__(self, requests: Iterable[Request], profile, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.profile = profile
        self.requests = sorted(requests, key=lambda r: (r.arrival_s, r.request_id))
        self.gs = GlobalScheduler(self.config.system, record_decisions=self.config.record_decisions)
        self.instances: dict[int, SimInstance] = {}
        self.migrations: list[Migration] = []
        self.samples: list[tuple] = []
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = itertools.count()
        self._mig_ids = itertools.count()
        self._next_instance_id = 0
        self._unfinished = len(self.requests)
        self._step_rows = 0  # every instance step, with the instances serving then: the artifact's cost
        self._step_instances = 0
        self.now = 0.0
        system = self.config.system
        self._sched_cfg = SchedulerConfig(
            max_num_seqs=profile.max_num_seqs,
            max_batched_tokens=profile.max_batched_tokens,
            enable_priorities=system.priorities,
            local_priority=system.local_priority,
            preemption=self.config.preemption,
        )
        self._llumlet_cfg = LlumletConfig(
            queued_demand=self.config.queued_demand,
            enable_priorities=system.priorities,
            high_priority_kv_tokens=self.config.high_priority_kv_tokens,
            candidate=system.candidate,
            max_migrations=self.config.max_migrations_per_instance,
        )
        self._check_fits()

    def _check_fits(self) -> None:
        usable = self.profile.total_blocks - int(self.profile.watermark * self.profile.total_blocks)
        for r in self.requests:
            if blocks_for(r.prompt_tokens + r.output_tokens, self.profile.block_size) > usable:
                raise ValueError(
                    f"trace request {r.request_id} needs {r.prompt_tokens + r.output_tokens} tokens of KV but an "
                    f"instance of profile {self.profile.name!r} holds {usable * self.profile.block_size}; "
                    "cap the lengths in the trace or use a profile with more KV blocks"
                )

    # -- event plumbing ------------------------------------------------------------------------------------------
    def _push(self, t: float, kind: int, payload: object = None) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, payload))

    def _launch(self, now: float, ready_at: float) -> SimInstance:
        iid = self._next_instance_id
        self._next_instance_id += 1
        blocks = BlockManager(self.profile.total_blocks, self.profile.block_size, self.profile.watermark)
        llumlet = Llumlet(iid, LocalScheduler(blocks, self._sched_cfg), self._llumlet_cfg)
        inst = SimInstance(iid, llumlet, now)
        self.instances[iid] = inst
        if ready_at <= now:
            self._make_ready(inst)
        else:
            self._push(ready_at, READY, inst)
        return inst

    def _make_ready(self, inst: SimInstance) -> None:
        inst.ready = True
        self.gs.dispatch.on_instance_added(inst.instance_id)

    def _live(self) -> list[SimInstance]:
        return [i for i in self.instances.values() if i.ready and i.stop_s is None]

    def _loads(self) -> list[InstanceLoad]:
        if self.config.load_reports == "fresh":
            return [i.llumlet.load() for i in self._live()]
        return [reported_load(i.llumlet, i.report) for i in self._live()]

    # -- the run -------------------------------------------------------------------------------------------------
    def run(self, progress: Callable[[int], None] | None = None) -> SimResult:
        cfg = self.config
        auto = cfg.system.autoscale
        for _ in range(cfg.num_instances):  # with auto-scaling: the initial instances
            self._launch(0.0, 0.0)
        for r in self.requests:
            self._push(r.arrival_s + cfg.dispatch_latency_s, ARRIVAL, r)
        if self.gs.migrates:
            self._push(0.0, PAIR_TICK)
        if self.gs.scaler is not None:
            self._push(auto.check_interval_s, SCALE_TICK)
        self._push(0.0, SAMPLE)
        last_arrival = self.requests[-1].arrival_s if self.requests else 0.0
        handlers = {
            ARRIVAL: self._on_arrival,
            STEP_DONE: self._on_step_done,
            STAGE_DONE: self._on_stage_done,
            PAIR_TICK: self._on_pair_tick,
            SCALE_TICK: self._on_scale_tick,
            READY: self._on_ready,
            SAMPLE: self._on_sample,
        }
        while self._heap and self._unfinished > 0:
            t, _, kind, payload = heapq.heappop(self._heap)
            self.now = t
            if t > last_arrival + cfg.max_drain_s:
                raise RuntimeError(f"simulation wedged: {self._unfinished} requests unfinished at t={t:.0f}s")
            before = self._unfinished
            handlers[kind](t, payload)
            if progress is not None and self._unfinished != before:
                progress(before - self._unfinished)
        if self._unfinished:
            raise RuntimeError(f"simulation ended with {self._unfinished} unfinished requests (no events left)")
        end = self.now
        self._sample(end)
        if cfg.delivery_latency_s:  # the client's view of the tokens (the engine-side timeline stays as it was)
            for r in self.requests:
                r.first_token_s += cfg.delivery_latency_s
                r.finish_s += cfg.delivery_latency_s
        spans = [(i.instance_id, i.launch_s, i.stop_s if i.stop_s is not None else end) for i in self.instances.values()]
        per_step = self._step_instances / self._step_rows if self._step_rows else float("nan")
        return SimResult(self.requests, self.samples, self.migrations, spans, end, cfg, per_step)

    # -- handlers ------------------------------------------------------------------------------------------------
    def _dispatch(self, req: Request, now: float) -> None:
        iid = self.gs.choose_instance(req, self._loads(), now)
        inst = self.instances[iid]
        if req.dispatch_s is None:
            req.dispatch_s = now
        req.instances.append(iid)
        inst.scheduler.add_request(req)
        self._kick(inst, now)

    def _on_arrival(self, now: float, req: Request) -> None:
        self._dispatch(req, now)

    def _kick(self, inst: SimInstance, now: float) -> None:
        """Start the instance's next step if it is idle and has work."""
        while not inst.busy and inst.stop_s is None:
            actions, inst.boundary = inst.boundary, []
            for act in actions:
                act(now)
            if inst.boundary or inst.busy:  # an action queued more work, or kicked this instance itself
                continue
            plan = inst.scheduler.schedule(now)
            if plan is None:
                self._maybe_stop(inst, now)
                return
            if not plan.requests:  # a decode step whose every request was preempted: schedule again
                continue
            inst.plan = plan
            inst.step_report = inst.llumlet.load()
            step_s = self._step_time(plan)
            if self.profile.concurrency_slowdown:  # instances sharing the cores: those stepping now, this one too
                step_s *= self.profile.concurrency_factor(sum(1 for i in self.instances.values() if i.busy))
            self._push(now + step_s, STEP_DONE, inst)

    def _step_time(self, plan: StepPlan) -> float:
        if plan.kind is StepKind.PREFILL:
            return self.profile.prefill_time_s(plan.prefill_tokens)
        return self.profile.decode_time_s(len(plan.requests), plan.context_tokens)

    def _on_step_done(self, now: float, inst: SimInstance) -> None:
        plan, inst.plan = inst.plan, None
        inst.report = inst.step_report
        self._step_rows += 1
        self._step_instances += sum(1 for i in self.instances.values() if i.ready and i.stop_s is None)
        finished = inst.scheduler.on_step_done(plan, now)
        self._unfinished -= len(finished)
        self._kick(inst, now)

    def _at_boundary(self, inst: SimInstance, now: float, action: Callable[[float], None]) -> None:
        if inst.busy:
            inst.boundary.append(action)
        else:
            action(now)
            self._kick(inst, now)

    def _on_pair_tick(self, now: float, _: object) -> None:
        for src_id, dst_id in self.gs.pairs(self._loads(), now):
            src, dst = self.instances[src_id], self.instances[dst_id]
            req = src.llumlet.pick_migration_candidate()
            if req is None:
                continue
            # Both slots are claimed now (so the next tick does not pair these instances again); the migration
            # itself starts at the source's next step boundary.
            mig = Migration(next(self._mig_ids), req, src.llumlet, dst_id, self.config.migration)
            dst.llumlet.reserve_in(mig.migration_id, src_id)
            self.gs.migration_started(src_id, dst_id, now)
            self.migrations.append(mig)
            self._at_boundary(src, now, lambda t, m=mig: self._execute(m, m.start(t), t))
        if self._unfinished > 0:
            self._push(now + self.config.system.pairing_interval_s, PAIR_TICK)

    def _execute(self, mig: Migration, action: Action | None, now: float) -> None:
        """Carry out the migration's actions until one takes time (a copy) or the migration has ended."""
        copy = answer_locally(mig, action, self.instances[mig.dst_id].llumlet, now)
        if copy is not None:
            self._push(now + self.profile.migration_stage_time_s(len(copy.src_blocks)), STAGE_DONE, (mig, copy))
            return
        # Committed or aborted: both instances may have new work (adopted request, unfrozen request, freed blocks).
        for iid in (mig.src.instance_id, mig.dst_id):
            self._kick(self.instances[iid], now)

    def _on_stage_done(self, now: float, payload: tuple[Migration, Copy]) -> None:
        mig, copy = payload
        if self.instances[mig.dst_id].stop_s is not None:
            self._execute(mig, mig.abort(now, "destination stopped"), now)
        elif copy.final:
            # COMMIT touches only the frozen request (not part of any step in flight): no need to wait for the
            # source's step boundary, which would add up to a decode step to the downtime.
            self._execute(mig, mig.on_result(Copied(), now), now)
        else:
            # The next stage may freeze the request: that happens between the source's steps.
            src = self.instances[mig.src.instance_id]
            self._at_boundary(src, now, lambda t: self._execute(mig, mig.on_result(Copied(), t), t))

    def _on_scale_tick(self, now: float, _: object) -> None:
        scaler = self.gs.scaler
        starting = sum(1 for i in self.instances.values() if not i.ready and i.stop_s is None)
        decision = self.gs.scale(self._loads(), starting, now)
        for _ in range(decision.start):
            self._launch(now, now + scaler.config.startup_delay_s)
        if decision.cancel_drain is not None:
            self.instances[decision.cancel_drain].llumlet.draining = False
        if decision.drain is not None:
            inst = self.instances[decision.drain]
            inst.llumlet.draining = True
            if scaler.config.requeue_on_drain:
                for req in inst.scheduler.take_waiting():
                    self._dispatch(req, now)
            self._maybe_stop(inst, now)
        if self._unfinished > 0:
            self._push(now + scaler.config.check_interval_s, SCALE_TICK)

    def _on_ready(self, now: float, inst: SimInstance) -> None:
        self._make_ready(inst)

    def _maybe_stop(self, inst: SimInstance, now: float) -> None:
        ll = inst.llumlet
        if ll.draining and ll.is_idle():
            inst.stop_s = now
            ll.blocks.check()

    def _on_sample(self, now: float, _: object) -> None:
        self._sample(now)
        if self._unfinished > 0:
            self._push(now + self.config.sample_interval_s, SAMPLE)

    def _sample(self, now: float) -> None:
        live = self._live()
        if live:
            self.samples.extend(instance_rows(now, [instance_sample(i.llumlet) for i in live]))


def instance_sample(llumlet: Llumlet) -> InstanceSample:
    ld, bm = llumlet.load(), llumlet.blocks
    return InstanceSample(ld.instance_id, True, ld.num_running, ld.num_waiting, ld.num_free_blocks, bm.num_blocks,
                          bm.watermark_blocks, llumlet.scheduler.head_demand_blocks(), ld.freeness, ld.draining)


def simulate(requests: Iterable[Request], profile, config: SimConfig | None = None, progress=None) -> SimResult:
    return Simulator(requests, profile, config).run(progress)
