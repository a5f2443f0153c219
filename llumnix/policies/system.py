"""The systems compared in the paper, as compositions of policies (a runtime builds one of these)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llumnix.policies.dispatch import DispatchPolicy, make_dispatch_policy
from llumnix.policies.pairing import PairingPolicy, make_pairing_policy
from llumnix.policies.scaling import Scaler, ScalingConfig

# system name -> (dispatch policy, pairing policy when migration is on)
SYSTEMS: dict[str, tuple[str, str]] = {
    "round-robin": ("round-robin", "none"),
    "infaas++": ("freeness", "none"),
    "llumnix": ("freeness", "freeness"),
}


@dataclass(frozen=True)
class SystemConfig:
    policy: str = "llumnix"
    migration: bool = True
    migration_threshold: float = 3.0
    pairing_interval_s: float = 0.1
    priorities: bool = False
    autoscale: ScalingConfig | None = None

    def __post_init__(self) -> None:
        if self.policy not in SYSTEMS:
            raise ValueError(f"--policy must be one of {', '.join(SYSTEMS)}, got {self.policy!r}")
        if self.pairing_interval_s <= 0:
            raise ValueError(f"--pairing-interval must be > 0, got {self.pairing_interval_s}")


@dataclass
class GlobalScheduler:
    """Dispatch, migration pairing and scaling decisions from the instances' latest load reports."""

    config: SystemConfig
    dispatch: DispatchPolicy = field(init=False)
    pairing: PairingPolicy = field(init=False)
    scaler: Scaler | None = field(init=False)

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
