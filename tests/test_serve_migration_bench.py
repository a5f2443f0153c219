"""benchmarks/serve_migration.py's analysis of a serving run's logs (the GPU runs' numbers come from it): the source's
and the destination's decode steps during a migration's bulk stage against their own steps before."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pandas as pd
import pytest

_path = Path(__file__).resolve().parent.parent / "benchmarks" / "serve_migration.py"
_spec = importlib.util.spec_from_file_location("serve_migration_bench", _path)
sm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sm)


def _steps(instance: int, durations: list[float], gap_s: float, batch: int = 4) -> list[dict]:
    rows, t = [], 0.0
    for d in durations:
        rows.append({"instance_id": instance, "start_s": t, "end_s": t + d, "kind": "decode", "batch_size": batch,
                     "duration_s": d})
        t += d + gap_s
    return rows


def test_both_sides_of_a_migration_against_their_own_steps_before():
    # 40 source steps of 10 ms (1 ms gaps), then 10 of 11 ms during the bulk stage, then 10 ms again; the destination
    # 10 ms steps, 10.5 ms while it receives
    src = _steps(0, [0.010] * 40 + [0.011] * 10 + [0.010] * 10, 0.001)
    dst = _steps(1, [0.010] * 40 + [0.0105] * 10 + [0.010] * 10, 0.001)
    start = src[40]["start_s"] - 1e-4
    bulk_end = src[49]["end_s"]
    downtime = 0.002
    migration = {"client_request_id": "cmpl-1", "src": 0, "dst": 1, "stages": 2, "blocks": 30, "start_s": start,
                 "end_s": bulk_end + downtime, "downtime_s": downtime}
    steps = pd.DataFrame(src + dst)
    (row,) = sm.slowdown_rows([migration], steps, 30)
    assert row["steps_during"] == 10 and row["steps_before"] == 30 and row["source_batch"] == 4
    assert row["decode_slowdown"] == pytest.approx(0.10)
    assert row["interval_slowdown"] == pytest.approx(0.012 / 0.011 - 1)
    assert row["downtime_over_step"] == pytest.approx(0.2)
    (d,) = sm.destination_rows([migration], steps, 30)
    assert d["dst_steps_during"] >= 9 and d["dst_decode_slowdown"] == pytest.approx(0.05, abs=0.01)
    # an idle destination: no steps to compare
    (idle,) = sm.destination_rows([migration], pd.DataFrame(src), 30)
    assert idle["dst_batch"] == 0 and idle["dst_steps_during"] == 0 and math.isnan(idle["dst_decode_slowdown"])
