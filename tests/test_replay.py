"""`llumnix replay`: a trace sent to a live frontend yields the same tables as `llumnix simulate`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from llumnix.metrics import fragmentation
from llumnix.runtime.cli import replay as replay_command
from llumnix.runtime.frontend import BackgroundServer
from llumnix.runtime.replay import instance_samples, load_trace
from llumnix.runtime.serve_config import build_serve_config

pytestmark = pytest.mark.timeout(300)


def write_trace(path: Path, n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "request_id": np.arange(n),
            "arrival_s": np.cumsum(rng.exponential(1 / 20, n)),
            "prompt_tokens": rng.integers(8, 200, n),
            "output_tokens": rng.integers(4, 48, n),
            "priority": 0,
        }
    )
    df.to_csv(path, index=False) if path.suffix == ".csv" else df.to_parquet(path, index=False)
    return df


@pytest.fixture(scope="module")
def server():
    import ray

    from llumnix.runtime.frontend import init_ray

    init_ray(None, num_cpus=2, log_to_driver=False)
    config = build_serve_config(
        {},
        {"instances": 2, "port": 0, "backend": "profile", "speed": 10, "num_blocks": 64, "num_cpus_per_instance": 0.5},
    )
    try:
        with BackgroundServer(config) as srv:
            yield srv
    finally:
        ray.shutdown()


def test_replay_writes_the_simulators_tables(server, tmp_path: Path):
    trace = write_trace(tmp_path / "trace.csv", 40)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        replay_command,
        ["--url", server.url, "--trace", str(tmp_path / "trace.csv"), "--out", str(out), "--time-scale", "0.5",
         "--sample-interval", "0.2", "--no-progress"],
        env={"LLUMNIX_ADMIN_KEY": server.admin_key},
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] == summary["finished"] == 40
    assert summary["errors"] == 0 and summary["runtime"] == "ray"
    for key in ("prefill_mean_s", "prefill_p99_s", "decode_mean_s", "e2e_p99_s", "preemption_loss_s", "migrations",
                "avg_instances", "fragmentation_mean", "migration_attempts"):
        assert key in summary, key
    assert summary["avg_instances"] == pytest.approx(2.0)
    reqs = pd.read_parquet(out / "requests.parquet")
    assert len(reqs) == 40
    assert (reqs["num_generated"] == trace["output_tokens"]).all()
    assert (reqs["prefill_latency_s"] > 0).all() and (reqs["e2e_latency_s"] >= reqs["prefill_latency_s"]).all()
    assert set(reqs["instances"].str.split(">").str[0]) <= {"0", "1"}
    inst = pd.read_parquet(out / "instances.parquet")
    assert len(inst) and set(inst["instance_id"]) == {0, 1}
    assert (out / "migrations.parquet").exists()


def test_replay_accepts_parquet_and_reports_failures(server, tmp_path: Path):
    write_trace(tmp_path / "t.parquet", 5, seed=1)
    df = pd.read_parquet(tmp_path / "t.parquet")
    df.loc[2, "prompt_tokens"] = 5000  # more than an instance holds: the server refuses it with a 400
    df.to_parquet(tmp_path / "t.parquet", index=False)
    out = tmp_path / "run"
    result = CliRunner().invoke(
        replay_command, ["--url", server.url, "--trace", str(tmp_path / "t.parquet"), "--out", str(out), "--no-progress",
                         "--admin-key", server.admin_key]
    )
    assert result.exit_code != 0 and "1 requests did not finish" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] == 4 and summary["errors"] == 1
    assert "HTTP 400" in summary["error_examples"][0]


def test_load_trace_checks_columns(tmp_path: Path):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"arrival_s": [0.0], "prompt_tokens": [3]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="output_tokens"):
        load_trace(path)
    pd.DataFrame({"arrival_s": [1.0, 0.0], "prompt_tokens": [3, 4], "output_tokens": [2, 2]}).to_csv(path, index=False)
    df = load_trace(path)
    assert list(df["request_id"]) == [1, 0] and list(df["priority"]) == [0, 0]  # sorted by arrival


def test_fragmentation_of_admin_rows_is_the_simulators():
    """The replay's samples (``/admin/instances`` rows) go through the simulator's own fragmentation function."""

    def row(iid, free, waiting=0, demand=0):
        return {"instance_id": iid, "alive": True, "running": 1, "total_blocks": 100, "free_blocks": free,
                "watermark_blocks": 0, "waiting": waiting, "draining": False, "head_demand_blocks": demand,
                "freeness": None}

    def frag(rows):
        return fragmentation(instance_samples(rows))

    # 30 + 30 free, a head-of-line request needs 50: the cluster has room, no instance does -> fragmented
    assert frag([row(0, 30, waiting=1, demand=50), row(1, 30)]) == pytest.approx(60 / 200)
    assert frag([row(0, 30, waiting=1, demand=20), row(1, 30)]) == 0.0
    assert frag([row(0, 30, waiting=1, demand=80), row(1, 30)]) == 0.0
