"""Fig 10: the cost of moving a running request between two real engine instances, by sequence length.

Two ``EngineInstance`` objects around ``TorchExecutor``s with the same weights. With the ``device`` / ``host``
transports both share one process and one device; with ``gloo`` / ``nccl`` the destination's model and KV pool live in
a child process (``llumnix.bench.worker``; NCCL: on the next GPU) and every stage's KV crosses a torch.distributed
channel between the two processes. For each sequence length the benchmark measures, on the same request:

- ``recompute_s``: prefill of the request's whole sequence (migration by recompute pays this);
- ``blocking_copy_s``: the request stopped and all its KV blocks copied to the destination in one go;
- ``downtime_s``: live multi-stage migration (``migrate_in_process``): the stop-and-copy stage, freeze to commit;
- ``decode_step_s`` / ``decode_step_migrating_s``: the source's decode step without / while a migration is in flight;
- ``token_identical``: the migrated request's whole output equals the same request's output without migration.

A request of ``seq_len`` tokens has a prompt of ``seq_len - output_tokens`` tokens, so its whole sequence fits the
model's position limit; it migrates after ``steps_before`` decode steps, holding ``kv_tokens`` tokens of KV.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from llumnix.bench.worker import WorkerExecutor, WorkerSpec
from llumnix.core.block_manager import blocks_for
from llumnix.core.local_scheduler import StepKind
from llumnix.core.migration import MigrationConfig, MigrationPhase
from llumnix.core.migration_protocol import Copy
from llumnix.core.request import Request
from llumnix.engine.device import deterministic_kernels, device_name, nccl_version, torch_threads
from llumnix.engine.executor import Executor, TorchExecutor
from llumnix.engine.kv_transfer import (
    CHUNK_BLOCKS,
    POOL_MODES,
    KVTransfer,
    PacedCopy,
    PendingCopy,
    Polled,
    PoolTransfer,
    check_copy,
    chunk_of,
)
from llumnix.engine.runner import SeqInput
from llumnix.runtime.instance import EngineInstance, migrate_in_process

log = logging.getLogger(__name__)

TRANSPORTS = POOL_MODES  # both instances in this process (PoolTransfer)
PROCESS_TRANSPORTS = ("gloo", "nccl")  # the destination in a child process, KV over a torch.distributed channel
TRANSPORT_NOTES = {
    "device": "KV gathered and scattered within the one device",
    "host": "KV staged through pinned host memory (device->host->device), the PCIe legs of a cross-GPU migration",
    "gloo": "KV sent over a torch.distributed gloo channel (CPU tensors over TCP loopback; on GPUs also "
            "device->host and host->device)",
    "nccl": "KV sent GPU to GPU over a torch.distributed NCCL channel",
}


@dataclass(frozen=True)
class MigrationBenchConfig:
    device: str = "cpu"
    model: str = "tiny"
    dtype: str = "float32"
    lengths: tuple[int, ...] = (64, 128, 256, 512, 1024)
    num_blocks: int | None = None  # per instance; None sizes the pool for the longest length
    block_size: int = 16
    repeats: int = 3
    warmup: int = 1  # discarded repeats per length (kernel selection, allocator growth, pinned buffers)
    batch: int = 1  # decode batch on the source: the migrated request plus batch - 1 background requests
    background_tokens: int = 64
    output_tokens: int | None = None  # None: 8, or as many as the migrations need (min_output_tokens)
    steps_before: int = 2  # decode steps of the request on the source before its migration starts
    steps_per_stage: int = 1
    migrations: int = 1  # per repeat: the request migrates there and back this many times (more samples)
    steps_between: int = 2  # decode steps on the new owner before it migrates the request on
    last_stage_max_blocks: int = 2
    transports: tuple[str, ...] = ("device",)
    chunk_blocks: int | None = CHUNK_BLOCKS  # blocks a non-final stage copies per source step (None: all)
    channel_timeout_s: float = 120.0  # gloo / nccl: a transfer (or the child's answer) taking longer fails the run
    seed: int = 0
    cpu_threads: int | None = 1  # torch intra-op threads on CPU; 1 keeps timings stable on a shared, busy machine
    invariant_batch: int | None = None  # both engines' batch-invariant decoding (ModelRunner), in chunks of this many

    def __post_init__(self) -> None:
        if not self.lengths:
            raise ValueError("--lengths must name at least one sequence length")
        if self.chunk_blocks is not None and self.chunk_blocks < 1:
            raise ValueError(f"--chunk-blocks must be >= 1 (0: a stage in one go), got {self.chunk_blocks}")
        if self.output_tokens is None:
            object.__setattr__(self, "output_tokens", max(8, self.min_output_tokens))
        if min(self.lengths) <= self.output_tokens:
            raise ValueError(f"every length must exceed --output-tokens ({self.output_tokens}), got {self.lengths}")
        for name in ("repeats", "batch", "background_tokens", "output_tokens", "steps_per_stage"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.invariant_batch is not None and self.invariant_batch < 1:
            raise ValueError(f"invariant_batch must be >= 1 rows, got {self.invariant_batch}")
        if self.warmup < 0 or self.steps_before < 0:
            raise ValueError("warmup and steps_before must be >= 0")
        if self.migrations < 1 or self.steps_between < 0:
            raise ValueError("migrations must be >= 1 and steps_between >= 0")
        bad = [t for t in self.transports if t not in TRANSPORTS + PROCESS_TRANSPORTS]
        if bad or not self.transports:
            raise ValueError(f"transports must be among {TRANSPORTS + PROCESS_TRANSPORTS}, got {self.transports}")
        if self.cross_process and len(self.transports) > 1:
            raise ValueError(f"a cross-process transport ({'/'.join(PROCESS_TRANSPORTS)}) puts the destination in "
                             f"another process: run it alone, not with {self.transports}")
        if "host" in self.transports and not self.device.startswith("cuda"):
            raise ValueError("the host transport stages a GPU's KV through pinned host memory: it needs --device cuda")
        if "nccl" in self.transports:
            _ = self.dst_device  # raises unless there are two GPUs
        if self.min_output_tokens > self.output_tokens:
            raise ValueError(f"output_tokens ({self.output_tokens}) must be at least {self.min_output_tokens} so the "
                             f"request still decodes after {self.migrations} migration(s)")
        if self.num_blocks is not None and self.num_blocks < self.required_blocks:
            raise ValueError(f"--num-blocks {self.num_blocks} is too small: lengths up to {max(self.lengths)} with "
                             f"batch {self.batch} need {self.required_blocks} blocks per instance")

    @property
    def cross_process(self) -> bool:
        return any(t in PROCESS_TRANSPORTS for t in self.transports)

    @property
    def dst_device(self) -> str:
        """The destination's device: the source's, except that a cross-process run on CUDA takes the next GPU (NCCL
        must: it cannot put two ranks on one GPU; gloo does when there is one)."""
        if not (self.cross_process and self.device.startswith("cuda")):
            if "nccl" in self.transports:
                raise ValueError("the nccl transport sends CUDA tensors between two GPUs: it needs --device cuda")
            return self.device
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        src = torch.device(self.device).index or 0
        if count >= 2:
            return f"cuda:{(src + 1) % count}"
        if "nccl" in self.transports:
            raise ValueError(f"the nccl transport needs two GPUs (one per process: NCCL cannot put two ranks on one "
                             f"GPU), but {count} visible; use --transports gloo")
        return self.device

    @property
    def min_output_tokens(self) -> int:
        # a paced bulk stage spans a source step per chunk
        chunks = -(-blocks_for(max(self.lengths), self.block_size) // self.chunk_blocks) if self.chunk_blocks else 0
        stage_steps = max(self.steps_per_stage, 1 + chunks if chunks > 1 else 0)
        return 1 + self.steps_before + self.migrations * (stage_steps + self.steps_between) + 2

    @property
    def background_output_tokens(self) -> int:
        # Background requests outlive the migrated one, so the batch keeps its size on both instances.
        return self.output_tokens + 4

    @property
    def required_blocks(self) -> int:
        bs = self.block_size
        need = blocks_for(max(self.lengths) + 1, bs)
        need += (self.batch - 1) * blocks_for(self.background_tokens + self.background_output_tokens + 1, bs)
        return int(np.ceil((need + 2) / 0.99)) + 1  # + the 1% admission watermark

    @property
    def pool_blocks(self) -> int:
        return self.num_blocks if self.num_blocks is not None else self.required_blocks


# -- KV transfers between two executors -----------------------------------------------------------------------------
class ChannelTransfer(KVTransfer):
    """Copies KV blocks between this process's executor and a ``WorkerExecutor`` over their channel: ``to_worker``
    pushes (the local executor is the source), else pulls (the worker is the source). A non-final stage is paced as
    ``PoolTransfer`` paces it: ``chunk_blocks`` blocks per poll (one poll per source step)."""

    def __init__(self, local: TorchExecutor, worker: WorkerExecutor, to_worker: bool,
                 chunk_blocks: int | None = CHUNK_BLOCKS) -> None:
        self.local, self.worker, self.to_worker, self.chunk_blocks = local, worker, to_worker, chunk_blocks
        self.name = worker.spec.backend

    def start(self, copy: Copy) -> PendingCopy:
        check_copy(copy)
        src_blocks, dst_blocks = list(copy.src_blocks), list(copy.dst_blocks)
        if not src_blocks:
            return PendingCopy(0)
        num_bytes = self.local.runner.kv_cache.bytes_per_block * len(src_blocks)
        return PacedCopy(num_bytes, src_blocks, dst_blocks, chunk_of(copy, self.chunk_blocks), self._issue)

    def _issue(self, src_blocks: list[int], dst_blocks: list[int]) -> Polled:
        if self.to_worker:
            poll = self.worker.push_blocks(dst_blocks, self.local.read_blocks(src_blocks))
        else:
            poll = self.worker.pull_blocks(src_blocks, lambda data: self.local.write_blocks(dst_blocks, data))
        return Polled(poll, self.synchronize)

    def synchronize(self) -> None:
        self.local.synchronize()
        self.worker.synchronize()


def blocking_copy_s(transfer: KVTransfer, dst: int, src_blocks: Sequence[int], dst_blocks: Sequence[int]) -> float:
    """Wall time of copying these blocks in one go, synchronised (the request stopped meanwhile)."""
    transfer.synchronize()
    t0 = time.perf_counter()
    transfer.start(Copy(-1, dst, 0, tuple(src_blocks), tuple(dst_blocks), True))
    transfer.synchronize()
    return time.perf_counter() - t0


# -- one repeat ------------------------------------------------------------------------------------------------------
@dataclass
class _Reference:
    tokens: list[int]
    decode_step_s: float


@dataclass
class _MigrationRun:
    tokens: list[int]
    kv_tokens: int  # at the first migration
    blocking_copy_s: float
    downtimes_s: list[float]  # one per committed migration
    stages: list[int]
    migrated_blocks: list[int]
    migrating_steps: list[float]  # the source's decode steps during non-final stages, source = ``_Bench.src``
    migrating_steps_back: list[float]  # the same with the source ``_Bench.dst`` (there and back)
    stage_per_step_s: float  # wall time of the non-final stages (steps + copy issue + sync) per source step
    aborted: str = ""  # why a migration aborted (the request then stays where it is and migrates no more); "" if none
    kv_identical: bool | None = None  # destination blocks == source blocks at every commit (checked when asked)

    @property
    def committed(self) -> bool:
        """Every migration asked for committed."""
        return not self.aborted

    def identical_to(self, ref: _Reference) -> bool:
        """At least one migration committed and the request's output is its unmigrated output (an aborted one
        leaves it decoding where it was: its tokens must not change either)."""
        return bool(self.downtimes_s) and self.tokens == ref.tokens


@dataclass
class _Bench:
    cfg: MigrationBenchConfig
    src: EngineInstance
    dst: EngineInstance
    transfers: dict[str, tuple[KVTransfer, KVTransfer]]  # transport -> (src to dst, dst to src)
    vocab_size: int
    next_id: int = 0
    next_mig_id: int = 0
    prompts: dict[tuple[int, int], list[int]] = field(default_factory=dict)

    def prompt(self, length: int, index: int) -> list[int]:
        """Deterministic prompt tokens: index 0 is the migrated request, 1.. the background requests."""
        key = (length, index)
        if key not in self.prompts:
            rng = np.random.default_rng([self.cfg.seed, length, index])
            n = length - self.cfg.output_tokens if index == 0 else self.cfg.background_tokens
            self.prompts[key] = rng.integers(0, self.vocab_size, n).tolist()
        return self.prompts[key]

    def request(self, prompt: list[int], output_tokens: int) -> Request:
        self.next_id += 1
        return Request(self.next_id, 0.0, len(prompt), output_tokens, prompt_token_ids=list(prompt))

    def add_batch(self, inst: EngineInstance, length: int, with_target: bool) -> Request | None:
        cfg = self.cfg
        target = self.request(self.prompt(length, 0), cfg.output_tokens) if with_target else None
        if target is not None:
            inst.add_request(target)
        for i in range(1, cfg.batch):
            inst.add_request(self.request(self.prompt(length, i), cfg.background_output_tokens))
        return target

    def reference(self, length: int, src: EngineInstance | None = None) -> _Reference:
        """The request (and its background batch) decoded on ``src`` (default: ``self.src``), unmigrated."""
        src = src or self.src
        target = self.add_batch(src, length, with_target=True)
        first = len(src.steps)
        while not target.finished:
            src.step()
        decode = [s.duration_s for s in src.steps[first:] if s.kind == StepKind.DECODE.value]
        src.run_until_idle()
        return _Reference(list(target.output_token_ids), statistics.fmean(decode))

    def recompute_s(self, prompt: list[int]) -> float:
        """Prefill of the whole sequence on the (idle) destination, in scratch blocks."""
        dst = self.dst
        owner = ("recompute", self.next_id)
        table = dst.blocks.allocate(owner, len(prompt))
        try:
            dst.executor.synchronize()
            t0 = time.perf_counter()
            dst.executor.run(StepKind.PREFILL, [SeqInput(list(prompt), 0, table)])
            dst.executor.synchronize()
            return time.perf_counter() - t0
        finally:
            dst.blocks.free(owner)

    def migration(self, length: int, transport: str, verify_kv: bool = False) -> _MigrationRun:
        """The request decodes on the source, is copied once in blocking mode (timed, then discarded), and migrates
        live ``cfg.migrations`` times, there and back, then finishes wherever it ended up. ``verify_kv`` compares,
        bit for bit, all the request's KV blocks on both sides before each commit (inside the downtime: untimed
        runs only)."""
        cfg, src, dst = self.cfg, self.src, self.dst
        forward, backward = self.transfers[transport]
        target = self.add_batch(src, length, with_target=True)
        self.add_batch(dst, length, with_target=False)
        while target.num_generated < 1 + cfg.steps_before:
            src.step()
        while dst.scheduler.waiting:
            dst.step()
        kv_tokens = target.seq_len

        # Blocking copy: the request takes no step while all its blocks move to scratch blocks on the destination.
        owner = ("blocking-copy", target.request_id)
        src_blocks = src.blocks.table(target.request_id)
        scratch = dst.blocks.allocate_blocks(owner, len(src_blocks))
        try:
            blocking_s = blocking_copy_s(forward, dst.instance_id, src_blocks, scratch)
        finally:
            dst.blocks.free(owner)

        downtimes, stages, blocks = [], [], []
        staged_s, staged_steps = 0.0, 0
        # the source's decode steps during non-final stages, by whether the source is src (True) or dst
        staged_decode: dict[bool, list[float]] = {True: [], False: []}
        here, there = src, dst
        aborted = ""
        kv_identical = True if verify_kv else None
        for k in range(cfg.migrations):
            if k:
                for _ in range(cfg.steps_between):
                    here.step()
            stage_log: list[tuple[bool, float, int, list[float]]] = []  # (final, seconds, source steps, decode s)
            seen = [len(here.steps)]
            moved: tuple[list[int], list[int]] = ([], [])
            transfer = forward if here is src else backward

            def on_stage(stage: Copy, elapsed_s: float, here=here, there=there, seen=seen, stage_log=stage_log,
                         moved=moved) -> None:
                nonlocal kv_identical
                during = here.steps[seen[0]:]
                stage_log.append((stage.final, elapsed_s, len(during),
                                  [st.duration_s for st in during if st.kind == StepKind.DECODE.value]))
                seen[0] = len(here.steps)
                moved[0].extend(stage.src_blocks)
                moved[1].extend(stage.dst_blocks)
                if verify_kv and stage.final:
                    kv_identical = kv_identical and same_blocks(here.executor, moved[0], there.executor, moved[1])

            self.next_mig_id += 1
            mig = migrate_in_process(
                self.next_mig_id, target, here, there,
                MigrationConfig(last_stage_max_blocks=cfg.last_stage_max_blocks),
                steps_per_stage=cfg.steps_per_stage, on_stage=on_stage, transfer=transfer,
            )
            if mig.phase is not MigrationPhase.COMMITTED:
                aborted = f"migration {k + 1} of {cfg.migrations} aborted: {mig.abort_reason}"
                if target.finished:  # its copies took more source steps than the request had tokens left
                    aborted += f" (it finished first: raise --output-tokens above {cfg.output_tokens})"
                log.warning("seq_len %d: %s", length, aborted)
                break
            downtimes.append(mig.downtime_s)
            stages.append(len(mig.stages))
            blocks.append(mig.blocks)
            for final, sec, n, decode_s in stage_log:
                if not final and n > 0:
                    staged_s += sec
                    staged_steps += n
                    staged_decode[here is src] += decode_s
            here, there = there, here
        while not target.finished:
            here.step()
        src.run_until_idle()
        dst.run_until_idle()
        return _MigrationRun(
            tokens=list(target.output_token_ids),
            kv_tokens=kv_tokens,
            blocking_copy_s=blocking_s,
            downtimes_s=downtimes,
            stages=stages,
            migrated_blocks=blocks,
            migrating_steps=staged_decode[True],
            migrating_steps_back=staged_decode[False],
            stage_per_step_s=staged_s / staged_steps if staged_steps else float("nan"),
            aborted=aborted,
            kv_identical=kv_identical,
        )


# -- the benchmark ---------------------------------------------------------------------------------------------------
def _notes(cfg: MigrationBenchConfig, transport: str) -> str:
    if cfg.cross_process:
        overlap = (f"source on {cfg.device} in this process, destination on {cfg.dst_device} in a child process "
                   "(its steps and block commands over a pipe, KV over the channel); the source keeps stepping while "
                   "the other process sends or receives a stage, and a stage has landed once that process has "
                   "written it and answered")
        if cfg.device.startswith("cuda"):
            identity = ("token_identical / kv_identical: an untimed rerun with and without migration under torch "
                        "deterministic algorithms in both processes (kv: every block bit-equal on both sides at each "
                        "commit); token_identical_timed: every timed repeat with default kernels")
        else:
            identity = ("token_identical / kv_identical: an untimed rerun with and without migration (kv: every block "
                        "bit-equal on both sides at each commit); token_identical_timed: every timed repeat")
    elif cfg.device.startswith("cuda"):
        paced = (f"a non-final stage {cfg.chunk_blocks} blocks per source step" if cfg.chunk_blocks is not None
                 else "each stage in one go")
        overlap = ("stage copies run on a side CUDA stream overlapping the source's decode steps (the source keeps "
                   f"stepping until a stage's copy lands), {paced}")
        identity = ("token_identical / kv_identical: an untimed rerun with and without migration under torch "
                    "deterministic algorithms (kv: every block bit-equal on both sides at each commit); "
                    "token_identical_timed: every timed repeat with default kernels")
    else:
        overlap = "stage copies run sequentially between decode steps (CPU: no overlap)"
        identity = ("token_identical / kv_identical: an untimed rerun with and without migration (kv: every block "
                    "bit-equal on both sides at each commit); token_identical_timed: every timed repeat")
    if cfg.cross_process and cfg.migrations >= 2:
        which = ("of the migrations from this process (decode_slowdown: over decode_step_s, the same request's steps "
                 "unmigrated in this process; the way back, with its source in the child process: "
                 "decode_step_migrating_back_s over decode_step_back_s, that process's own unmigrated steps)")
    else:
        which = "(decode_slowdown: over decode_step_s, the same request's steps unmigrated)"
    return (f"{overlap}; {TRANSPORT_NOTES[transport]}; decode_step_migrating_s = mean duration of the source's decode "
            f"steps during the non-final stages {which}; stage_per_step_s = wall time of those stages (steps + copy "
            f"issue + sync) per source step; downtime = freeze to commit of the stop-and-copy stage; "
            f"{cfg.migrations} migration(s) per repeat, there and back; {cfg.batch - 1} background requests of "
            f"{cfg.background_tokens} prompt tokens on each instance; {identity}")


def run_migration_bench(cfg: MigrationBenchConfig, progress: Callable[[Iterable], Iterable] | None = None) -> pd.DataFrame:
    """Run the benchmark; one row per (sequence length, transport), medians over ``cfg.repeats``."""
    with torch_threads(cfg.device, cfg.cpu_threads):
        return _run_migration_bench(cfg, progress)


def _run_migration_bench(cfg: MigrationBenchConfig, progress: Callable[[Iterable], Iterable] | None) -> pd.DataFrame:
    torch.manual_seed(cfg.seed)
    src_ex = TorchExecutor(cfg.model, cfg.pool_blocks, cfg.block_size, cfg.device, cfg.dtype, cfg.seed,
                           invariant_batch=cfg.invariant_batch)
    with _destination(cfg) as dst_ex:
        if src_ex.weights_fingerprint() != dst_ex.weights_fingerprint():
            raise RuntimeError("the two instances' weights differ although built from the same seed")
        if isinstance(dst_ex, WorkerExecutor):
            transfers = {cfg.transports[0]: (ChannelTransfer(src_ex, dst_ex, True, cfg.chunk_blocks),
                                             ChannelTransfer(src_ex, dst_ex, False, cfg.chunk_blocks))}
        else:
            src_pool, dst_pool = src_ex.runner.kv_cache, dst_ex.runner.kv_cache
            transfers = {t: (PoolTransfer(src_pool, {1: dst_pool}, t, cfg.chunk_blocks),
                             PoolTransfer(dst_pool, {0: src_pool}, t, cfg.chunk_blocks)) for t in cfg.transports}
        bench = _Bench(cfg, EngineInstance(0, src_ex), EngineInstance(1, dst_ex), transfers, src_ex.vocab_size)
        devices = device_name(cfg.device)
        if cfg.cross_process:
            src = str(src_ex.runner.kv_cache.cache.device)
            devices = f"{devices} [{src}] -> {dst_ex.device_name} [{cfg.dst_device}, another process]"
        return _measure(cfg, bench, devices, src_ex.runner.config.kv_bytes_per_token(getattr(torch, cfg.dtype)),
                        progress)


@contextlib.contextmanager
def _destination(cfg: MigrationBenchConfig) -> Iterator[Executor]:
    """The destination's executor: in this process, or (gloo / nccl) in a child process, closed afterwards."""
    if not cfg.cross_process:
        yield TorchExecutor(cfg.model, cfg.pool_blocks, cfg.block_size, cfg.device, cfg.dtype, cfg.seed,
                            invariant_batch=cfg.invariant_batch)
        return
    spec = WorkerSpec(cfg.model, cfg.pool_blocks, cfg.block_size, cfg.dst_device, cfg.dtype, cfg.seed,
                      backend=cfg.transports[0], timeout_s=cfg.channel_timeout_s, cpu_threads=cfg.cpu_threads,
                      parent_device=cfg.device, invariant_batch=cfg.invariant_batch)
    with WorkerExecutor(spec) as worker:
        yield worker


