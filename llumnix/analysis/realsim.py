"""The real serving cluster next to its simulated twin (experiment kind ``real``, ``experiments/real_cluster.yaml``).

One run of the experiment is a trace served twice by the same system (dispatch + migration policy):

- **real**: ``llumnix real-cluster`` (:mod:`llumnix.analysis.realrun`) starts ``llumnix serve`` (Ray instance actors
  running the torch engine, the HTTP frontend) as a subprocess on a free port (:mod:`llumnix.runtime.supervisor`),
  replays the trace against it with ``llumnix replay``'s client and stops it again, leaving no Ray process behind,
  also when something fails;
- **sim**: ``llumnix simulate`` with a step-time profile of the same engine measured on the same machine with the
  same KV pool and thread setting (``llumnix profile``, rule ``real_profile``), while as many other instances as the
  cluster has run beside it (``--concurrent-instances``): on a CPU the instances share the cores, and a profile of one
  instance alone makes every simulated step several times too fast;
- **sim-alone**: the same simulation with a profile of one instance alone, for reference (what the sharing costs);
- **sim-insitu**: the same simulation with what the real run measured around the scheduling model: an in-situ
  profile fitted to the steps its instances ran, with their slowdown when several step at once
  (``llumnix insitu-profile``, :mod:`llumnix.bench.insitu`), and its mean per-request dispatch and delivery
  latencies (``llumnix simulate --latencies-from``). Its error is the scheduling model's and the step-time noise's.

All write the same tables (``requests.parquet``, ``summary.json``, ...); :func:`real_vs_sim_table` puts them side by
side with the simulator's relative error on the latencies, :mod:`llumnix.analysis.figures.real_vs_sim` draws them.

A real run during which other processes took more than a small share of the cores is *disturbed*
(:mod:`llumnix.runtime.cpuload`): its latencies measure the machine's load, not the cluster. Every row of such a run
(the real one and its twins, whose errors are measured against it) carries ``disturbed``; :func:`error_summary` and
the figure's errors leave those runs out, and the figure hatches them.

Traces are a paper workload with lengths scaled down and capped (:func:`cap_lengths`): a small model with a small KV
pool on a CPU must be able to hold every request, and a run must take minutes, not hours.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import numpy as np
import pandas as pd

from llumnix.analysis.experiments import RUN_DIR, Experiment, expand_runs, fmt_number, run_metadata
from llumnix.fields import default_of
from llumnix.runtime.cpuload import QuietConfig, disturbance
from llumnix.runtime.vllm_model import VLLM_CPU_BLOCK_MULTIPLE

# Output layout (relative to the workflow's working directory). Capped traces get their own name so that the generic
# trace rule (uncapped lengths) never claims them; the runtime (RUNTIMES) is the last folder of a run.
REAL_TRACE_FILE = "results/traces/{scale}/{experiment}/{trace}/r{rate}_s{seed}_capped.parquet"
REAL_RUN_DIR = RUN_DIR + "/{runtime}"
PROFILE_FILE = "results/profiles/{experiment}_{sharing}.json"
# Simulated runtimes and the profile each uses: 'shared' is measured beside the cluster's other instances, 'alone' not.
SIM_PROFILES = {"sim": "shared", "sim-alone": "alone"}
# The in-situ twin: its profile is fitted to the real run's steps on top of the 'alone' profile.
INSITU = "sim-insitu"
INSITU_PROFILE = "insitu_profile.json"  # in the real run's folder
SIM_RUNTIMES = (INSITU, *SIM_PROFILES)
RUNTIMES = ("real", *SIM_RUNTIMES)
# Engines a real run can serve with (``llumnix serve --backend``) and the runtime folder of their real runs. A vLLM run
# has no simulated twin: there is no step-time profile of vLLM's engine, so its figure shows the real cluster alone.
REAL_BACKENDS = {"torch": "real", "vllm": "real-vllm"}
VLLM_BLOCK_SIZE = VLLM_CPU_BLOCK_MULTIPLE  # vLLM's CPU attention's block size (the torch engine: the experiment's)
VLLM_PYTHON = ".venv-vllm/bin/python"  # `make install-vllm`
COMPARED_METRICS = ("prefill_mean_s", "prefill_p99_s", "e2e_mean_s", "e2e_p99_s")
RUN_KEY = ["trace", "rate", "system_id", "seed"]  # the columns that tell one run (of every runtime) from another


# -- traces ---------------------------------------------------------------------------------------------------------
def cap_lengths(
    trace: pd.DataFrame, length_scale: float, max_prompt_tokens: int, max_output_tokens: int
) -> pd.DataFrame:
    """The trace with every prompt and output length multiplied by ``length_scale`` and clipped to [1, max]: the
    shape of the heavy tail is kept up to the caps, arrivals are untouched."""
    if length_scale <= 0 or max_prompt_tokens < 1 or max_output_tokens < 1:
        raise ValueError("length_scale must be > 0 and the caps >= 1")
    out = trace.copy()
    for col, cap in (("prompt_tokens", max_prompt_tokens), ("output_tokens", max_output_tokens)):
        out[col] = np.clip(np.rint(trace[col].to_numpy() * length_scale), 1, cap).astype(np.int64)
    return out


# -- command lines for the workflow ---------------------------------------------------------------------------------
def real_spec(exp: Experiment):
    """The experiment's ``real:`` settings; ValueError unless it is of kind real."""
    if exp.kind != "real" or exp.real is None:
        raise ValueError(f"experiment {exp.name} is not of kind 'real'")
    return exp.real


