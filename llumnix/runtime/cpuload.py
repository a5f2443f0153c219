"""Other processes' CPU around a real-cluster run: a run on a CPU whose cores another job shares measures that job,
not the cluster (one run from a fresh clone, beside another job, gave Llumnix a 25 s mean request latency where its
simulated twin said 1.2 s).

Before the cluster starts, :func:`wait_for_quiet` samples the CPU other processes take over a short window and, while
it is above the bound (:class:`QuietConfig`), waits for the machine to quieten, then proceeds either way. After the
replay, :func:`disturbance` turns the CPU seconds other processes used meanwhile (``cpu_other_s``) into cores and
marks the run *disturbed* when they took more than the bound; :func:`run_undisturbed` re-runs a disturbed run up to
``retry_disturbed`` times and keeps the last.

Everything that reads the machine is injected (``sampler``: cumulative CPU seconds of the other processes; ``clock``
and ``sleep``), so that the logic is tested on fake samples and a fake clock.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
Sampler = Callable[[], float]  # cumulative CPU seconds (any origin: only differences are used)


@dataclass(frozen=True)
class QuietConfig:
    """How much CPU other processes may take around a real run, and what a run does about more.

    The default bound, 0.05 cores, sits between what the quiet 2-core development VM showed (at most 0.02 CPU-s over
    an 84 s replay: 0.0002 cores) and the smallest load seen to spoil a comparison (7 CPU-s over a run, 0.08 cores:
    a P99 prefill off by 34%; 18 and 36 CPU-s, 0.2 and 0.4 cores: up to +133%). The cluster itself needs 1.2 of those
    2 cores, and Linux shares the cores between sessions (autogroup) whatever their nice level, so even a nice-19 job
    in another terminal competes with it on an equal footing.
    """

    max_other_cores: float = field(
        default=0.05,
        metadata={"help": "Cores other processes may take before the cluster starts (else it waits, --quiet-wait) "
                          "and during the replay (else the run is marked disturbed)."},
    )
    quiet_window_s: float = field(
        default=3.0,
        metadata={"help": "Seconds over which the CPU of other processes is sampled before the cluster starts "
                          "(0: no check)."},
    )
    quiet_wait_s: float = field(
        default=120.0,
        metadata={"help": "Seconds to wait at most for other processes to fall below --max-other-cores before the "
                          "cluster starts; it starts either way."},
    )
    retry_disturbed: int = field(
        default=0, metadata={"help": "Re-run a disturbed run up to this many times (the last run is kept)."}
    )

    def __post_init__(self) -> None:
        if min(self.max_other_cores, self.quiet_window_s, self.quiet_wait_s, self.retry_disturbed) < 0:
            raise ValueError("max_other_cores, quiet_window_s, quiet_wait_s and retry_disturbed must be >= 0")


def other_cpu_seconds() -> float:
    """CPU seconds every process of the machine but this one has used (before the cluster starts, the others)."""
    from llumnix.runtime.supervisor import machine_cpu_seconds, process_cpu_seconds

    return machine_cpu_seconds() - process_cpu_seconds()


def other_cores(
    sampler: Sampler, window_s: float, clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> float:  # fmt: skip
    """Cores the sampled processes took over the next ``window_s`` seconds (nan for an empty window)."""
    t0, c0 = clock(), sampler()
    sleep(window_s)
    t1, c1 = clock(), sampler()
    return max(0.0, c1 - c0) / (t1 - t0) if t1 > t0 else math.nan


@dataclass(frozen=True)
class QuietCheck:
    """What the check before a run saw: the other processes' cores in its last window (nan: not measured), the
    seconds it took (measuring included) and whether that last window was within the bound."""

    other_cores: float
    waited_s: float
    quiet: bool

    def columns(self) -> dict[str, Any]:
        return {"cpu_other_cores_before": self.other_cores, "quiet_wait_s": self.waited_s, "quiet_before": self.quiet}


def wait_for_quiet(
    config: QuietConfig, sampler: Sampler = other_cpu_seconds, clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> QuietCheck:  # fmt: skip
    """Sample the other processes' CPU over windows of ``quiet_window_s`` until one is within ``max_other_cores``
    or ``quiet_wait_s`` would be exceeded by another window; log why it waits, and why it gives up."""
    if config.quiet_window_s <= 0:
        return QuietCheck(math.nan, 0.0, True)
    start = clock()
    while True:
        cores = other_cores(sampler, config.quiet_window_s, clock, sleep)
        waited = clock() - start
        if not cores > config.max_other_cores:  # nan (a clock that did not move) counts as quiet
            if waited > config.quiet_window_s * 1.5:
                log.info("other processes now take %.2f cores: starting the cluster after %.0f s", cores, waited)
            return QuietCheck(cores, waited, True)
        if waited + config.quiet_window_s > config.quiet_wait_s:
            log.warning(
                "other processes still take %.2f of the %d cores (bound %.2f) after %.0f s: starting the cluster "
                "anyway; the run will be marked disturbed if they keep it up", cores, os.cpu_count() or 1,
                config.max_other_cores, waited,
            )  # fmt: skip
            return QuietCheck(cores, waited, False)
        log.warning(
            "other processes take %.2f of the %d cores (bound %.2f): waiting for the machine to quieten "
            "(%.0f of at most %.0f s)", cores, os.cpu_count() or 1, config.max_other_cores, waited,
            config.quiet_wait_s,
        )  # fmt: skip


@dataclass(frozen=True)
class Disturbance:
    """The cores other processes took during a run (``cpu_other_s`` over its wall time) against the bound."""

    other_cores: float
    bound_cores: float
    cpu_count: int

    @property
    def disturbed(self) -> bool:
        return bool(self.other_cores > self.bound_cores)  # nan: not measured, not disturbed

    def columns(self) -> dict[str, Any]:
        return {"cpu_other_cores": self.other_cores, "disturbed": self.disturbed,
                "disturbed_bound_cores": self.bound_cores}  # fmt: skip

    def message(self) -> str:
        return (
            f"disturbed run: other processes took {self.other_cores:.2f} of the {self.cpu_count} cores during the "
            f"replay (bound {self.bound_cores:g}), so its latencies measure the machine's load, not the cluster's; "
            "rerun it on a quiet machine (or with --retry-disturbed N)"
        )


def disturbance(cpu_other_s: float, wall_s: float, bound_cores: float, cpu_count: int | None = None) -> Disturbance:
    """Other processes' CPU seconds during a run of ``wall_s`` seconds, as cores, against ``bound_cores``."""
    cores = cpu_other_s / wall_s if wall_s > 0 and math.isfinite(cpu_other_s) else math.nan
    return Disturbance(cores, bound_cores, cpu_count or os.cpu_count() or 1)


