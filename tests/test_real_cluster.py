"""The real-cluster experiment (kind ``real``): capped traces, ``llumnix real-cluster`` end to end (a subprocess server
that leaves no Ray process behind, also when it fails), real-vs-simulated tables and figure, and the frontend under
100 concurrent requests (``benchmarks/load_1000.py`` runs 1,000)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from llumnix.analysis.experiments import ExperimentError, expand_runs, load_experiment
from llumnix.analysis.figures.real_vs_sim import plot_real_vs_sim
from llumnix.analysis.realsim import (
    COMPARED_METRICS,
    REAL_BACKENDS,
    cap_lengths,
    capped_trace_args,
    error_summary,
    profile_args,
    real_cluster_args,
    real_run_files,
    real_vs_sim_table,
    relative_error,
    twin_simulate_args,
)
from llumnix.cli import main as llumnix_cli
from llumnix.runtime.supervisor import BACKENDS, RealClusterConfig, ServeProcess

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)

REAL = {
    "name": "real",
    "title": "tiny real vs sim",
    "paper": "within 15%",
    "kind": "real",
    "figure": {"kind": "real_vs_sim"},
    "instances": 2,
    "real": {"num_blocks": 32, "length_scale": 0.25, "max_prompt_tokens": 256, "max_output_tokens": 64},
    "traces": {"L-L": {"workload": "L-L", "rates": [2]}},
    "systems": {
        "infaas++": {"policy": "infaas++", "label": "INFaaS++"},
        "llumnix": {"policy": "llumnix", "label": "Llumnix", "migration_threshold": 2},
    },
    "scales": {"quick": {"num_requests": 10}, "paper": {"num_requests": 20, "seeds": 2}},
}


def write_experiment(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def assert_nothing_left(server: ServeProcess, timeout_s: float = 15.0) -> None:
    """No process of the server's (its descendants, its Ray session's GCS, raylet and workers) is alive."""
    deadline = time.monotonic() + timeout_s
    while (left := server.leftover_processes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes left behind: {[(p.pid, p.name()) for p in left]}"
    assert server.proc.poll() is not None


# -- traces and the experiment file ---------------------------------------------------------------------------------
def test_cap_lengths_scales_and_caps_lengths_and_keeps_arrivals():
    df = pd.DataFrame({"request_id": [0, 1, 2], "arrival_s": [0.0, 0.5, 1.0], "prompt_tokens": [1, 100, 5000],
                       "output_tokens": [3, 40, 900], "priority": 0})  # fmt: skip
    out = cap_lengths(df, 0.5, max_prompt_tokens=1024, max_output_tokens=256)
    assert out["prompt_tokens"].tolist() == [1, 50, 1024]  # rounded, never below 1, capped
    assert out["output_tokens"].tolist() == [2, 20, 256]
    assert out["arrival_s"].equals(df["arrival_s"]) and df["prompt_tokens"].tolist() == [1, 100, 5000]
    with pytest.raises(ValueError):
        cap_lengths(df, 0.0, 10, 10)


def test_capped_trace_command(tmp_path: Path):
    out = tmp_path / "t.parquet"
    args = ["capped-trace", "--workload", "L-L", "--rate", "2", "--num-requests", "200", "--seed", "1",
            "--length-scale", "0.5", "--max-prompt-tokens", "300", "--max-output-tokens", "100", "-o", str(out)]
    result = CliRunner().invoke(llumnix_cli, args)
    assert result.exit_code == 0, result.output
    df = pd.read_parquet(out)
    assert len(df) == 200 and df["prompt_tokens"].max() == 300 and df["output_tokens"].max() == 100
    assert df["prompt_tokens"].min() >= 1 and df["arrival_s"].is_monotonic_increasing


def test_repository_real_cluster_experiment_validates():
    exp = load_experiment(REPO / "experiments" / "real_cluster.yaml")
    assert exp.kind == "real" and exp.figure.kind == "real_vs_sim" and exp.instances == 4
    assert {s.policy for s in exp.systems.values()} == {"round-robin", "infaas++", "llumnix"}
    assert 0 < len(expand_runs(exp, "quick")) <= len(expand_runs(exp, "paper"))
    assert exp.real.max_prompt_tokens + exp.real.max_output_tokens <= exp.real.num_blocks * exp.real.block_size
    assert "--retry-disturbed 1" in real_cluster_args(exp, "L-L", "llumnix", "0")  # a disturbed run is re-run once


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("real"), "'real'"),
        (lambda d: d["real"].update(max_prompt_tokens=500), "do not fit"),
        (lambda d: d["systems"]["llumnix"].update(autoscale={}), "auto-scale"),
    ],
)
def test_invalid_real_experiment_names_the_problem(tmp_path: Path, change, message):
    data = json.loads(json.dumps(REAL))
    change(data)
    with pytest.raises(ExperimentError, match=message):
        load_experiment(write_experiment(tmp_path, data))


def test_command_lines_of_a_run(tmp_path: Path):
    exp = load_experiment(write_experiment(tmp_path, REAL))
    real = real_cluster_args(exp, "L-L", "llumnix", "1")
    for part in ("--policy llumnix", "--instances 2", "--num-blocks 32", "--torch-threads 1", "--seed 1",
                 "--migration-threshold 2", "--num-cpus-per-instance 0.5", "--max-other-cores 0.05",
                 "--retry-disturbed 0"):
        assert part in real, part
    assert "--profile results/profiles/real.json" in twin_simulate_args(exp, "L-L", "llumnix", "1",
                                                                       "results/profiles/real.json")
    trace = capped_trace_args(exp, "L-L", "2", "0", "quick")
    assert "--num-requests 10" in trace and "--max-prompt-tokens 256" in trace and "--length-scale 0.25" in trace
    shared, alone = profile_args(exp, "shared"), profile_args(exp, "alone")
    assert "--num-blocks 32" in shared and "--threads 1" in shared and "--concurrent-instances 2" in shared
    assert "--num-blocks 32" in alone and "--concurrent-instances" not in alone
    files = real_run_files(exp, "quick")
    assert len(files) == 2 * 4 and files[0].endswith("/infaas++/s0/real/summary.json")
    assert {f.split("/")[-2] for f in files} == {"real", "sim-insitu", "sim", "sim-alone"}


def test_profile_measured_beside_busy_instances():
    import multiprocessing

    from llumnix.bench.profiler import ProfileConfig, measure_profile

    grid = {"prefill_lengths": (16,), "prefill_batches": (1, 2), "decode_batches": (1, 2), "decode_contexts": (32,),
            "copy_blocks": (1, 2)}  # fmt: skip
    cfg = ProfileConfig(num_blocks=64, repeats=1, warmup=0, concurrent_instances=2, name="shared", **grid)
    prof = measure_profile(cfg, "test")
    assert any("CPU sharing" in a and "1 other instance" in a for a in prof.assumptions)
    assert "2 instances sharing the machine" in prof.description and prof.total_blocks == 64
    assert not multiprocessing.active_children()  # the busy instances are gone
    with pytest.raises(ValueError, match="concurrent_instances"):
        ProfileConfig(concurrent_instances=0)


# -- real vs sim tables and figure ----------------------------------------------------------------------------------
def test_real_vs_sim_table_and_figure(tmp_path: Path):
    exp = load_experiment(write_experiment(tmp_path, REAL))
    for run in expand_runs(exp, "quick"):
        for runtime, factor in (("real", 1.0), ("sim-insitu", 0.9), ("sim", 0.8), ("sim-alone", 0.25)):
            d = tmp_path / run.run_dir("quick") / runtime
            d.mkdir(parents=True)
            summary = {m: 2.0 * factor for m in COMPARED_METRICS} | {"decode_mean_s": 0.01, "finished": 10,
                                                                       "machine": "test box"}
            (d / "summary.json").write_text(json.dumps(summary))
    data = real_vs_sim_table(exp, "quick", tmp_path)
    assert len(data) == 2 * 4 and set(data["runtime"]) == {"real", "sim-insitu", "sim", "sim-alone"}
    sim, alone = data[data["runtime"] == "sim"], data[data["runtime"] == "sim-alone"]
    assert (error_summary(data).to_numpy() == pytest.approx(-0.1))  # the in-situ twin's errors
    for metric in COMPARED_METRICS:
        assert sim[f"rel_error_{metric}"].to_numpy() == pytest.approx([-0.2, -0.2])
        assert alone[f"rel_error_{metric}"].to_numpy() == pytest.approx([-0.75, -0.75])
        assert data.loc[data["runtime"] == "real", f"rel_error_{metric}"].isna().all()
    written = plot_real_vs_sim(exp, data, tmp_path / "fig" / "real.png")
    assert all(p.stat().st_size > 1000 for p in written)
    assert relative_error(1.0, 0.0) != relative_error(1.0, 0.0)  # nan when the real value is 0
    with pytest.raises(FileNotFoundError):
        real_vs_sim_table(exp, "paper", tmp_path)


def test_disturbed_runs_are_marked_left_out_of_the_errors_and_hatched(tmp_path: Path):
    """A real run during which other processes took more than the bound: every row of its run says disturbed, the
    errors are the other runs' (nan for a system with none), the command says which runs it left out, the figure
    says so; a summary from before the mark gets it from cpu_other_s / wall_s."""
    from llumnix.analysis.figures.real_vs_sim import disturbed_note
    from llumnix.analysis.realsim import disturbed_runs, mark_disturbed

    exp = load_experiment(write_experiment(tmp_path, REAL | {"scales": {"quick": {"num_requests": 10, "seeds": 2},
                                                                        "paper": {"num_requests": 20}}}))
    for run in expand_runs(exp, "quick"):
        # infaas++ seed 1 disturbed (marked by real-cluster), llumnix seed 0 disturbed (an older summary: derived)
        marked = run.system == "infaas++" and run.seed == 1
        old = run.system == "llumnix" and run.seed == 0
        for runtime, factor in (("real", 3.0 if marked or old else 1.0), ("sim-insitu", 0.9), ("sim", 0.8),
                                ("sim-alone", 0.25)):
            summary = {m: 2.0 * factor for m in COMPARED_METRICS} | {"decode_mean_s": 0.01, "machine": "test box"}
            if runtime == "real":
                summary |= {"cpu_other_s": 30.0 if old else 0.1, "wall_s": 80.0, "cpu_count": 2}
                if not old:
                    summary |= {"cpu_other_cores": 0.4 if marked else 0.001, "disturbed": marked,
                                "disturbed_bound_cores": 0.25}
            d = tmp_path / run.run_dir("quick") / runtime
            d.mkdir(parents=True)
            (d / "summary.json").write_text(json.dumps(summary))
    data = real_vs_sim_table(exp, "quick", tmp_path)
    flagged = data.groupby(["system_id", "seed"])["disturbed"].agg(["all", "any"])
    assert flagged["all"].to_dict() == flagged["any"].to_dict() == {("infaas++", 0): False, ("infaas++", 1): True,
                                                                    ("llumnix", 0): True, ("llumnix", 1): False}
    bad = disturbed_runs(data)
    assert list(zip(bad["system_id"], bad["seed"], bad["disturbed_bound_cores"], strict=True)) == [
        ("infaas++", 1, 0.25), ("llumnix", 0, 0.05)]  # the derived one with the default bound
    assert bad["cpu_other_cores"].to_numpy() == pytest.approx([0.4, 30 / 80])
    errors = error_summary(data)  # the undisturbed runs' (the disturbed ones' would be -0.7)
    assert errors.to_numpy() == pytest.approx(-0.1)
    only = error_summary(data[~((data["system_id"] == "llumnix") & (data["seed"] == 1))])
    assert only.loc["INFaaS++"].to_numpy() == pytest.approx(-0.1) and only.loc["Llumnix"].isna().all()
    # read back from data.csv: the same marks
    data.to_csv(tmp_path / "data.csv", index=False)
    again = mark_disturbed(pd.read_csv(tmp_path / "data.csv"))
    assert again["disturbed"].tolist() == data["disturbed"].tolist()
    real = data[data["runtime"] == "real"]
    note = disturbed_note(real)
    assert "DISTURBED (hatched): 2 of 4 real runs" in note and "up to 0.40 of the 2 cores" in note
    assert disturbed_note(real[~real["disturbed"]]) == ""
    written = plot_real_vs_sim(exp, data, tmp_path / "fig" / "real.png")
    assert all(p.stat().st_size > 1000 for p in written)
    result = CliRunner().invoke(llumnix_cli, ["real-vs-sim", "--experiment", str(tmp_path / "real.yaml"), "--root",
                                              str(tmp_path), "-o", str(tmp_path / "out.csv")])
    assert result.exit_code == 0, result.output
    assert "WARNING: 2 disturbed run(s), left out of the errors above" in result.output
    assert "INFaaS++ L-L r2 s1 (0.40 cores), Llumnix L-L r2 s0 (0.38 cores)" in result.output
    assert pd.read_csv(tmp_path / "out.csv")["disturbed"].sum() == 2 * 4


def test_the_dispatch_latency_is_read_from_the_metrics_text():
    from llumnix.analysis.realrun import _dispatch_seconds

    text = ("# HELP llumnix_dispatch_seconds dispatch\n# TYPE llumnix_dispatch_seconds summary\n"
            "llumnix_dispatch_seconds_count 4.0\nllumnix_dispatch_seconds_sum 0.2\n")
    assert _dispatch_seconds(text) == pytest.approx(0.05)
    assert np.isnan(_dispatch_seconds(text.replace("count 4.0", "count 0.0"))) and np.isnan(_dispatch_seconds(""))


# -- the real cluster, end to end -----------------------------------------------------------------------------------
def test_real_cluster_serves_a_trace_and_leaves_no_ray_behind(tmp_path: Path, monkeypatch):
    rng = np.random.default_rng(0)
    n = 8
    pd.DataFrame({"request_id": np.arange(n), "arrival_s": np.cumsum(rng.exponential(0.1, n)),
                  "prompt_tokens": rng.integers(8, 120, n), "output_tokens": rng.integers(2, 16, n),
                  "priority": 0}).to_csv(tmp_path / "trace.csv", index=False)  # fmt: skip
    servers: list[ServeProcess] = []
    enter = ServeProcess.__enter__
    monkeypatch.setattr(ServeProcess, "__enter__", lambda self: servers.append(self) or enter(self))
    out = tmp_path / "run"
    args = ["real-cluster", "--trace", str(tmp_path / "trace.csv"), "--policy", "llumnix", "--instances", "2",
            "--num-blocks", "32", "--out", str(out), "--no-progress", "--sample-interval", "0.2",
            "--quiet-window", "0.5", "--quiet-wait", "0"]  # one look at the machine, then on whatever its load
    result = CliRunner().invoke(llumnix_cli, args)
    assert result.exit_code == 0, result.output + (out / "serve.log").read_text()
    assert len(servers) == 1 and len(servers[0]._spawned) >= 3  # GCS, raylet, the instance workers at least
    assert_nothing_left(servers[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] == n and summary["errors"] == 0 and summary["runtime"] == "ray"
    assert summary["engine_steps"] > 0 and summary["num_blocks"] == 32 and summary["instances"] == 2
    assert "--num-blocks 32" in summary["serve_command"] and summary["dispatch_mean_s"] > 0
    # other processes' CPU before and during the run (its value depends on the machine's load: not asserted)
    assert summary["attempts"] == 1 and summary["cpu_other_cores"] >= 0 and summary["cpu_other_cores_before"] >= 0
    assert isinstance(summary["disturbed"], bool) and summary["disturbed_bound_cores"] == 0.05
    # the legs around the engines, measured per request: arrival -> dispatch, prefill end -> the client
    assert 0 < summary["dispatch_latency_mean_s"] < 5 and 0 < summary["delivery_latency_mean_s"] < 5
    requests = pd.read_parquet(out / "requests.parquet")
    assert len(requests) == n and requests["e2e_latency_s"].notna().all()
    assert (requests["dispatch_s"] >= requests["arrival_s"]).all()
    steps = pd.read_parquet(out / "steps.parquet")  # every engine step, for the in-situ profile
    # every request prefilled (two that arrive together can share one prefill step)
    assert set(steps["instance_id"]) <= {0, 1} and steps.loc[steps["kind"] == "prefill", "batch_size"].sum() >= n
    assert (steps["end_s"] > steps["start_s"]).all() and steps["batch_size"].min() >= 1
    profile = CliRunner().invoke(llumnix_cli, ["insitu-profile", "--steps", str(out / "steps.parquet"),
                                               "--base", "cpu-tiny", "-o", str(tmp_path / "insitu.json")])
    assert profile.exit_code == 0, profile.output
    sim = CliRunner().invoke(llumnix_cli, ["simulate", "--trace", str(tmp_path / "trace.csv"), "--instances", "2",
                                           "--profile", str(tmp_path / "insitu.json"), "--latencies-from",
                                           str(out / "summary.json"), "--out", str(tmp_path / "twin")])
    assert sim.exit_code == 0, sim.output
    assert json.loads((tmp_path / "twin" / "summary.json").read_text())["finished"] == n
    assert "llumnix serve: 2 x torch instances" in (out / "serve.log").read_text()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA to fail on purpose")
def test_a_server_that_fails_to_start_is_cleaned_up(tmp_path: Path):
    config = RealClusterConfig(instances=2, device="cuda", startup_timeout_s=120)  # starts Ray, then cannot place
    server = ServeProcess(config, tmp_path / "serve.log")
    with pytest.raises(RuntimeError, match="exited with code"):
        server.__enter__()
    assert server._spawned  # Ray had started
    assert_nothing_left(server)


def test_frontend_completes_100_concurrent_requests_without_loss():
    import ray

    from llumnix.bench.load import load_test
    from llumnix.runtime.frontend import init_ray

    init_ray(None, num_cpus=2, log_to_driver=False)
    try:
        row = load_test(100, instances=2, speed=4.0)
    finally:
        ray.shutdown()
    assert row["completed"] == 100 and row["lost"] == 0 and row["errors"] == 0, row["error_examples"]
    assert row["frontend_finished"] == 100 and row["instance_requests_after"] == 0 and row["kv_blocks_held_after"] == 0
    assert row["dispatch_count"] == 100 and row["dispatch_mean_ms"] > row["decision_mean_ms"] > 0
    assert row["ok"]


def test_the_vllm_backend_has_its_own_runs_data_and_figure(tmp_path: Path):
    """``--config backend=vllm``: real runs on vLLM engines in their own runtime folder (no simulated twin), the same
    KV capacity in vLLM's 32-token blocks, their own data and figure names; the torch command line is unchanged."""
    from llumnix.analysis.workflow import all_targets

    exp = load_experiment(write_experiment(tmp_path, REAL))
    torch_args = real_cluster_args(exp, "L-L", "llumnix", "1")
    vllm_args = real_cluster_args(exp, "L-L", "llumnix", "1", backend="vllm", vllm_python="/opt/v/bin/python")
    assert "--backend" not in torch_args and "--num-blocks 32" in torch_args
    assert "--backend vllm --vllm-python /opt/v/bin/python" in vllm_args and "--num-blocks 16" in vllm_args
    files = real_run_files(exp, "quick", backend="vllm")
    assert len(files) == 2 and all(f.endswith("/s0/real-vllm/summary.json") for f in files)
    assert "results/figures/real-vllm.png" in all_targets({"real": exp}, with_claims=False, backend="vllm")
    assert "results/figures/real.png" in all_targets({"real": exp}, with_claims=False)
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True)
        (tmp_path / f).write_text(json.dumps({m: 1.0 for m in COMPARED_METRICS} | {"engine": "vLLM 0.32.0"}))
    data = real_vs_sim_table(exp, "quick", tmp_path, backend="vllm")
    assert set(data["runtime"]) == {"real-vllm"} and len(data) == 2
    assert all(p.stat().st_size > 1000 for p in plot_real_vs_sim(exp, data, tmp_path / "fig" / "real-vllm.png"))
    with pytest.raises(ValueError, match="make install-vllm"):
        RealClusterConfig(backend="vllm", python=str(tmp_path / "no-python"))
    assert set(REAL_BACKENDS) == set(BACKENDS)  # every engine the supervisor serves has a runtime folder


