"""The Snakemake workflow end to end on tiny experiments, in a temporary working directory.

The repository's Snakefile runs with ``--directory tmp --config experiments_dir=tmp/experiments``: every rule
(trace, simulate, aggregate, timeline, measurements, plot, claims) runs for real on a few dozen requests.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = REPO / "Snakefile"

pytestmark = pytest.mark.slow

SYSTEMS = {
    "infaas++": {"policy": "infaas++", "label": "INFaaS++"},
    "llumnix": {"policy": "llumnix", "label": "Llumnix"},
}
AUTOSCALE = {"scale_up": 10, "scale_down": 60, "min_instances": 1, "max_instances": 3, "initial_instances": 2}

TINY = {
    "serve": {
        "name": "serve",
        "title": "tiny serving",
        "paper": "Llumnix is faster",
        "figure": {"kind": "lines", "metrics": ["prefill_mean_s", "e2e_p99_s"]},
        "instances": 2,
        "traces": {"S-S": {"workload": "S-S", "rates": [2, 4, 6]}},
        "systems": SYSTEMS,
        "scales": {"quick": {"num_requests": 40, "seeds": 2, "rates": "extremes"}, "paper": {"num_requests": 80}},
    },
    "frag": {
        "name": "frag",
        "title": "tiny fragmentation",
        "paper": "less fragmentation",
        "figure": {"kind": "timeline"},
        "instances": 2,
        "traces": {"M-M": {"workload": "M-M", "rates": [3]}},
        "systems": SYSTEMS,
        "scales": {"quick": {"num_requests": 40}, "paper": {"num_requests": 80}},
    },
    "sweep": {
        "name": "sweep",
        "title": "tiny threshold sweep",
        "paper": "cheaper",
        "figure": {"kind": "tradeoff", "x": "avg_instances", "y": "prefill_p99_s"},
        "instances": 2,
        "traces": {"L-L": {"workload": "L-L", "arrival": "gamma", "cv": 2, "rates": [1]}},
        "systems": {k: {**v, "autoscale": AUTOSCALE} for k, v in SYSTEMS.items()},
        "sweep": {"param": "scale_up", "values": [5, 45], "offsets": {"scale_down": 50}},
        "scales": {"quick": {"num_requests": 30}, "paper": {"num_requests": 80}},
    },
    "bench": {
        "name": "bench",
        "title": "tiny measurements",
        "paper": "constant downtime",
        "kind": "measurement",
        "measurements": "results/bench/measurements.csv",
        "figure": {"kind": "bench", "x": "seq_len", "y": "downtime_ms", "hue": "method"},
    },
    "absent": {
        "name": "absent",
        "title": "measurements not taken yet",
        "paper": "n/a",
        "kind": "measurement",
        "measurements": "results/absent/measurements.csv",
        "pending": "a benchmark nobody ran",
        "figure": {"kind": "bench", "x": "instances", "y": "stall_ms", "hue": "design"},
    },
}

CLAIM = {
    "figure": "Fig T",
    "claim": "prefill",
    "experiment": "serve",
    "kind": "speedup",
    "metric": "prefill_mean_s",
    "baseline": "infaas++",
    "system": "llumnix",
    "over": "max",
    "paper": 2.0,
    "paper_text": "2x",
    "reproduced": {"min": 1.5},
    "partly": {"min": 1.0},
}
CLAIMS = {
    "claims": [
        {**CLAIM, "id": "serve-prefill"},
        {**CLAIM, "id": "bench-downtime", "experiment": "bench", "kind": "value", "metric": "downtime_ms",
         "compare": "method", "baseline": None, "pair_on": ["seq_len"], "paper": 20, "unit": "ms",
         "reproduced": {"max": 30}, "partly": {"max": 100}},
        {**CLAIM, "id": "absent-stall", "experiment": "absent", "kind": "value", "metric": "stall_ms",
         "baseline": None, "compare": "design", "system": "llumlet", "paper": 0, "reproduced": {"max": 1},
         "partly": {"max": 5}},
    ]
}  # fmt: skip


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir),
        "--config", f"experiments_dir={workdir / 'experiments'}", *args,
    ]  # fmt: skip
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        pytest.fail(
            f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def write_experiments(workdir: Path, experiments: dict, claims: dict | None = CLAIMS) -> None:
    exp_dir = workdir / "experiments"
    exp_dir.mkdir(parents=True, exist_ok=True)
    for name, data in experiments.items():
        (exp_dir / f"{name}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    if claims is not None:
        (exp_dir / "claims.yaml").write_text(yaml.safe_dump(claims, sort_keys=False))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A workdir in which the whole tiny workflow has run once."""
    workdir = tmp_path_factory.mktemp("workflow")
    write_experiments(workdir, TINY)
    measurements = workdir / "results" / "bench" / "measurements.csv"
    measurements.parent.mkdir(parents=True)
    pd.DataFrame(
        {"seq_len": [256, 256, 1024, 1024], "method": ["recompute", "llumnix"] * 2, "downtime_ms": [58, 12, 220, 14]}
    ).to_csv(measurements, index=False)
    proc = snakemake(workdir, "--cores", "2")
    assert "absent: skipped, no measurements" in proc.stderr
    return workdir


