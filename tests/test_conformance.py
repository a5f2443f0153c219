"""One scheduling path: the simulator and the real serving runtime decide alike, event for event.

The same trace through ``Simulator`` and through the real runtime's classes (``ClusterManager``, ``AutoScaler``,
``InstanceActor`` over ``EngineInstance`` with a profile executor, the migration driver and KV transport), the latter
in this process on a virtual clock (``llumnix.runtime.lockstep``): every dispatch, pairing and scaling decision, every
preemption, every migration attempt (source, destination, request, stages, blocks, commit or abort and why) and every
instance's lifetime must be the same, at the same virtual time. The last tests change one rule on one side only and
check that the comparison notices.
"""

from __future__ import annotations

import logging

import pytest

from llumnix.policies.scaling import ScalingConfig
from llumnix.policies.system import SystemConfig
from llumnix.profiles import Profile
from llumnix.runtime.lockstep import decision_tables, first_difference, run_lockstep
from llumnix.sim.run import requests_from_trace
from llumnix.sim.simulator import SimConfig, Simulator
from llumnix.workload import make_trace

pytestmark = pytest.mark.timeout(600)

INSTANCES = 4


@pytest.fixture(scope="module")
def profile() -> Profile:
    return Profile.load("a10-llama-7b")


@pytest.fixture(autouse=True)
def quiet(caplog):
    caplog.set_level(logging.WARNING)


def simulated(trace, profile, system):
    sim = Simulator(requests_from_trace(trace), profile,
                    SimConfig(num_instances=INSTANCES, system=system, record_decisions=True))
    res = sim.run()
    return decision_tables(sim.gs.decisions, res.requests, [m.record() for m in res.migrations], res.instance_spans)


def served(trace, profile, system):
    real = run_lockstep(trace, profile, system, INSTANCES)
    return decision_tables(real.decisions, real.requests, real.migrations, real.instance_spans)


# (system, workload, rate, requests, arrival options): each exercises the rules it names.
CASES = {
    "llumnix": (SystemConfig(policy="llumnix"), "L-L", 6.0, 200, {}),
    "infaas++": (SystemConfig(policy="infaas++"), "L-L", 6.0, 200, {}),
    "round-robin": (SystemConfig(policy="round-robin"), "L-L", 6.0, 150, {}),
    "llumnix-priorities": (
        SystemConfig(policy="llumnix", priorities=True), "S-L", 10.0, 250,
        {"arrival": "gamma", "cv": 4.0, "priority_fraction": 0.1},
    ),
    "llumnix-autoscale": (SystemConfig(policy="llumnix", autoscale=ScalingConfig(first_check_s=20)), "L-L", 6.0, 300, {}),
    "infaas++-autoscale": (SystemConfig(policy="infaas++", autoscale=ScalingConfig(first_check_s=20)), "L-L", 6.0, 300, {}),
    # This project's named systems: the candidate reaches the instance actors, the cooldown the global scheduler.
    "llumnix-sized": (SystemConfig(policy="llumnix-sized"), "L-L", 6.0, 200, {}),
    "llumnix-hysteresis": (SystemConfig(policy="llumnix-hysteresis"), "L-L", 6.0, 200, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_simulator_and_runtime_decide_alike(case, profile):
    system, workload, rate, n, options = CASES[case]
    trace = make_trace(workload, rate, n, seed=3, **options)
    sim, real = simulated(trace, profile, system), served(trace, profile, system)
    assert first_difference(sim, real) is None
    # The trace exercised the rules this case is about (else equality would prove little).
    decisions, requests, migrations = sim["decisions"], sim["requests"], sim["migrations"]
    assert (decisions["kind"] == "dispatch").sum() >= n
    assert requests["preemptions_s"].map(len).sum() > 0
    if system.migrates:
        assert migrations["committed"].sum() > 0 and (~migrations["committed"]).sum() > 0
        assert migrations["stages"].max() >= 2
    else:
        assert migrations.empty
    if system.priorities:
        high = trace.loc[trace["priority"] == 1, "request_id"]
        assert len(high) > 0 and not migrations["request_id"].isin(high).any()
    if system.autoscale is not None:
        assert {"start", "drain"} <= set(decisions["kind"]) and sim["instances"]["stop_s"].notna().any()


def test_a_rule_changed_in_the_runtime_only_shows(profile, monkeypatch):
    """The runtime's instances preempt only when a request needs a block (not vLLM 0.1's rule, which the simulator
    keeps): the decisions part ways."""
    from dataclasses import replace

    from llumnix.runtime.instance_actor import InstanceActor

    system, workload, rate, n, _ = CASES["llumnix"]
    trace = make_trace(workload, rate, n, seed=3)
    sim = simulated(trace, profile, system)
    build = InstanceActor._build_engine

    def block_needed(self):
        engine, info = build(self)
        engine.scheduler.config = replace(engine.scheduler.config, preemption="block_needed")
        return engine, info

    monkeypatch.setattr(InstanceActor, "_build_engine", block_needed)
    assert first_difference(sim, served(trace, profile, system)) is not None


def test_a_rule_changed_in_the_simulator_only_shows(profile, monkeypatch):
    """The simulator's instances pick the first-arrived request to migrate instead of the last (LCFS)."""
    from llumnix.core.llumlet import Llumlet

    system, workload, rate, n, _ = CASES["llumnix"]
    trace = make_trace(workload, rate, n, seed=3)
    real = served(trace, profile, system)
    first = lambda self: next((r for r in self.scheduler.running if self._may_move(r)), None)  # noqa: E731
    monkeypatch.setattr(Llumlet, "pick_migration_candidate", first)
    assert first_difference(simulated(trace, profile, system), real) is not None
