"""Auto-scaling on the cluster's freeness: keep it within [scale_up, scale_down].

The default rule is the artifact's (osdi24ae ``vllm/core/request_scheduler.py:547-674``, ``vllm/engine/
llm_engine_manager.py:410-458``):

- no decision before ``first_check_s`` (the artifact's manager waits 100 s, then checks every 10 s);
- scale up when the cluster's freeness F_up = sum(free - watermark - queued) / sum(running + waiting), over the
  instances, is below ``scale_up``: start as many instances as it takes for F_up, counting them as empty instances,
  to reach ``scale_up`` (at most up to ``max_instances``), all at once; none while instances are still starting; a
  scale-up decided while an instance drains cancels the drain instead (and starts nothing);
- otherwise scale down when the freeness the cluster would have without its newest (highest-id) instance is above
  ``scale_down``: that instance's used blocks come out of the others' free blocks, and its requests stay counted,
  (free - watermark - queued) / (running + 1 if anything waits) (``scale_down_queued: false``: (free - watermark) /
  running, as the artifact's INFaaS++ in the Fig 15 sweep); drain the newest instance, one at a time, never below
  ``min_instances``.

``rule: mean-freeness`` keeps this project's earlier rule: the mean of the instances' own freeness, one start at a
time, the least-loaded instance drained.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from llumnix.core.llumlet import InstanceLoad

SCALING_RULES = ("artifact", "mean-freeness")


@dataclass(frozen=True)
class ScalingConfig:
    scale_up: float = field(
        default=10.0, metadata={"help": "Auto-scaling: start instances when the cluster's freeness drops below this."}
    )
    scale_down: float = field(
        default=60.0,
        metadata={"help": "Auto-scaling: drain the newest instance when the cluster's freeness without it exceeds "
                          "this."},
    )
    min_instances: int = field(default=1, metadata={"help": "Auto-scaling: fewest instances."})
    max_instances: int = field(default=16, metadata={"help": "Auto-scaling: most instances."})
    check_interval_s: float = field(default=10.0, metadata={"help": "Auto-scaling: seconds between scaling decisions."})
    startup_delay_s: float = field(
        default=5.0, metadata={"help": "Seconds a started instance takes before it serves (an engine's start)."}
    )
    first_check_s: float = field(
        default=110.0, metadata={"help": "Auto-scaling: no decision before this (artifact: 100 s, then one interval)."}
    )
    scale_down_queued: bool = field(
        default=True,
        metadata={"help": "The scale-down freeness counts queued requests (the artifact's Llumnix; its INFaaS++ in "
                          "the Fig 15 sweep does not)."},
    )
    requeue_on_drain: bool = field(
        default=False,
        metadata={"help": "A drained instance hands its queued requests back for re-dispatch (the artifact serves "
                          "them where they are)."},
    )
    rule: str = field(
        default="artifact",
        metadata={"help": "The scaling rule: the artifact's, or the mean of the instances' freeness (earlier).",
                  "choices": SCALING_RULES},
    )

    def __post_init__(self) -> None:
        if self.scale_up >= self.scale_down:
            raise ValueError(f"--scale-up ({self.scale_up}) must be below --scale-down ({self.scale_down})")
        if not 1 <= self.min_instances <= self.max_instances:
            raise ValueError(
                f"need 1 <= --min-instances ({self.min_instances}) <= --max-instances ({self.max_instances})"
            )
        if self.check_interval_s <= 0 or self.startup_delay_s < 0 or self.first_check_s < 0:
            raise ValueError("check_interval_s must be > 0, startup_delay_s and first_check_s >= 0")
        if self.rule not in SCALING_RULES:
            raise ValueError(f"scaling rule must be one of {SCALING_RULES}, got {self.rule!r}")


@dataclass(frozen=True)
class ScalingDecision:
    start: int = 0  # instances to start
    drain: int | None = None  # instance id to drain and stop
    cancel_drain: int | None = None  # a draining instance to keep after all


def _room(ld: InstanceLoad) -> tuple[float, int, int]:
    """(free - watermark - queued blocks, running, waiting) of one instance."""
    x = ld.inputs
    return ld.num_free_blocks - x.watermark_blocks - x.queued_blocks, ld.num_running, ld.num_waiting


def cluster_freeness(loads: Sequence[InstanceLoad]) -> float:
    """F_up: the cluster as one instance, the dispatch formula without priority reserve (+inf when it holds no
    request)."""
    room = requests = 0.0
    for ld in loads:
        r, running, waiting = _room(ld)
        room += r
        requests += running + waiting
    return room / requests if requests else math.inf


def freeness_without_newest(loads: Sequence[InstanceLoad], count_queued: bool = True) -> float:
    """F_down: the cluster's freeness if its newest instance were gone (its used blocks taken from the others' free
    blocks, its requests still counted), the migration formula."""
    newest = max(loads, key=lambda ld: ld.instance_id)
    free = sum(ld.num_free_blocks for ld in loads) - newest.num_total_blocks
    watermark = sum(ld.inputs.watermark_blocks for ld in loads if ld is not newest)
    running = sum(ld.num_running for ld in loads)
    waiting = sum(ld.num_waiting for ld in loads)
    if count_queued:
        room = max(0, free) - watermark - sum(ld.inputs.queued_blocks for ld in loads)
        denom = running + (1 if waiting else 0)
    else:
        room, denom = max(0, free) - watermark, running
    return room / denom if denom else math.inf


class Scaler:
    """Stateless except for its config: the runtime says how many instances are starting and what time it is."""

    def __init__(self, config: ScalingConfig) -> None:
        self.config = config

    @staticmethod
    def average_freeness(loads: Sequence[InstanceLoad]) -> float:
        live = [ld.freeness for ld in loads if not ld.draining and math.isfinite(ld.freeness)]
        return sum(live) / len(live) if live else math.inf

    def decide(self, loads: Sequence[InstanceLoad], num_starting: int, now: float = math.inf) -> ScalingDecision:
        if self.config.rule == "mean-freeness":
            return self._mean_freeness(loads, num_starting)
        cfg = self.config
        if now < cfg.first_check_s or not loads:
            return ScalingDecision()
        draining = [ld for ld in loads if ld.draining]
        f_up = cluster_freeness(loads)
        if f_up < cfg.scale_up:
            if draining:
                return ScalingDecision(cancel_drain=draining[0].instance_id)
            if num_starting:
                return ScalingDecision()
            room = sum(_room(ld)[0] for ld in loads)
            requests = sum(ld.num_running + ld.num_waiting for ld in loads)
            per_instance = max(ld.num_total_blocks for ld in loads)  # an empty instance: all its blocks free
            need = max(1, math.ceil((cfg.scale_up * requests - room) / per_instance))
            return ScalingDecision(start=max(0, min(need, cfg.max_instances - len(loads))))
        serving = [ld for ld in loads if not ld.draining]
        if draining or len(serving) <= cfg.min_instances:
            return ScalingDecision()
        if freeness_without_newest(loads, cfg.scale_down_queued) > cfg.scale_down:
            return ScalingDecision(drain=max(ld.instance_id for ld in serving))
        return ScalingDecision()

    def _mean_freeness(self, loads: Sequence[InstanceLoad], num_starting: int) -> ScalingDecision:
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
