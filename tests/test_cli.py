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


def test_trace_lengths_option_and_provenance(tmp_path):
    path = tmp_path / "t.parquet"
    r = CliRunner().invoke(main, ["trace", "--workload", "M-M", "--rate", "2", "--num-requests", "50", "--seed", "1",
                                  "--lengths", "table1", "-o", str(path)])
    assert r.exit_code == 0 and "lengths: Table-1 power-law fit" in r.output
    assert pd.read_parquet(path).attrs["llumnix_trace"]["length_model"] == "table1"
    r = CliRunner().invoke(main, ["trace", "--workload", "M-M", "--rate", "2", "--seed", "1", "--lengths", "x",
                                  "-o", str(path)])
    assert r.exit_code != 0 and "--lengths" in r.output


def test_trace_stats_compares_every_source_with_table1(tmp_path, monkeypatch):
    monkeypatch.setenv("LLUMNIX_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LLUMNIX_LLAMA_TOKENIZER_JS", raising=False)
    def turns(i):
        return [{"from": "human", "value": "hello " * (i + 1)}, {"from": "gpt", "value": "ok " * (2 * i + 1)}]

    sharegpt = tmp_path / "sg.json"
    sharegpt.write_text(json.dumps([{"id": str(i), "conversations": turns(i)} for i in range(30)]))
    out = tmp_path / "docs" / "lengths.md"
    r = CliRunner().invoke(main, ["trace-stats", "--seeds", "3", "--draws", "2000", "--sharegpt", str(sharegpt),
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    table = pd.read_csv(out.with_suffix(".csv"))
    artifact = table[table["source"].str.contains("RandomState")]
    assert len(artifact) == 3 and (artifact["max_rel_dev"] < 0.001).all()  # the artifact's stream gives Table 1
    real = table[table["source"].str.startswith("ShareGPT V3 rows, turns 0-1 human")]
    assert real["n"].astype(str).tolist() == ["30", "30"]
    assert set(table["distribution"]) >= {"short", "sharegpt_output", "burstgpt_input"}
    assert "llumnix trace-stats --seed 0 --draws 2000 --seeds 3" in out.read_text()


def test_trace_bad_rate():
    r = CliRunner().invoke(main, ["trace", "--workload", "S-S", "--rate", "-1", "--seed", "0", "-o", "x.csv"])
    assert r.exit_code != 0 and "--rate" in r.output


def test_every_command_has_help():
    for cmd in main.commands:
        r = CliRunner().invoke(main, [cmd, "--help"])
        assert r.exit_code == 0, cmd