def test_data_has_one_row_per_run_with_its_summary(finished):
    data = pd.read_csv(finished / "results/serve/data.csv")
    assert len(data) == 2 * 2 * 2  # rates 2 and 6 (extremes), two systems, two seeds
    assert set(data["rate"]) == {2.0, 6.0} and set(data["seed"]) == {0, 1}
    assert (data["finished"] == 40).all() and (data["num_requests"] == 40).all()
    for col in ("prefill_mean_s", "prefill_p99_s", "e2e_p99_s", "preemption_loss_s", "avg_instances"):
        assert data[col].notna().all(), col
    sweep = pd.read_csv(finished / "results/sweep/data.csv")
    assert sorted(sweep["system_id"]) == sorted(
        ["infaas++-scale-up5", "llumnix-scale-up5", "infaas++-scale-up45", "llumnix-scale-up45"]
    )
    assert set(zip(sweep["scale_up"], sweep["scale_down"], strict=True)) == {(5, 55), (45, 95)}
    timeline = pd.read_csv(finished / "results/frag/timeline.csv")
    assert {"time_s", "fragmentation", "system"} <= set(timeline.columns) and len(timeline) > 2


def test_figures_exist(finished):
    for name in ("serve", "frag", "sweep", "bench"):
        for suffix in ("pdf", "png"):
            path = finished / f"results/figures/{name}.{suffix}"
            assert path.stat().st_size > 1000, path
    assert not (finished / "results/figures/absent.png").exists()


def test_claims_are_computed_from_the_data(finished):
    claims = pd.read_csv(finished / "results/claims.csv").set_index("id")
    data = pd.read_csv(finished / "results/serve/data.csv")
    wide = data.pivot_table(index=["seed", "rate"], columns="system", values="prefill_mean_s")
    per_seed = (wide["infaas++"] / wide["llumnix"]).groupby("seed").max()
    row = claims.loc["serve-prefill"]
    assert row["ours_mean"] == pytest.approx(per_seed.mean())
    assert row["ours_min"] == pytest.approx(per_seed.min()) and row["ours_max"] == pytest.approx(per_seed.max())
    assert row["seeds"] == 2 and row["scale"] == "quick, 40 req/run, 2 seeds"
    expected = "reproduced" if per_seed.mean() >= 1.5 else "partly" if per_seed.mean() >= 1.0 else "not reproduced"
    assert row["verdict"] == expected
    assert claims.loc["bench-downtime", "ours_mean"] == 14 and claims.loc["bench-downtime", "verdict"] == "reproduced"
    assert claims.loc["absent-stall", "verdict"] == "not run" and math.isnan(claims.loc["absent-stall", "ours_mean"])
    md = (finished / "results/claims.md").read_text()
    assert "| prefill | Fig T | 2x |" in md and "**not run**" in md


