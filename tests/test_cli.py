"""End-to-end tests of the `llumnix trace` and `llumnix simulate` commands as the workflow runs them."""

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from llumnix.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("t") / "trace.parquet"
    r = invoke("trace", "--workload", "L-L", "--rate", 1.5, "--num-requests", 300, "--priority-fraction", 0.1,
               "--seed", 7, "-o", path)
    assert r.exit_code == 0, r.output
    return path


def test_trace_writes_requested_requests(trace_file):
    df = pd.read_parquet(trace_file)
    assert len(df) == 300 and df["priority"].sum() == 30
    assert list(df.columns) == ["request_id", "arrival_s", "prompt_tokens", "output_tokens", "priority"]


@pytest.mark.parametrize("policy", ["round-robin", "infaas++", "llumnix"])
def test_simulate_writes_tables_and_summary(tmp_path, trace_file, policy):
    out = tmp_path / policy
    r = invoke("simulate", "--trace", trace_file, "--policy", policy, "--instances", 4, "--seed", 7, "--out", out,
               "--priorities", "--no-progress")
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    for key in ("requests", "finished", "prefill_mean_s", "prefill_p99_s", "decode_mean_s", "decode_p99_s",
                "e2e_mean_s", "e2e_p99_s", "preemptions", "preemption_loss_s", "migrations", "avg_instances"):
        assert key in summary, key
    assert summary["requests"] == summary["finished"] == 300
    assert summary["avg_instances"] == pytest.approx(4.0)
    assert set(summary["high"]) >= {"prefill_mean_s", "e2e_p99_s"} and summary["high"]["requests"] == 30
    reqs = pd.read_parquet(out / "requests.parquet")
    assert len(reqs) == 300 and reqs["finish_s"].notna().all()
    inst = pd.read_parquet(out / "instances.parquet")
    assert set(inst["instance_id"]) == {0, 1, 2, 3}
    assert (inst["used_blocks"] + inst["free_blocks"] == 792).all()


def test_simulate_autoscale_reports_cost(tmp_path, trace_file):
    out = tmp_path / "auto"
    r = invoke("simulate", "--trace", trace_file, "--policy", "llumnix", "--autoscale", "--initial-instances", 4,
               "--min-instances", 1, "--max-instances", 8, "--out", out, "--no-progress")
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    assert s["finished"] == 300 and 1 <= s["avg_instances"] <= 8 and s["autoscale"]


def test_same_seed_same_outputs(tmp_path):
    frames = []
    for name in ("a", "b"):
        trace = tmp_path / f"{name}.csv"
        invoke("trace", "--workload", "S-S", "--rate", 20, "--num-requests", 200, "--seed", 3, "-o", trace)
        invoke("simulate", "--trace", trace, "--instances", 2, "--out", tmp_path / name, "--no-progress")
        frames.append(pd.read_parquet(tmp_path / name / "requests.parquet"))
    pd.testing.assert_frame_equal(frames[0], frames[1])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "fifo"], "Invalid value for '--policy': 'fifo' is not one of"),  # a click.Choice now
        (["--profile", "h200-nothing"], "h200-nothing"),
        (["--instances", "0"], "--instances must be >= 1"),
        (["--autoscale", "--scale-up", "70", "--scale-down", "60"], "--scale-up"),
    ],
)
def test_simulate_bad_flags_one_clear_error(tmp_path, trace_file, args, message):
    r = CliRunner().invoke(main, ["simulate", "--trace", str(trace_file), "--out", str(tmp_path / "x"), *args])
    assert r.exit_code != 0
    assert message in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "x" / "summary.json").exists()


def test_simulate_malformed_trace(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("request_id,arrival_s,prompt_tokens\n0,0.0,10\n")
    r = CliRunner().invoke(main, ["simulate", "--trace", str(bad), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and "output_tokens" in r.output and "Traceback" not in r.output


def test_trace_bad_rate():
    r = CliRunner().invoke(main, ["trace", "--workload", "S-S", "--rate", "-1", "--seed", "0", "-o", "x.csv"])
    assert r.exit_code != 0 and "--rate" in r.output


def test_every_command_has_help():
    for cmd in main.commands:
        r = CliRunner().invoke(main, [cmd, "--help"])
        assert r.exit_code == 0, cmd