def run_undisturbed(
    run_once: Callable[[], tuple[T, float, float]], config: QuietConfig, sampler: Sampler = other_cpu_seconds,
    clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
    cpu_count: int | None = None,
) -> tuple[T, dict[str, Any]]:  # fmt: skip
    """Wait for quiet (:func:`wait_for_quiet`), run ``run_once() -> (result, cpu_other_s, wall_s)``, and while the
    run was disturbed and retries are left, do both again. Returns the last result and its columns: the check before
    it, its disturbance, ``attempts`` and every attempt's ``cpu_other_cores`` (``attempts_cpu_other_cores``)."""
    history: list[float] = []
    for attempt in range(1, config.retry_disturbed + 2):
        before = wait_for_quiet(config, sampler, clock, sleep)
        result, cpu_other_s, wall_s = run_once()
        found = disturbance(cpu_other_s, wall_s, config.max_other_cores, cpu_count)
        history.append(found.other_cores)
        if not found.disturbed:
            break
        if attempt <= config.retry_disturbed:
            log.warning(
                "attempt %d was disturbed: other processes took %.2f of the %d cores (bound %g); re-running it "
                "(%d of %d retries left)", attempt, found.other_cores, found.cpu_count, found.bound_cores,
                config.retry_disturbed - attempt + 1, config.retry_disturbed,
            )  # fmt: skip
    columns = {**before.columns(), **found.columns(), "attempts": len(history), "attempts_cpu_other_cores": history}
    return result, columns


__all__ = [
    "Disturbance",
    "QuietCheck",
    "QuietConfig",
    "Sampler",
    "disturbance",
    "other_cores",
    "other_cpu_seconds",
    "run_undisturbed",
    "wait_for_quiet",
]
