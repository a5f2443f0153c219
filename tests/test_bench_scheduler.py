"""`llumnix bench scheduler` (Fig 16): both designs run the real schedulers and write the CSV."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from llumnix.bench.cli import bench_scheduler
from llumnix.bench.scheduler import BenchConfig, run_one
from llumnix.runtime.cli import COMMANDS


def test_bench_scheduler_writes_csv(tmp_path: Path):
    out = tmp_path / "fig16.csv"
    result = CliRunner().invoke(
        bench_scheduler, ["--instances", "2,6", "--requests", "12", "--speed", "20", "--max-wall", "60", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out)
    assert list(df[["instances", "design"]].itertuples(index=False, name=None)) == [
        (2, "llumlet"), (2, "centralized"), (6, "llumlet"), (6, "centralized")
    ]
    assert (df["finished"] == 12).all() and (df["steps"] > 0).all()
    for col in ("stall_ms", "stall_p99_ms", "dispatch_ms", "dispatch_p99_ms", "loop_lag_ms"):
        assert (df[col] >= 0).all(), col


def test_centralized_consults_cost_more_than_posted_reports():
    config = BenchConfig(requests=24, speed=20, max_wall_s=60)
    llumlet = run_one(8, "llumlet", config)
    central = run_one(8, "centralized", config)
    assert llumlet["finished"] == central["finished"] == 24
    # a consult reads 8 loads and waits its turn; a report computes one load: the gap is an order of magnitude
    assert central["stall_ms"] > llumlet["stall_ms"]


def test_bad_arguments_are_refused(tmp_path: Path):
    result = CliRunner().invoke(bench_scheduler, ["--instances", "4", "--designs", "magic", "-o", str(tmp_path / "x")])
    assert result.exit_code != 0 and "unknown design" in result.output
    with pytest.raises(ValueError):
        BenchConfig(requests=0)


def test_commands_are_registered():
    names = {c.name for c in COMMANDS}
    assert {"serve", "replay"} <= names
    from llumnix.cli import main

    assert {"serve", "replay", "bench"} <= set(main.commands)
    assert "scheduler" in main.commands["bench"].commands
