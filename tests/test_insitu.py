"""The in-situ profile (step times a real cluster's instances logged, their slowdown when several step at once) and
the simulator's model of what a real cluster adds around its engines (dispatch and delivery latencies)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from llumnix.bench.insitu import concurrent_steps, insitu_profile, load_legs, request_legs, steps_table
from llumnix.core.request import Request
from llumnix.profiles import Profile
from llumnix.sim.simulator import SimConfig, simulate


@pytest.fixture(scope="module")
def base() -> Profile:
    return Profile.load("cpu-tiny")


def _step(iid, start, duration, kind="decode", batch=1, tokens=0, context=64):
    return {"instance_id": iid, "start_s": start, "end_s": start + duration, "kind": kind, "batch_size": batch,
            "prefill_tokens": tokens, "prefill_sum_sq": tokens * tokens, "context_tokens": context}  # fmt: skip


def test_concurrent_steps_counts_instances_mid_step_at_each_start():
    steps = steps_table([
        _step(0, 0.0, 1.0), _step(1, 0.5, 1.0), _step(2, 0.9, 0.05), _step(0, 1.2, 0.1), _step(1, 2.0, 0.1),
    ])  # fmt: skip
    by_start = dict(zip(steps["start_s"], concurrent_steps(steps), strict=True))
    assert by_start == {0.0: 1, 0.5: 2, 0.9: 3, 1.2: 2, 2.0: 1}


def test_insitu_profile_recovers_step_times_and_the_sharing_slowdown(base: Profile):
    """Two instances whose steps take the base profile's time when started alone and twice that when started while
    the other one steps (the simulator's model: the factor is fixed when a step starts)."""
    rng = np.random.default_rng(0)
    rows, t = [], 0.0
    for k in range(400):
        prefill = k % 10 == 0
        tokens, batch, context = int(rng.integers(16, 300)), int(rng.integers(1, 8)), int(rng.integers(64, 900))
        alone = base.prefill_time_s([tokens]) if prefill else base.decode_time_s(batch, context)
        kind = "prefill" if prefill else "decode"
        if k % 2:  # both instances step at once: the one starting second (busy = 2) takes twice as long
            rows.append(_step(0, t, alone, kind, batch, tokens, context))
            rows.append(_step(1, t + 1e-6, 2 * alone, kind, batch, tokens, context))
            t += 2 * alone + 0.03  # idle between steps: no loop overhead to fit
        else:
            rows.append(_step(k % 4 // 2, t, alone, kind, batch, tokens, context))
            t += alone + 0.03
    for r in rows:
        if r["kind"] == "prefill":
            r["batch_size"], r["context_tokens"] = 1, 0
        else:
            r["prefill_tokens"] = r["prefill_sum_sq"] = 0
    steps = steps_table(rows)
    prof = insitu_profile(steps, base, "insitu-test", provenance="test")
    assert prof.concurrency_slowdown == pytest.approx([1.0, 2.0]) and prof.step_overhead_s == 0.0
    assert prof.total_blocks == base.total_blocks and prof.name == "insitu-test"
    assert any("in situ" in a for a in prof.assumptions)
    # the fitted model with its factors adds up to the logged time of every step
    busy = concurrent_steps(steps)
    predicted = sum(
        (prof.prefill_time_s([n]) if kind == "prefill" else prof.decode_time_s(b, c)) * prof.concurrency_factor(k)
        for kind, n, b, c, k in zip(steps["kind"], steps["prefill_tokens"], steps["batch_size"],
                                    steps["context_tokens"], busy, strict=True)
    )  # fmt: skip
    assert predicted == pytest.approx(steps["duration_s"].sum(), rel=0.05)
    with pytest.raises(ValueError, match="prefill and .* decode steps"):
        insitu_profile(steps[steps["kind"] == "decode"], base, "x", "test")


def test_profile_rejects_a_bad_slowdown(base: Profile):
    with pytest.raises(ValueError, match="concurrency_slowdown"):
        base.model_copy(update={"concurrency_slowdown": [1.0, 0.0]})
    assert base.concurrency_factor(3) == 1.0  # no table: each instance has its device to itself
    shared = base.model_copy(update={"concurrency_slowdown": [1.0, 1.5]})
    assert [shared.concurrency_factor(n) for n in (1, 2, 5)] == [1.0, 1.5, 1.5]


def _requests(n: int, gap_s: float) -> list[Request]:
    return [Request(i, i * gap_s, 64, 8) for i in range(n)]


def test_simulator_adds_the_measured_latencies_around_the_engines(base: Profile):
    plain = simulate(_requests(3, 10.0), base, SimConfig(num_instances=1))
    legs = simulate(_requests(3, 10.0), base, SimConfig(num_instances=1, dispatch_latency_s=0.007,
                                                         delivery_latency_s=0.004))  # fmt: skip
    for a, b in zip(plain.requests, legs.requests, strict=True):
        assert b.first_token_s - a.first_token_s == pytest.approx(0.011)
        assert b.finish_s - a.finish_s == pytest.approx(0.011)
        assert b.dispatch_s - b.arrival_s == pytest.approx(0.007)
    with pytest.raises(ValueError, match="dispatch_latency_s"):
        SimConfig(dispatch_latency_s=-1.0)


def test_simulator_slows_steps_down_while_instances_share_the_cores(base: Profile):
    shared = base.model_copy(update={"concurrency_slowdown": [1.0, 2.0]})
    together = [Request(0, 0.0, 64, 20), Request(1, 0.0, 64, 20)]  # round-robin: one per instance, in lockstep
    alone = simulate([Request(0, 0.0, 64, 20)], shared, SimConfig(num_instances=2))
    both = simulate(together, shared, SimConfig(num_instances=2))
    # the first instance's steps start alone (1x), the second's while the first steps (2x), and so on, in turn
    assert max(r.finish_s for r in both.requests) > 1.4 * alone.requests[0].finish_s


def test_request_legs_and_loading_them(tmp_path):
    r = Request(0, 1.0, 16, 4)
    r.dispatch_s, r.prefill_ends_s, r.first_token_s = 1.01, [1.05], 1.06
    legs = request_legs([r, Request(1, 2.0, 16, 4)])  # the second recorded nothing
    assert legs["dispatch_latency_mean_s"] == pytest.approx(0.01)
    assert legs["delivery_latency_mean_s"] == pytest.approx(0.01)
    (tmp_path / "summary.json").write_text(json.dumps(legs))
    assert load_legs(tmp_path / "summary.json") == pytest.approx((0.01, 0.01))
    (tmp_path / "other.json").write_text(json.dumps({"finished": 1}))
    with pytest.raises(ValueError, match="dispatch_latency_mean_s"):
        load_legs(tmp_path / "other.json")
    assert steps_table([]).empty and list(pd.DataFrame(steps_table([])).columns)[-1] == "duration_s"
