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
    """Sources have freeness below the threshold (draining ones are -inf), destinations above it; the lowest source
    pairs with the highest destination, the next lowest with the next highest, and so on."""

    def pairs(self, loads: Sequence[InstanceLoad]) -> list[tuple[int, int]]:
        sources = sorted(
            (ld for ld in loads if ld.freeness < self.threshold and ld.can_migrate_out and ld.num_running > 0),
            key=lambda ld: (ld.freeness, ld.instance_id),
        )
        dests = sorted(
            (ld for ld in loads if ld.freeness > self.threshold and ld.can_migrate_in),
            key=lambda ld: (-ld.freeness, ld.instance_id),
        )
        return [(s.instance_id, d.instance_id) for s, d in zip(sources, dests, strict=False)]


def make_pairing_policy(name: str, threshold: float) -> PairingPolicy:
    return PAIRING_POLICIES.get(name)(threshold=threshold)
