"""Migration pairing: which instances send a request to which, at each pairing tick."""

from __future__ import annotations

from collections.abc import Sequence

from llumnix.core.llumlet import InstanceLoad
from llumnix.policies.registry import Registry


class PairingPolicy:
    name = "base"

    def __init__(self, threshold: float) -> None:  # SystemConfig.migration_threshold
        self.threshold = threshold

    def pairs(self, loads: Sequence[InstanceLoad]) -> list[tuple[int, int]]:
        raise NotImplementedError  # abstract: every registered subclass implements it


PAIRING_POLICIES: Registry[PairingPolicy] = Registry("migration pairing")


@PAIRING_POLICIES.register("none")
class NoMigration(PairingPolicy):
    def pairs(self, loads: Sequence[InstanceLoad]) -> list[tuple[int, int]]:
        return []


@PAIRING_POLICIES.register("freeness")
class FreenessPairing(PairingPolicy):
    """The artifact's pairing (osdi24ae ``vllm/core/request_scheduler.py:530-545``, ``llm_engine_manager.py:460-479``).

    Sources: freeness below the threshold, or a preempted request waiting to be recomputed; destinations: freeness
    above it and no preempted request waiting. Sources in rising freeness (the most loaded first; draining ones are
    -inf), destinations in falling freeness, paired in order; a pair one of whose instances is already migrating
    (as source or destination) is skipped, not re-paired."""

    def pairs(self, loads: Sequence[InstanceLoad]) -> list[tuple[int, int]]:
        ordered = sorted(loads, key=lambda ld: (ld.freeness, ld.instance_id))
        sources = [ld for ld in ordered if ld.num_preempted_waiting > 0 or ld.freeness < self.threshold]
        dests = [ld for ld in reversed(ordered) if ld.num_preempted_waiting == 0 and ld.freeness > self.threshold]
        return [
            (s.instance_id, d.instance_id)
            for s, d in zip(sources, dests, strict=False)
            if s.can_migrate_out and d.can_migrate_in and s.num_running > 0
        ]


def make_pairing_policy(name: str, threshold: float) -> PairingPolicy:
    return PAIRING_POLICIES.get(name)(threshold=threshold)
