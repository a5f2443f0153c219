"""Migration pairing: which instances send a request to which, at each pairing tick."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from llumnix.core.llumlet import InstanceLoad
from llumnix.policies.registry import Registry


@dataclass(frozen=True)
class PairingConfig:
    """Rules of the pairing beside its threshold (``SystemConfig.migration_threshold``).

    ``migration_cooldown_s`` (this project's, not the paper's: system ``llumnix-hysteresis``): an instance into which
    a migration began is no source for this many seconds of the runtime's clock (a draining one still is), so a
    request that just arrived is not sent on, or back, while the destination digests it. 0: off (the paper and the
    artifact)."""

    migration_cooldown_s: float = field(
        default=0.0,
        metadata={"help": "Seconds after a migration into an instance began during which the instance is no "
                          "migration source (0: off, the paper's)."},
    )

    def __post_init__(self) -> None:
        if self.migration_cooldown_s < 0:
            raise ValueError(f"migration_cooldown_s must be >= 0, got {self.migration_cooldown_s}")


class PairingPolicy:
    name = "base"

    def __init__(self, threshold: float, config: PairingConfig | None = None) -> None:  # SystemConfig's
        self.threshold = threshold
        self.config = config or PairingConfig()

    def pairs(self, loads: Sequence[InstanceLoad], now: float) -> list[tuple[int, int]]:
        """The (source, destination) pairs to migrate between at ``now`` (seconds of the runtime's clock)."""
        raise NotImplementedError  # abstract: every registered subclass implements it

    def migration_started(self, src: int, dst: int, now: float) -> None:
        """A migration of a pair (the runtime's source found a request to move) began at ``now``."""


PAIRING_POLICIES: Registry[PairingPolicy] = Registry("migration pairing")


@PAIRING_POLICIES.register("none")
class NoMigration(PairingPolicy):
    def pairs(self, loads: Sequence[InstanceLoad], now: float) -> list[tuple[int, int]]:
        return []


@PAIRING_POLICIES.register("freeness")
class FreenessPairing(PairingPolicy):
    """The artifact's pairing (osdi24ae ``vllm/core/request_scheduler.py:530-545``, ``llm_engine_manager.py:460-479``).

    Sources: freeness below the threshold, or a preempted request waiting to be recomputed; destinations: freeness
    above it and no preempted request waiting. Sources in rising freeness (the most loaded first; draining ones are
    -inf), destinations in falling freeness, paired in order; a pair one of whose instances is already migrating
    (as source or destination) is skipped, not re-paired.

    With ``migration_cooldown_s`` > 0 (not the artifact's): an instance into which a migration began less than that
    long ago is left out of the sources (unless draining) before the pairing in order."""

    def __init__(self, threshold: float, config: PairingConfig | None = None) -> None:
        super().__init__(threshold, config)
        self.destination_at: dict[int, float] = {}  # instance id -> when a migration into it last began

    def _cooling(self, ld: InstanceLoad, now: float) -> bool:
        last = self.destination_at.get(ld.instance_id)
        return last is not None and not ld.draining and now - last < self.config.migration_cooldown_s

    def pairs(self, loads: Sequence[InstanceLoad], now: float) -> list[tuple[int, int]]:
        ordered = sorted(loads, key=lambda ld: (ld.freeness, ld.instance_id))
        sources = [ld for ld in ordered if (ld.num_preempted_waiting > 0 or ld.freeness < self.threshold)
                   and not self._cooling(ld, now)]
        dests = [ld for ld in reversed(ordered) if ld.num_preempted_waiting == 0 and ld.freeness > self.threshold]
        return [
            (s.instance_id, d.instance_id)
            for s, d in zip(sources, dests, strict=False)
            if s.can_migrate_out and d.can_migrate_in and s.num_running > 0
        ]

    def migration_started(self, src: int, dst: int, now: float) -> None:
        if self.config.migration_cooldown_s > 0:
            self.destination_at[dst] = now


def make_pairing_policy(name: str, threshold: float, config: PairingConfig | None = None) -> PairingPolicy:
    return PAIRING_POLICIES.get(name)(threshold=threshold, config=config)
