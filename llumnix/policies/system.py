"""The systems compared in the paper, and this project's own beside them, as compositions of policies (a runtime
builds one of these).

A system (``SYSTEMS``) names its dispatch policy, its pairing policy when migration is on, and the options it sets
otherwise than their defaults. The paper's three (``PAPER_SYSTEMS``) set none: every option keeps the default that
follows the authors' code. This project's own improvements are separate names, each Llumnix with the options it
changes (README, "The project's own systems"); the paper's claims are computed on ``llumnix`` only. An option a
system may set is a ``SystemConfig`` field whose default is None, "the system's"; a value the user gives wins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from llumnix.core.llumlet import InstanceLoad, LlumletConfig
from llumnix.core.local_scheduler import SchedulerConfig
from llumnix.core.request import Request
from llumnix.fields import dataclass_field, default_of, setting
from llumnix.policies.dispatch import DispatchPolicy, make_dispatch_policy
from llumnix.policies.pairing import PairingConfig, PairingPolicy, make_pairing_policy
from llumnix.policies.scaling import Scaler, ScalingConfig, ScalingDecision


@dataclass(frozen=True)
class System:
    """A system: its dispatch policy, its pairing policy (when migration is on), what it is, and the options it sets
    otherwise than their defaults (``SystemConfig`` field -> value)."""

    dispatch: str
    pairing: str
    about: str
    options: Mapping[str, Any] = field(default_factory=dict)


PAPER_SYSTEMS = ("round-robin", "infaas++", "llumnix")
SYSTEMS: dict[str, System] = {
    "round-robin": System("round-robin", "none", "The paper's baseline: each request to the next instance in turn."),
    "infaas++": System("freeness", "none", "The paper's baseline: each request to the freest instance, no migration."),
    "llumnix": System("freeness", "freeness", "The paper's system as the authors built it: freeness dispatch and "
                                              "migration from instances below the threshold to those above it."),
    # This project's own: Llumnix with one rule changed each (never the paper's numbers).
    "llumnix-sized": System(
        "freeness", "freeness", "Llumnix migrating, of the requests LCFS may move, the one with the fewest KV blocks "
        "(the cheapest to copy).", {"candidate": "fewest-blocks"}),
    "llumnix-hysteresis": System(
        "freeness", "freeness", "Llumnix where an instance a migration went into is no migration source for a while "
        "(migration_cooldown_s: against requests migrating on and back).", {"migration_cooldown_s": 10.0}),
}


def _per_system(owner: type, name: str) -> Any:
    """A ``SystemConfig`` field for ``owner.name``, a setting a system may choose: None (the default) takes the
    system's value, which is the owner's default unless the system sets another."""
    s = setting(owner, name)
    chosen = "".join(f"; {n}: {system.options[name]}" for n, system in SYSTEMS.items() if name in system.options)
    metadata = {"help": f"{s.help} Default: the --policy's ({s.default}{chosen}).", "owner": owner}
    return field(default=None, metadata=metadata | ({"choices": s.choices} if s.choices is not None else {}))


@dataclass(frozen=True)
class SystemConfig:
    policy: str = field(
        default="llumnix",
        metadata={"help": "Dispatch / migration system: the paper's round-robin, infaas++ and llumnix (as the authors "
                          "built them), or this project's variants of llumnix (llumnix-sized, llumnix-hysteresis).",
                  "choices": tuple(SYSTEMS)},
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
    candidate: str | None = _per_system(LlumletConfig, "candidate")
    migration_cooldown_s: float | None = _per_system(PairingConfig, "migration_cooldown_s")
    autoscale: ScalingConfig | None = field(default=None, metadata={"help": "Auto-scaling (None: a fixed cluster)."})

    def __post_init__(self) -> None:
        if self.policy not in SYSTEMS:
            raise ValueError(f"--policy must be one of {', '.join(SYSTEMS)}, got {self.policy!r}")
        if self.pairing_interval_s <= 0:
            raise ValueError(f"--pairing-interval must be > 0, got {self.pairing_interval_s}")
        options = SYSTEMS[self.policy].options
        for f in fields(self):  # the system's choice where the user gave none
            owner = f.metadata.get("owner")
            if owner is not None and getattr(self, f.name) is None:
                object.__setattr__(self, f.name, options.get(f.name, default_of(owner, f.name)))

    @property
    def migrates(self) -> bool:
        """Migration is on and the system migrates."""
        return self.migration and SYSTEMS[self.policy].pairing != "none"

    @property
    def pairing_config(self) -> PairingConfig:
        return PairingConfig(migration_cooldown_s=self.migration_cooldown_s)


PER_SYSTEM_OPTIONS = tuple(f.name for f in fields(SystemConfig) if "owner" in f.metadata)
for _name, _system in SYSTEMS.items():
    if not set(_system.options) <= set(PER_SYSTEM_OPTIONS):
        raise TypeError(f"system {_name} sets {set(_system.options) - set(PER_SYSTEM_OPTIONS)}, which are not "
                        f"per-system options ({', '.join(PER_SYSTEM_OPTIONS)})")


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
    ``choose_instance``, ``pairs`` and ``scale``, and tell ``migration_started`` of each pair that began migrating;
    with ``record_decisions`` every answer is kept in ``decisions`` (the conformance test compares the simulator's
    with the real runtime's)."""

    config: SystemConfig
    record_decisions: bool = False
    dispatch: DispatchPolicy = field(init=False)
    pairing: PairingPolicy = field(init=False)
    scaler: Scaler | None = field(init=False)
    decisions: list[Decision] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        system = SYSTEMS[self.config.policy]
        self.dispatch = make_dispatch_policy(system.dispatch)
        self.pairing = make_pairing_policy(system.pairing if self.config.migration else "none",
                                           threshold=self.config.migration_threshold,
                                           config=self.config.pairing_config)
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
        pairs = self.pairing.pairs(loads, now)
        if self.record_decisions:
            self.decisions.extend(Decision(now, "pair", src, dst) for src, dst in pairs)
        return pairs

    def migration_started(self, src: int, dst: int, paired_s: float) -> None:
        """The runtime began a migration of the pair it was given at ``paired_s`` (its source found a request)."""
        self.pairing.migration_started(src, dst, paired_s)

    def scale(self, loads: Sequence[InstanceLoad], num_starting: int, now: float) -> ScalingDecision:
        decision = self.scaler.decide(loads, num_starting, now)
        if self.record_decisions:
            self.decisions.extend(Decision(now, "start") for _ in range(decision.start))
            if decision.drain is not None:
                self.decisions.append(Decision(now, "drain", decision.drain))
            if decision.cancel_drain is not None:
                self.decisions.append(Decision(now, "cancel-drain", decision.cancel_drain))
        return decision
