"""The systems compared in the paper, as compositions of policies (a runtime builds one of these)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from llumnix.core.llumlet import InstanceLoad, LlumletConfig
from llumnix.core.local_scheduler import SchedulerConfig
from llumnix.core.request import Request
from llumnix.fields import dataclass_field
from llumnix.policies.dispatch import DispatchPolicy, make_dispatch_policy
from llumnix.policies.pairing import PairingPolicy, make_pairing_policy
from llumnix.policies.scaling import Scaler, ScalingConfig, ScalingDecision

# system name -> (dispatch policy, pairing policy when migration is on)
SYSTEMS: dict[str, tuple[str, str]] = {
    "round-robin": ("round-robin", "none"),
    "infaas++": ("freeness", "none"),
    "llumnix": ("freeness", "freeness"),
}


@dataclass(frozen=True)
class SystemConfig:
    policy: str = field(
        default="llumnix",
        metadata={"help": "Dispatch / migration system (the paper's baselines or Llumnix).", "choices": tuple(SYSTEMS)},
    )
    migration: bool = field(default=True, metadata={"help": "Migrate requests between instances (llumnix policy)."})
    migration_threshold: float = field(
        default=3.0,
        metadata={"help": "Freeness below which an instance is a migration source and above which a destination."},
    )
    pairing_interval_s: float = field(default=0.1, metadata={"help": "Seconds between migration pairing rounds."})
    priorities: bool = field(
        default=False, metadata={"help": "Honour request priorities (headroom, priority-aware dispatch, no migration)."}
    )
    local_priority: str = dataclass_field(SchedulerConfig, "local_priority")
    candidate: str = dataclass_field(LlumletConfig, "candidate")
    autoscale: ScalingConfig | None = field(default=None, metadata={"help": "Auto-scaling (None: a fixed cluster)."})

    def __post_init__(self) -> None:
        if self.policy not in SYSTEMS:
            raise ValueError(f"--policy must be one of {', '.join(SYSTEMS)}, got {self.policy!r}")
        if self.pairing_interval_s <= 0:
            raise ValueError(f"--pairing-interval must be > 0, got {self.pairing_interval_s}")


@dataclass(frozen=True)
class Decision:
    """One decision of the global scheduler, at ``time_s`` of the runtime's clock: ``dispatch`` (request to
    ``instance``), ``pair`` (``instance`` sends to ``dst``), ``start`` (one instance), ``drain`` (``instance``)."""

    time_s: float
    kind: str
    instance: int = -1
    dst: int = -1
    request_id: int = -1


@dataclass
class GlobalScheduler:
    """Dispatch, migration pairing and scaling decisions from the instances' latest load reports. Runtimes ask
    ``choose_instance``, ``pairs`` and ``scale``; with ``record_decisions`` every answer is kept in ``decisions``
    (the conformance test compares the simulator's with the real runtime's)."""

    config: SystemConfig
    record_decisions: bool = False
    dispatch: DispatchPolicy = field(init=False)
    pairing: PairingPolicy = field(init=False)
    scaler: Scaler | None = field(init=False)
    decisions: list[Decision] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        dispatch_name, pairing_name = SYSTEMS[self.config.policy]
        self.dispatch = make_dispatch_policy(dispatch_name)
        self.pairing = make_pairing_policy(
            pairing_name if self.config.migration else "none", threshold=self.config.migration_threshold
        )
        self.scaler = Scaler(self.config.autoscale) if self.config.autoscale else None

    @property
    def migrates(self) -> bool:
        return self.pairing.name != "none"

    def choose_instance(self, request: Request, loads: Sequence[InstanceLoad], now: float) -> int:
        iid = self.dispatch.choose(request, loads)
        if self.record_decisions:
            self.decisions.append(Decision(now, "dispatch", iid, request_id=request.request_id))
        return iid

    def pairs(self, loads: Sequence[InstanceLoad], now: float) -> list[tuple[int, int]]:
        pairs = self.pairing.pairs(loads)
        if self.record_decisions:
            self.decisions.extend(Decision(now, "pair", src, dst) for src, dst in pairs)
        return pairs

    def scale(self, loads: Sequence[InstanceLoad], num_starting: int, now: float) -> ScalingDecision:
        decision = self.scaler.decide(loads, num_starting, now)
        if self.record_decisions:
            self.decisions.extend(Decision(now, "start") for _ in range(decision.start))
            if decision.drain is not None:
                self.decisions.append(Decision(now, "drain", decision.drain))
            if decision.cancel_drain is not None:
                self.decisions.append(Decision(now, "cancel-drain", decision.cancel_drain))
        return decision
