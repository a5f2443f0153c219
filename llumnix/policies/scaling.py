"""Auto-scaling on the cluster's average freeness: keep it within [scale_up, scale_down]."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from llumnix.core.llumlet import InstanceLoad


@dataclass(frozen=True)
class ScalingConfig:
    scale_up: float = field(
        default=10.0, metadata={"help": "Auto-scaling: start an instance when the average freeness drops below this."}
    )
    scale_down: float = field(
        default=60.0, metadata={"help": "Auto-scaling: drain an instance when the average freeness exceeds this."}
    )
    min_instances: int = field(default=1, metadata={"help": "Auto-scaling: fewest instances."})
    max_instances: int = field(default=16, metadata={"help": "Auto-scaling: most instances."})
    check_interval_s: float = field(default=10.0, metadata={"help": "Auto-scaling: seconds between scaling decisions."})
    startup_delay_s: float = field(
        default=5.0, metadata={"help": "Seconds a started instance takes before it serves (an engine's start)."}
    )

    def __post_init__(self) -> None:
        if self.scale_up >= self.scale_down:
            raise ValueError(f"--scale-up ({self.scale_up}) must be below --scale-down ({self.scale_down})")
        if not 1 <= self.min_instances <= self.max_instances:
            raise ValueError(
                f"need 1 <= --min-instances ({self.min_instances}) <= --max-instances ({self.max_instances})"
            )
        if self.check_interval_s <= 0 or self.startup_delay_s < 0:
            raise ValueError("check_interval_s must be > 0 and startup_delay_s >= 0")


@dataclass(frozen=True)
class ScalingDecision:
    start: int = 0  # instances to start
    drain: int | None = None  # instance id to drain and stop


class Scaler:
    """Stateless except for its config: the runtime says how many instances are starting or draining already."""

    def __init__(self, config: ScalingConfig) -> None:
        self.config = config

    @staticmethod
    def average_freeness(loads: Sequence[InstanceLoad]) -> float:
        live = [ld.freeness for ld in loads if not ld.draining and math.isfinite(ld.freeness)]
        return sum(live) / len(live) if live else math.inf

    def decide(self, loads: Sequence[InstanceLoad], num_starting: int) -> ScalingDecision:
        cfg = self.config
        live = [ld for ld in loads if not ld.draining]
        avg = self.average_freeness(loads)
        total = len(live) + num_starting
        if avg < cfg.scale_up and total < cfg.max_instances and num_starting == 0:
            return ScalingDecision(start=1)
        if avg > cfg.scale_down and len(live) > cfg.min_instances and num_starting == 0:
            if any(ld.draining for ld in loads):
                return ScalingDecision()  # one drain at a time
            victim = min(live, key=lambda ld: (ld.num_running + ld.num_waiting, -ld.instance_id))
            return ScalingDecision(drain=victim.instance_id)
        return ScalingDecision()