# -- other processes' CPU: disturbed runs (llumnix.runtime.cpuload; fake runs, nothing measured on this machine) ------
def _fake_attempts(monkeypatch, other_cpu_s: list[float], wall_s: float = 80.0) -> list[int]:
    """``run_real_cluster``'s attempts replaced by fakes during which other processes use ``other_cpu_s[i]``."""
    import llumnix.analysis.realrun as realrun
    from llumnix.runtime.replay import ReplayResult

    served = []

    def serve(trace_path, trace, out_dir, *args):
        served.append(len(served))
        extra = {"cpu_other_s": other_cpu_s[len(served) - 1], "cpu_count": 2, "attempt": len(served)}
        steps = pd.DataFrame({"instance_id": [0], "start_s": [0.0], "end_s": [0.1]})
        return ReplayResult([], [], [], [], wall_s, 0.0), extra, steps

    def write(result, out_dir, extra):
        summary = {**extra, "requests": 1, "finished": 1, "wall_s": result.wall_s}
        (out_dir / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(realrun, "_serve_and_replay", serve)
    monkeypatch.setattr(realrun, "write_replay_outputs", write)
    return served


def test_a_disturbed_real_run_is_marked_and_rerun(tmp_path: Path, monkeypatch):
    from llumnix.analysis.realrun import run_real_cluster
    from llumnix.runtime.cpuload import QuietConfig

    trace = tmp_path / "trace.csv"
    pd.DataFrame({"request_id": [0], "arrival_s": [0.0], "prompt_tokens": [8], "output_tokens": [2]}).to_csv(trace)
    served = _fake_attempts(monkeypatch, [36.0, 0.5, 0.0])  # 0.45 cores, then 0.006: the second attempt is kept
    samples = iter([0.0, 0.0, 10.0, 10.0])  # cumulative CPU of the others: quiet before both attempts
    quiet = QuietConfig(quiet_window_s=0.01, retry_disturbed=3)
    summary = run_real_cluster(trace, tmp_path / "run", RealClusterConfig(instances=2), quiet=quiet,
                               sampler=lambda: next(samples))
    assert served == [0, 1] and summary["attempt"] == 2 and summary["attempts"] == 2
    assert summary["disturbed"] is False and summary["cpu_other_cores"] == pytest.approx(0.5 / 80)
    assert summary["attempts_cpu_other_cores"] == pytest.approx([0.45, 0.5 / 80])
    assert summary["disturbed_bound_cores"] == 0.05 and summary["quiet_before"] is True
    assert (tmp_path / "run" / "steps.parquet").exists()


def test_the_real_cluster_command_warns_of_a_disturbed_run(tmp_path: Path, monkeypatch):
    trace = tmp_path / "trace.csv"
    pd.DataFrame({"request_id": [0], "arrival_s": [0.0], "prompt_tokens": [8], "output_tokens": [2]}).to_csv(trace)
    _fake_attempts(monkeypatch, [36.0, 30.0])
    args = ["real-cluster", "--trace", str(trace), "--instances", "2", "--out", str(tmp_path / "run"),
            "--no-progress", "--quiet-window", "0", "--retry-disturbed", "1", "--max-other-cores", "0.25"]
    result = CliRunner().invoke(llumnix_cli, args)
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if line.startswith("WARNING")]
    assert warning == ["WARNING: disturbed run: other processes took 0.38 of the 2 cores during the replay (bound "
                       "0.25), so its latencies measure the machine's load, not the cluster's; rerun it on a quiet "
                       "machine (or with --retry-disturbed N) (2 attempts, all disturbed)"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["disturbed"] and summary["attempts"] == 2 and summary["disturbed_bound_cores"] == 0.25
    _fake_attempts(monkeypatch, [36.0])
    quiet = CliRunner().invoke(llumnix_cli, [*args[:-4], "--max-other-cores", "0.5"])
    assert quiet.exit_code == 0 and "WARNING" not in quiet.output