def capped_trace_args(exp: Experiment, trace: str, rate: str, seed: str, scale: str) -> str:
    """``llumnix capped-trace`` options (without -o): the generic trace options plus the experiment's caps."""
    from llumnix.analysis.experiments import trace_args

    r = real_spec(exp)
    caps = ["--length-scale", fmt_number(r.length_scale), "--max-prompt-tokens", str(r.max_prompt_tokens),
            "--max-output-tokens", str(r.max_output_tokens)]  # fmt: skip
    return trace_args(exp, trace, rate, seed, scale) + " " + shlex.join(caps)


def profile_args(exp: Experiment, sharing: str) -> str:
    """``llumnix profile`` options (without -o): the engine, KV pool and threads the real instances use. ``shared``:
    on a CPU, measured while the cluster's other instances run beside it (they share the cores), with more repeats
    against the noise of that sharing; ``alone``: one instance by itself."""
    if sharing not in SIM_PROFILES.values():
        raise ValueError(f"sharing must be one of {sorted(SIM_PROFILES.values())}, got {sharing!r}")
    r = real_spec(exp)
    args = [
        "--device", r.device, "--model", r.model, "--dtype", r.dtype, "--num-blocks", str(r.num_blocks),
        "--threads", str(r.torch_threads), "--name", f"{exp.name}-{r.device}-{r.model}-{sharing}",
    ]  # fmt: skip
    if sharing == "shared" and r.device == "cpu":
        args += ["--concurrent-instances", str(exp.instances), "--repeats", "5"]
    return shlex.join(args)


def backend_blocks(exp: Experiment, backend: str) -> int:
    """KV blocks per instance: the experiment's, or for vLLM (blocks of 32 tokens) as many as hold the same tokens."""
    r = real_spec(exp)
    if backend == "vllm":
        return math.ceil(r.num_blocks * r.block_size / VLLM_BLOCK_SIZE)
    return r.num_blocks


def real_cluster_args(
    exp: Experiment, trace: str, system_id: str, seed: str, backend: str = "torch", vllm_python: str = VLLM_PYTHON
) -> str:
    """``llumnix real-cluster`` options (without --trace / --out) for one run."""
    r = real_spec(exp)
    _, s, _ = exp.resolve_system(system_id)
    args = [
        "--policy", s.policy, "--instances", str(exp.instances), "--model", r.model, "--device", r.device,
        "--dtype", r.dtype, "--num-blocks", str(backend_blocks(exp, backend)), "--torch-threads", str(r.torch_threads),
        "--num-cpus-per-instance", fmt_number(r.num_cpus_per_instance),
        "--migration-threshold", fmt_number(exp.migration_threshold(trace, s)), "--seed", str(int(seed)),
        "--max-other-cores", fmt_number(r.max_other_cores), "--retry-disturbed", str(r.retry_disturbed),
    ]  # fmt: skip
    if s.policy == "llumnix" and not s.migration:
        args.append("--no-migration")
    if s.priorities:
        args.append("--priorities")
    if backend != "torch":
        args += ["--backend", backend, "--vllm-python", str(vllm_python)]
    return shlex.join([*args, "--no-progress"])


def twin_simulate_args(exp: Experiment, trace: str, system_id: str, seed: str, profile_path: str) -> str:
    """``llumnix simulate`` options (without --trace / --out): the experiment's run, with the measured profile."""
    from llumnix.analysis.experiments import simulate_args

    return simulate_args(exp.model_copy(update={"profile": profile_path}), trace, system_id, seed)


def runtimes_of(backend: str) -> tuple[str, ...]:
    """The runtimes a run of this backend has: the torch engine's real run and its simulated twins, or vLLM's real
    run alone."""
    return RUNTIMES if backend == "torch" else (REAL_BACKENDS[backend],)


def backend_experiment(name: str, backend: str) -> str:
    """The name under which an experiment's data and figure are written for this backend (torch: its own)."""
    return name if backend == "torch" else f"{name}-{backend}"


def real_run_files(exp: Experiment, scale: str, name: str = "summary.json", backend: str = "torch") -> list[str]:
    runtimes = runtimes_of(backend)
    return [f"{run.run_dir(scale)}/{runtime}/{name}" for run in expand_runs(exp, scale) for runtime in runtimes]


# -- real vs simulated ----------------------------------------------------------------------------------------------
def relative_error(sim: float, real: float) -> float:
    """(sim - real) / real: negative when the simulator is optimistic."""
    return (sim - real) / real if real and math.isfinite(real) and math.isfinite(sim) else math.nan


