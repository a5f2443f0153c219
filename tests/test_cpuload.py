"""Other processes' CPU around a real-cluster run (llumnix.runtime.cpuload): the check before a run, its wait for a
quiet machine, the disturbed mark and the re-runs, on a fake machine (fake CPU samples, a fake clock and sleep): no
test here depends on the real machine's load."""

from __future__ import annotations

import logging
import math

import pytest

from llumnix.fields import settings
from llumnix.runtime.cpuload import (
    QuietConfig,
    disturbance,
    other_cores,
    run_undisturbed,
    wait_for_quiet,
)


class FakeMachine:
    """Other processes that take ``load(t)`` cores at time t (piecewise constant, integrated per 0.1 s step)."""

    def __init__(self, load):
        self.now = 1000.0
        self.cpu = 0.0
        self.load = load
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sampler(self) -> float:
        return self.cpu

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        steps = round(s / 0.1)
        for _ in range(steps):
            self.cpu += self.load(self.now - 1000.0) * 0.1
            self.now += 0.1

    def run(self, seconds: float, cpu_other_s: float):
        """A run of ``seconds`` during which other processes used ``cpu_other_s``."""

        def once():
            self.now += seconds
            return f"run at {self.now:.0f}", cpu_other_s, seconds

        return once


def test_other_cores_is_cpu_seconds_over_the_window():
    m = FakeMachine(lambda t: 0.4)
    assert other_cores(m.sampler, 3.0, m.clock, m.sleep) == pytest.approx(0.4)
    assert m.sleeps == [3.0]
    assert math.isnan(other_cores(m.sampler, 0.0, m.clock, m.sleep))  # no time passed: unknown


def test_a_quiet_machine_starts_after_one_window(caplog):
    m = FakeMachine(lambda t: 0.01)
    with caplog.at_level(logging.INFO, logger="llumnix.runtime.cpuload"):
        check = wait_for_quiet(QuietConfig(), m.sampler, m.clock, m.sleep)
    assert check.quiet and check.other_cores == pytest.approx(0.01) and check.waited_s == pytest.approx(3.0)
    assert m.sleeps == [3.0] and not caplog.records


def test_a_busy_machine_is_waited_for_until_it_quietens(caplog):
    m = FakeMachine(lambda t: 1.0 if t < 10 else 0.0)  # another job ends after 10 s
    with caplog.at_level(logging.INFO, logger="llumnix.runtime.cpuload"):
        check = wait_for_quiet(QuietConfig(max_other_cores=0.25, quiet_window_s=3, quiet_wait_s=60), m.sampler,
                               m.clock, m.sleep)
    # windows [0, 3) [3, 6) [6, 9) busy, [9, 12) a third busy, [12, 15) quiet
    assert check.quiet and check.other_cores == 0.0 and check.waited_s == pytest.approx(15.0)
    assert len(m.sleeps) == 5
    waits = [r.getMessage() for r in caplog.records if "waiting for the machine to quieten" in r.getMessage()]
    assert len(waits) == 4 and "take 1.00 of the" in waits[0] and "bound 0.25" in waits[0]


def test_a_machine_that_stays_busy_is_given_up_on_after_the_wait(caplog):
    m = FakeMachine(lambda t: 0.5)
    with caplog.at_level(logging.INFO, logger="llumnix.runtime.cpuload"):
        check = wait_for_quiet(QuietConfig(quiet_window_s=2, quiet_wait_s=7), m.sampler, m.clock, m.sleep)
    # windows end at 2, 4, 6; a fourth would end at 8 > 7: start anyway
    assert not check.quiet and check.other_cores == pytest.approx(0.5) and check.waited_s == pytest.approx(6.0)
    assert "starting the cluster anyway" in caplog.records[-1].getMessage()
    # no wait allowed: one window, then on
    m = FakeMachine(lambda t: 0.5)
    assert not wait_for_quiet(QuietConfig(quiet_wait_s=0), m.sampler, m.clock, m.sleep).quiet and len(m.sleeps) == 1
    # no window: no check at all
    m = FakeMachine(lambda t: 0.5)
    check = wait_for_quiet(QuietConfig(quiet_window_s=0), m.sampler, m.clock, m.sleep)
    assert check.quiet and math.isnan(check.other_cores) and m.sleeps == []


def test_a_run_is_disturbed_when_other_processes_took_more_than_the_bound():
    quiet = disturbance(cpu_other_s=0.02, wall_s=84.0, bound_cores=0.05, cpu_count=2)
    assert not quiet.disturbed and quiet.other_cores == pytest.approx(0.02 / 84)
    busy = disturbance(cpu_other_s=36.0, wall_s=84.0, bound_cores=0.05, cpu_count=2)
    assert busy.disturbed and busy.other_cores == pytest.approx(36 / 84)
    assert busy.columns() == {"cpu_other_cores": pytest.approx(36 / 84), "disturbed": True,
                              "disturbed_bound_cores": 0.05}
    assert "other processes took 0.43 of the 2 cores" in busy.message() and "bound 0.05" in busy.message()
    assert not disturbance(4.2, 84.0, 0.05, 2).disturbed  # exactly the bound: not above it
    assert not disturbance(1.0, 0.0, 0.05, 2).disturbed  # no wall time: not measured
    assert not disturbance(math.nan, 10.0, 0.05, 2).disturbed


def test_a_disturbed_run_is_rerun_and_the_last_kept():
    m = FakeMachine(lambda t: 0.0)
    runs = iter([m.run(80, 30.0), m.run(80, 10.0), m.run(80, 0.5)])  # 0.375, 0.125, 0.006 cores

    def once():
        return next(runs)()

    result, cols = run_undisturbed(once, QuietConfig(retry_disturbed=5), m.sampler, m.clock, m.sleep, cpu_count=2)
    assert result == "run at 1249" and cols["attempts"] == 3 and not cols["disturbed"]
    assert cols["attempts_cpu_other_cores"] == pytest.approx([0.375, 0.125, 0.00625])
    assert len(m.sleeps) == 3  # the check before every attempt
    assert cols["cpu_other_cores_before"] == 0.0 and cols["quiet_before"] and cols["disturbed_bound_cores"] == 0.05


def test_retries_run_out_and_the_last_run_stays_disturbed(caplog):
    m = FakeMachine(lambda t: 0.0)
    with caplog.at_level(logging.WARNING, logger="llumnix.runtime.cpuload"):
        result, cols = run_undisturbed(m.run(80, 30.0), QuietConfig(retry_disturbed=1), m.sampler, m.clock, m.sleep,
                                       cpu_count=2)
    assert cols["attempts"] == 2 and cols["disturbed"] and cols["cpu_other_cores"] == pytest.approx(0.375)
    assert [r.getMessage() for r in caplog.records] == [
        "attempt 1 was disturbed: other processes took 0.38 of the 2 cores (bound 0.05); re-running it (1 of 1 "
        "retries left)"]
    # no retries asked for: one run, disturbed or not
    _, cols = run_undisturbed(m.run(80, 30.0), QuietConfig(), m.sampler, m.clock, m.sleep, cpu_count=2)
    assert cols["attempts"] == 1 and cols["disturbed"]


def test_the_settings_have_help_and_are_checked():
    assert all(s.help for s in settings(QuietConfig))
    with pytest.raises(ValueError, match=">= 0"):
        QuietConfig(max_other_cores=-1)
    with pytest.raises(ValueError, match=">= 0"):
        QuietConfig(retry_disturbed=-1)