def test_rerun_with_nothing_changed_does_nothing(finished):
    proc = snakemake(finished, "--cores", "2", "--dry-run")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def job_counts(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """The 'Job stats' table of a (dry) run: rule -> number of jobs."""
    counts: dict[str, int] = {}
    lines = (proc.stdout + proc.stderr).splitlines()
    if "Job stats:" not in lines:
        return counts
    for line in lines[lines.index("Job stats:") + 3 :]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def test_a_missing_run_is_redone_alone(finished):
    # As after an interruption before aggregation: one run and everything downstream of it are missing.
    run = finished / "results/runs/quick/serve/S-S/r6/llumnix/s1"
    for path in (run / "summary.json", finished / "results/serve/data.csv"):
        path.unlink()
    counts = job_counts(snakemake(finished, "--cores", "2", "--dry-run", "--quiet", "rules"))
    assert counts == {"simulate": 1, "aggregate": 1, "plot_serve": 1, "claims": 1, "all": 1}
    snakemake(finished, "--cores", "2")
    assert (run / "summary.json").exists()


# A sitecustomize on the interrupted workflow's PYTHONPATH: each `llumnix simulate` process first takes a token file
# from $GATE (waiting, and saying so, while there is none). The test hands out two tokens, so exactly two runs finish
# and the third is in flight, waiting, when Ctrl-C comes: no race with the runs' speed.
GATE_HOOK = """import os, sys, time


def _take(gate):
    for name in sorted(os.listdir(gate)):
        if name.startswith("token-"):
            try:
                os.rename(os.path.join(gate, name), os.path.join(gate, f"taken-{name}-{os.getpid()}"))
                return True
            except OSError:  # taken by another run meanwhile
                pass
    return False


if os.path.basename(sys.argv[0]) == "llumnix" and sys.argv[1:2] == ["simulate"]:
    while not _take(os.environ["GATE"]):
        open(os.path.join(os.environ["GATE"], f"waiting-{os.getpid()}"), "w").close()
        time.sleep(0.05)
"""


def test_interrupted_workflow_resumes(tmp_path):
    write_experiments(tmp_path, {"serve": TINY["serve"]}, claims=None)
    gate, hook = tmp_path / "gate", tmp_path / "hook"
    gate.mkdir()
    hook.mkdir()
    for i in range(2):
        (gate / f"token-{i}").touch()
    (hook / "sitecustomize.py").write_text(GATE_HOOK)
    cmd_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]), "GATE": str(gate)}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(tmp_path), "--config",
           f"experiments_dir={tmp_path / 'experiments'}", "--cores", "1"]  # fmt: skip
    # its own process group, so that Ctrl-C reaches the workflow and its jobs at once, as from a terminal; SIGINT
    # handled by default there even where this test runs with it ignored (a background job of a script, as CI may)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cmd_env,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    runs = tmp_path / "results/runs/quick/serve"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not (
        len(list(runs.glob("**/summary.json"))) == 2 and any(gate.glob("waiting-*"))
    ):
        time.sleep(0.1)
    assert proc.poll() is None, "the workflow ended before its third run"
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C while the third run is in flight
    proc.wait(timeout=120)
    assert len(list(runs.glob("**/summary.json"))) == 2
    counts = job_counts(snakemake(tmp_path, "--cores", "2", "--dry-run", "--quiet", "rules"))
    assert counts["simulate"] == 6  # the two finished runs are kept; the interrupted one is redone with the rest
    snakemake(tmp_path, "--cores", "2")
    assert len(pd.read_csv(tmp_path / "results/serve/data.csv")) == 8


def test_report_builds(finished):
    snakemake(finished, "--cores", "1", "--report", str(finished / "results/report.html"))
    html = (finished / "results/report.html").read_text(errors="replace")
    assert "serve" in html and len(html) > 10_000


def test_invalid_experiment_fails_naming_the_field(tmp_path):
    bad = {**TINY["serve"], "traces": {"S-S": {"workload": "S-S", "rates": [2], "arival": "gamma"}}}
    write_experiments(tmp_path, {"serve": bad}, claims=None)
    proc = snakemake(tmp_path, "--cores", "1", "--dry-run", check=False)
    assert proc.returncode != 0
    assert "traces.S-S.arival" in proc.stdout + proc.stderr


def test_failed_run_names_the_run_and_the_reason(tmp_path):
    broken = {
        **TINY["serve"],
        "profile": "no-such-profile",
        "scales": {"quick": {"num_requests": 5}, "paper": {"num_requests": 5}},
    }
    broken["traces"] = {"S-S": {"workload": "S-S", "rates": [2]}}
    write_experiments(tmp_path, {"serve": broken}, claims=None)
    proc = snakemake(tmp_path, "--cores", "1", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "results/logs/quick/simulate/serve/S-S/r2/" in text  # the log of the failed run
    assert "no-such-profile" in text  # its reason, shown from the log