def real_vs_sim_table(exp: Experiment, scale: str, root: Path | str = ".", backend: str = "torch") -> pd.DataFrame:
    """One row per run and runtime (``runtimes_of(backend)``): the run's metadata and its summary; simulated rows carry
    the simulator's relative error on each compared metric (``rel_error_<metric>``) against the real row of the run."""
    from llumnix.analysis.aggregate import flatten_summary, read_summary

    rows = []
    for run in expand_runs(exp, scale):
        meta = run_metadata(exp, run, scale)
        by_runtime = {}
        for runtime in runtimes_of(backend):
            summary = flatten_summary(read_summary(Path(root) / run.run_dir(scale) / runtime / "summary.json"))
            by_runtime[runtime] = {**meta, **{k: v for k, v in summary.items() if k not in meta}, "runtime": runtime}
        real = by_runtime[REAL_BACKENDS[backend]]
        for runtime in [r for r in SIM_RUNTIMES if r in by_runtime]:
            for metric in COMPARED_METRICS + ("decode_mean_s",):
                sim = by_runtime[runtime]
                sim[f"rel_error_{metric}"] = relative_error(sim.get(metric, math.nan), real.get(metric, math.nan))
        rows += list(by_runtime.values())
    if not rows:
        raise ValueError(f"experiment {exp.name} has no runs at scale {scale}")
    return mark_disturbed(pd.DataFrame(rows))


def mark_disturbed(data: pd.DataFrame) -> pd.DataFrame:
    """The table with ``cpu_other_cores``, ``disturbed`` and ``disturbed_bound_cores`` on its real rows (from
    ``cpu_other_s`` over ``wall_s`` and the default bound where a run's summary predates them), and every row's
    ``disturbed`` set to its run's real row's: a twin of a disturbed run is compared against the machine's load."""
    out = data.copy()
    for col in ("cpu_other_cores", "disturbed", "disturbed_bound_cores"):
        if col not in out:
            out[col] = math.nan
    out["disturbed"] = out["disturbed"].astype(object)
    real = out["runtime"].isin(list(REAL_BACKENDS.values()))
    missing = real & out["disturbed"].isna()
    if missing.any() and {"cpu_other_s", "wall_s"} <= set(out):
        bound = default_of(QuietConfig, "max_other_cores")
        found = [disturbance(float(c), float(w), bound) for c, w in out.loc[missing, ["cpu_other_s", "wall_s"]].values]
        out.loc[missing, "cpu_other_cores"] = [f.other_cores for f in found]
        out.loc[missing, "disturbed"] = [f.disturbed for f in found]
        out.loc[missing, "disturbed_bound_cores"] = bound
    flags = out.loc[real].set_index(RUN_KEY)["disturbed"].map(_truthy)
    flags = flags[~flags.index.duplicated()]
    out["disturbed"] = flags.reindex(pd.MultiIndex.from_frame(out[RUN_KEY])).fillna(False).astype(bool).to_numpy()
    return out


def _truthy(value) -> bool:
    """A flag as pandas may hold it: a bool, nan (unknown: not disturbed) or, read back from CSV, a string."""
    return str(value).strip().lower() in ("true", "1", "1.0")


def disturbed_runs(data: pd.DataFrame) -> pd.DataFrame:
    """The real rows of disturbed runs: which run, and the cores other processes took against the bound."""
    data = data if "disturbed" in data and "cpu_other_cores" in data else mark_disturbed(data)
    real = data[data["runtime"].isin(list(REAL_BACKENDS.values())) & data["disturbed"].map(_truthy)]
    return real[["system_label", *RUN_KEY, "cpu_other_cores", "disturbed_bound_cores"]]


def error_summary(data: pd.DataFrame) -> pd.DataFrame:
    """The simulator's relative error per system and compared metric, mean over the runs (seeds, traces, rates) that
    were not disturbed (:func:`disturbed_runs` lists those left out); nan for a system with no other run."""
    data = data if "disturbed" in data else mark_disturbed(data)
    sim = data[data["runtime"] == INSITU]
    cols = [f"rel_error_{m}" for m in COMPARED_METRICS]
    order = list(dict.fromkeys(sim["system_label"]))
    return sim[~sim["disturbed"].map(_truthy)].groupby("system_label", sort=False)[cols].mean().reindex(order)


def backend_of(data: pd.DataFrame) -> str:
    """The engine of the real runs in a real-vs-sim table."""
    runtimes = set(data["runtime"])
    return next((b for b, runtime in REAL_BACKENDS.items() if runtime in runtimes), "torch")


__all__ = [
    "COMPARED_METRICS",
    "PROFILE_FILE",
    "REAL_RUN_DIR",
    "REAL_TRACE_FILE",
    "INSITU",
    "INSITU_PROFILE",
    "REAL_BACKENDS",
    "RUN_KEY",
    "RUNTIMES",
    "SIM_PROFILES",
    "SIM_RUNTIMES",
    "backend_blocks",
    "backend_experiment",
    "backend_of",
    "cap_lengths",
    "capped_trace_args",
    "disturbed_runs",
    "error_summary",
    "mark_disturbed",
    "profile_args",
    "real_cluster_args",
    "real_spec",
    "real_run_files",
    "runtimes_of",
    "real_vs_sim_table",
    "relative_error",
    "twin_simulate_args",
]