def same_blocks(a: Executor, a_blocks: list[int], b: Executor, b_blocks: list[int], chunk_blocks: int = 16) -> bool:
    """Bit equality of blocks of two executors (either may be a worker in another process), a few blocks at a time:
    a long request's whole KV (GBs) need not fit beside the model twice more."""
    for i in range(0, len(a_blocks), chunk_blocks):
        x = a.read_blocks(a_blocks[i : i + chunk_blocks])
        y = b.read_blocks(b_blocks[i : i + chunk_blocks])
        if not x.equal(y.to(x.device)):
            return False
    return True


@contextlib.contextmanager
def _identity_mode(cfg: MigrationBenchConfig, bench: _Bench) -> Iterator[None]:
    """Deterministic kernels on CUDA (in the destination's process too) for the identity check."""
    if not cfg.device.startswith("cuda"):
        yield
        return
    worker = bench.dst.executor
    with deterministic_kernels(), worker.deterministic() if isinstance(worker, WorkerExecutor) else contextlib.nullcontext():
        yield


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _measure(cfg: MigrationBenchConfig, bench: _Bench, devices: str, kv_bytes_per_token: int,
             progress: Callable[[Iterable], Iterable] | None) -> pd.DataFrame:
    rows = []
    lengths = sorted(cfg.lengths)
    # Across processes the way back has its source in the other process (steps over the pipe): its steps are
    # compared with that process's own unmigrated steps, in columns of their own.
    split_back = cfg.cross_process and cfg.migrations >= 2
    # One untimed round first: module loads, kernel selection and allocator growth stay out of the first length.
    bench.reference(lengths[0])
    for t in cfg.transports:
        bench.migration(lengths[0], t)
    for length in progress(lengths) if progress else lengths:
        samples: dict[str, list[_MigrationRun]] = {t: [] for t in cfg.transports}
        refs: list[_Reference] = []
        back_steps: list[float] = []  # the back direction's source (the other process) unmigrated: its own baseline
        recompute: list[float] = []
        identical_timed = dict.fromkeys(cfg.transports, True)
        for rep in range(cfg.warmup + cfg.repeats):
            ref = bench.reference(length)
            back = bench.reference(length, bench.dst).decode_step_s if split_back else float("nan")
            runs = {t: bench.migration(length, t) for t in cfg.transports}
            for t, run in runs.items():
                identical_timed[t] &= run.identical_to(ref)
            kv_tokens = runs[cfg.transports[0]].kv_tokens
            prompt = bench.prompt(length, 0)
            rec = bench.recompute_s(prompt + ref.tokens[: kv_tokens - len(prompt)])  # its sequence when it migrated
            if rep < cfg.warmup:
                continue
            refs.append(ref)
            back_steps.append(back)
            recompute.append(rec)
            for t, run in runs.items():
                samples[t].append(run)
        stable = all(r.tokens == refs[0].tokens for r in refs)  # the baseline gives the same tokens every repeat
        # The identity check: an untimed rerun with and without migration that also compares the KV bits on both
        # sides at every commit. On CUDA it runs under torch's deterministic algorithms as well; the paged decode
        # kernel (the CUDA default) is deterministic by itself, the gather + SDPA path is not (`llumnix bench
        # determinism`), and there a last-bit difference flips near-tied greedy tokens with or without migration.
        with _identity_mode(cfg, bench):
            ref = bench.reference(length)
            checks = {t: bench.migration(length, t, verify_kv=True) for t in cfg.transports}
        identical = {t: run.identical_to(ref) for t, run in checks.items()}
        for t in cfg.transports:
            runs = samples[t]
            downtimes = [d for r in runs for d in r.downtimes_s]
            step_s = statistics.median(r.decode_step_s for r in refs)
            migrating = [_mean(r.migrating_steps + ([] if split_back else r.migrating_steps_back)) for r in runs]
            migrating_s = float(np.nanmedian(migrating))
            back_s = statistics.median(back_steps)
            migrating_back_s = float(np.nanmedian([_mean(r.migrating_steps_back) for r in runs])) if split_back \
                else float("nan")
            stage_per_step_s = float(np.nanmedian([r.stage_per_step_s for r in runs]))
            rows.append({
                "device": cfg.device,
                "dst_device": cfg.dst_device,
                "device_name": devices,
                "model": cfg.model,
                "dtype": cfg.dtype,
                "torch_version": torch.__version__,
                "cuda_version": torch.version.cuda or "",
                "nccl_version": nccl_version(),
                "transport": t,
                "chunk_blocks": cfg.chunk_blocks if cfg.chunk_blocks is not None else 0,
                "batch": cfg.batch,
                "seq_len": length,
                "kv_tokens": runs[0].kv_tokens,
                "kv_bytes": runs[0].kv_tokens * kv_bytes_per_token,
                "repeats": cfg.repeats,
                "migrations": len(downtimes),  # committed; asked for: migrations_asked
                "migrations_asked": cfg.migrations * cfg.repeats,
                "aborted": next((r.aborted for r in [*runs, checks[t]] if r.aborted), ""),
                "recompute_s": statistics.median(recompute),
                "blocking_copy_s": statistics.median(r.blocking_copy_s for r in runs),
                "downtime_s": statistics.median(downtimes) if downtimes else float("nan"),
                "downtime_min_s": min(downtimes, default=float("nan")),
                "downtime_max_s": max(downtimes, default=float("nan")),
                "stages": int(statistics.median(n for r in runs for n in r.stages)) if downtimes else 0,
                "migrated_blocks": int(statistics.median(r.migrated_blocks[0] for r in runs if r.migrated_blocks))
                if downtimes else 0,
                "decode_step_s": step_s,
                "decode_step_migrating_s": migrating_s,
                "decode_slowdown": migrating_s / step_s - 1.0,
                "decode_step_back_s": back_s,
                "decode_step_migrating_back_s": migrating_back_s,
                "decode_slowdown_back": migrating_back_s / back_s - 1.0,
                "stage_per_step_s": stage_per_step_s,
                "stage_slowdown": stage_per_step_s / step_s - 1.0,
                "token_identical": identical[t],
                "kv_identical": bool(checks[t].downtimes_s) and bool(checks[t].kv_identical),  # False: not checked
                "token_identical_timed": identical_timed[t],
                "reference_stable": stable,
                "notes": _notes(cfg, t),
            })
            log.info("seq_len %d %s: recompute %.1f ms, blocking copy %.1f ms, downtime %.2f ms, identical %s "
                     "(timed runs %s)", length, t, rows[-1]["recompute_s"] * 1e3, rows[-1]["blocking_copy_s"] * 1e3,
                     rows[-1]["downtime_s"] * 1e3, identical[t], identical_timed[t])
    return pd.DataFrame(rows)


