"""Request arrival processes: cumulative arrival times in seconds, the first one an inter-arrival gap after 0."""

from __future__ import annotations

import math

import numpy as np

#: Arrival processes :func:`arrival_times` knows (the CLI's ``--arrival`` choices).
ARRIVAL_PROCESSES: tuple[str, ...] = ("poisson", "gamma")


def check_rate(rate: float) -> None:
    """Reject a non-positive or non-finite rate, naming the CLI flag."""
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"--rate must be > 0 (requests per second), got {rate}")


def check_cv(cv: float) -> None:
    """Reject a non-positive or non-finite CV, naming the CLI flag."""
    if not (math.isfinite(cv) and cv > 0):
        raise ValueError(f"--cv must be > 0 (coefficient of variation of inter-arrival times), got {cv}")


def poisson_arrivals(rate: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` arrival times of a Poisson process with ``rate`` requests per second.

    Gaps are ``standard_exponential / rate``, so the same generator state gives the same arrivals scaled by 1/rate:
    a rate sweep with one seed replays the same request sequence, only faster.
    """
    check_rate(rate)
    return np.cumsum(rng.standard_exponential(n) / rate)


def gamma_arrivals(rate: float, cv: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` arrival times with Gamma gaps: shape ``1/cv**2``, scale ``cv**2/rate`` (mean ``1/rate``, CV ``cv``).

    ``cv > 1`` gives bursts; ``cv == 1`` is exactly Poisson in distribution.
    """
    check_rate(rate)
    check_cv(cv)
    return np.cumsum(rng.gamma(shape=1.0 / cv**2, scale=cv**2 / rate, size=n))


def arrival_times(process: str, rate: float, n: int, rng: np.random.Generator, cv: float = 1.0) -> np.ndarray:
    """Dispatch on the process name (``poisson`` ignores ``cv``)."""
    if process == "poisson":
        return poisson_arrivals(rate, n, rng)
    if process == "gamma":
        return gamma_arrivals(rate, cv, n, rng)
    raise ValueError(f"--arrival must be one of {', '.join(ARRIVAL_PROCESSES)}, got {process!r}")