# -- tables and figure -----------------------------------------------------------------------------------------------
METHOD_COLUMNS = {"recompute": "recompute_s", "blocking-copy": "blocking_copy_s", "llumnix": "downtime_s"}


def measurements_table(df: pd.DataFrame) -> pd.DataFrame:
    """Long format for the workflow's Fig 10 experiment: model, seq_len, method, downtime_ms, decode_slowdown.

    ``recompute`` appears once per length (from its first row, whatever the transport); the copy methods once per
    transport (other transports than device are suffixed)."""
    rows = []
    recomputed = set()
    for _, r in df.iterrows():
        suffix = "" if r["transport"] == "device" else f" ({r['transport']})"
        for method, col in METHOD_COLUMNS.items():
            if method == "recompute":
                if (r["model"], r["seq_len"]) in recomputed:
                    continue
                recomputed.add((r["model"], r["seq_len"]))
            rows.append({
                "model": r["model"], "device_name": r["device_name"], "dtype": r["dtype"], "seq_len": r["seq_len"],
                "method": method + ("" if method == "recompute" else suffix), "downtime_ms": r[col] * 1e3,
                "decode_slowdown": r["decode_slowdown"] if method == "llumnix" else float("nan"),
            })
    return pd.DataFrame(rows)


def plot_migration(csv: Path | str, out_prefix: Path | str) -> list[Path]:
    """Fig 10's layout: (a) recompute, blocking copy and live-migration downtime against sequence length (log y);
    (b) the source's decode step without and during a migration. Writes ``out_prefix``.png and .pdf."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    df = pd.read_csv(csv)
    long = measurements_table(df)
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    sns.set_theme(style="whitegrid", context="paper")
    fig, (ax_t, ax_d) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1.3, 1]})
    order = [str(x) for x in sorted(df["seq_len"].unique())]
    long["seq_len"] = long["seq_len"].astype(str)
    sns.barplot(data=long, x="seq_len", y="downtime_ms", hue="method", order=order, ax=ax_t)
    ax_t.set_yscale("log")
    ax_t.set_xlabel("sequence length (tokens)")
    ax_t.set_ylabel("request stall (ms, log)")
    ax_t.set_title("(a) migration cost: recompute vs blocking copy vs live migration")
    ax_t.legend(fontsize=7, title=None)

    device = df[df["transport"] == df["transport"].iloc[0]]
    steps = pd.concat([
        pd.DataFrame({"seq_len": device["seq_len"].astype(str), "decode step": "normal",
                      "ms": device["decode_step_s"] * 1e3}),
        pd.DataFrame({"seq_len": device["seq_len"].astype(str), "decode step": "during migration",
                      "ms": device["decode_step_migrating_s"] * 1e3}),
    ])
    sns.barplot(data=steps, x="seq_len", y="ms", hue="decode step", order=order, ax=ax_d)
    for i, (_, r) in enumerate(device.sort_values("seq_len").iterrows()):
        ax_d.annotate(f"{r['decode_slowdown']:+.0%}", (i, r["decode_step_migrating_s"] * 1e3), ha="center",
                      va="bottom", fontsize=7)
    ax_d.set_xlabel("sequence length (tokens)")
    ax_d.set_ylabel("decode step (ms)")
    batch, transport = int(device["batch"].iloc[0]), device["transport"].iloc[0]
    back = device["decode_slowdown_back"].dropna() if "decode_slowdown_back" in device else pd.Series(dtype=float)
    if back.empty:
        ax_d.set_title(f"(b) decode step, batch {batch} ({transport} transport)")
    else:  # across processes: the bars are the way out; the way back against its own process's steps
        ax_d.set_title(f"(b) source's decode step, batch {batch} ({transport}): the way out\n"
                       f"the way back (source in the other process): {back.min():+.1%}..{back.max():+.1%}")
    ax_d.legend(fontsize=7, title=None)
    first = df.iloc[0]
    checks = [f"token-identical in {int(df['token_identical'].sum())}/{len(df)} rows"]
    if "kv_identical" in df:
        checks.append(f"KV bit-identical in {int(df['kv_identical'].sum())}/{len(df)}")
    fig.suptitle(f"{first['model']} {first['dtype']} on {first['device_name']} (torch {first['torch_version']})\n"
                 + ", ".join(checks), fontsize=9)
    fig.tight_layout()
    paths = [Path(f"{out_prefix}.png"), Path(f"{out_prefix}.pdf")]
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths
