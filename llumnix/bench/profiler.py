"""Measure a step-time ``Profile`` of the real engine: prefill and decode steps of the paged-KV runner over grids,
the scheduler's own per-step cost, and KV block copies between two pools (migration bandwidth, blocking copy).

With ``concurrent_instances`` N > 1 every point is measured while N - 1 other instance processes of the same model run
decode steps on the same machine: the step times of one instance of a cluster whose N instances share the CPU cores
(N tiny instances on a 2-core machine), at full load. Without it the profile times one instance alone, which a
simulated cluster of N instances then takes as each instance's speed.

Also the decode-step check against the memory-bandwidth floor (``decode_floor``): a decode step must read every
weight and every context token's KV once, so (weights + KV bytes) / measured copy bandwidth bounds it from below.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import gc
import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from llumnix.bench.migration import TRANSPORT_NOTES, TRANSPORTS
from llumnix.core.block_manager import blocks_for
from llumnix.core.local_scheduler import StepPlan
from llumnix.core.migration_protocol import Copy
from llumnix.core.request import Request
from llumnix.engine.device import device_name, torch_threads
from llumnix.engine.executor import Executor
from llumnix.engine.kv_transfer import PoolTransfer
from llumnix.profiles import BlockingCopyPoint, DecodePoint, PrefillPoint, Profile

log = logging.getLogger(__name__)

# Grids by device: a GPU covers the paper's range; a CPU keeps the tiny model's profile to well under a minute.
DEFAULT_GRIDS = {
    "cuda": {
        "prefill_lengths": (64, 128, 256, 512, 1024, 2048, 4096, 8192),
        "prefill_batches": (1, 2, 4, 8, 16, 32),
        "decode_batches": (1, 2, 4, 8, 16, 32, 64, 128, 256),
        "decode_contexts": (256, 1024, 2048, 4096, 8192),
        "copy_blocks": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    },
    "cpu": {
        "prefill_lengths": (32, 64, 128, 256, 512, 1024),
        "prefill_batches": (1, 2, 4, 8),
        "decode_batches": (1, 2, 4, 8, 16, 32, 64),
        "decode_contexts": (128, 512, 2048, 8192),
        "copy_blocks": (1, 4, 16, 64, 256),
    },
}


@dataclass(frozen=True)
class ProfileConfig:
    device: str = "cpu"
    model: str = "tiny"
    dtype: str = "float32"
    num_blocks: int = 792  # the instance's KV pool: the profile's total_blocks (792 = LLaMA-7B on an A10)
    block_size: int = 16
    name: str = "profile"
    prefill_lengths: tuple[int, ...] | None = None  # None: the device's default grid
    prefill_batches: tuple[int, ...] | None = None
    decode_batches: tuple[int, ...] | None = None
    decode_contexts: tuple[int, ...] | None = None  # total context tokens of the batch; each batch also gets its
    copy_blocks: tuple[int, ...] | None = None  # largest point that fits the pool
    transport: str = "device"
    repeats: int = 3
    warmup: int = 1
    max_batched_tokens: int | None = None  # None: the pool's capacity (memory, not this limit, bounds a prefill)
    max_num_seqs: int = 256
    watermark: float = 0.01
    seed: int = 0
    cpu_threads: int | None = 1  # torch intra-op threads on CPU (see llumnix.engine.device.torch_threads)
    concurrent_instances: int = 1  # instances sharing the machine: N - 1 busy ones step beside the measured one

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("num_blocks and repeats must be >= 1, warmup >= 0")
        if self.concurrent_instances < 1:
            raise ValueError(f"concurrent_instances must be >= 1, got {self.concurrent_instances}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.transport == "host" and not self.device.startswith("cuda"):
            raise ValueError("the host transport needs --device cuda")

    def grid(self, key: str) -> tuple[int, ...]:
        value = getattr(self, key)
        if value is not None:
            return tuple(sorted(value))
        return DEFAULT_GRIDS["cuda" if self.device.startswith("cuda") else "cpu"][key]

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def batched_tokens(self) -> int:
        return self.max_batched_tokens or self.capacity_tokens


def _median_time_s(fn: Callable[[], object], sync: Callable[[], None], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _synchronizer(device) -> Callable[[], None]:
    """What waits for ``device``'s queued work before a timer reads the clock (nothing on CPU)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return lambda: None
    return functools.partial(torch.cuda.synchronize, device)


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def _tables(lengths: list[int], block_size: int) -> list[list[int]]:
    tables, start = [], 0
    for n in lengths:
        k = blocks_for(n, block_size)
        tables.append(list(range(start, start + k)))
        start += k
    return tables


def prefill_grid(cfg: ProfileConfig, max_position: int) -> list[tuple[int, int]]:
    """(batch, length) points whose tokens fit one prefill step and the pool."""
    return [
        (b, n)
        for n in cfg.grid("prefill_lengths")
        for b in cfg.grid("prefill_batches")
        if n <= max_position and b * n <= cfg.batched_tokens and b * blocks_for(n, cfg.block_size) <= cfg.num_blocks
        and b <= cfg.max_num_seqs
    ]


def decode_grid(cfg: ProfileConfig, max_position: int) -> list[tuple[int, int]]:
    """(batch, total context tokens) points that fit the pool; each batch also gets its largest fitting context."""
    points = set()
    bs = cfg.block_size
    for b in cfg.grid("decode_batches"):
        if b > cfg.max_num_seqs:
            continue
        per_seq_max = min(max_position, (cfg.num_blocks // b) * bs)
        if per_seq_max < 1:
            continue

        def fits(total: int, b: int = b) -> bool:
            return total >= b and sum(blocks_for(n, bs) for n in _split(total, b)) <= cfg.num_blocks and \
                max(_split(total, b)) <= max_position

        for c in cfg.grid("decode_contexts"):
            if fits(c):
                points.add((b, c))
        points.add((b, b * per_seq_max))
    return sorted(points)


class _NullExecutor(Executor):
    """Runs no model: isolates the scheduler's and llumlet's own cost of a step."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size

    def execute(self, plan: StepPlan) -> list[int]:
        return [0] * len(plan.requests)

    def bind(self, block_manager) -> None:
        pass

    def read_blocks(self, block_ids: list[int]):
        return None

    def write_blocks(self, block_ids: list[int], payload) -> None:
        pass


def measure_step_overhead_s(num_blocks: int, block_size: int, batch: int = 32, steps: int = 200) -> float:
    """Median wall time of an EngineInstance decode step of ``batch`` requests around an executor that does nothing:
    the CPU cost of scheduling and bookkeeping that every real step pays on top of the model's forward."""
    from llumnix.runtime.instance import EngineInstance

    inst = EngineInstance(0, _NullExecutor(num_blocks, block_size))
    per_req_tokens = max(2, min(64, num_blocks * block_size // (2 * batch) - steps))
    for i in range(batch):
        inst.add_request(Request(i, 0.0, per_req_tokens, steps + 2))
    inst.step()  # the prefill
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        inst.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fit_line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares y = a + b x with a, b >= 0 (a through-origin refit when the intercept comes out negative)."""
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    b, a = np.polyfit(xs, ys, 1)
    if a < 0 or b <= 0:
        a, b = 0.0, float(xs @ ys / (xs @ xs))
    return float(a), float(b)


def measure_profile(cfg: ProfileConfig, command: str, progress: Callable | None = None) -> Profile:
    """Measure the tables and scalars of a Profile for ``cfg``; ``command`` is recorded in its provenance."""
    with torch_threads(cfg.device, cfg.cpu_threads), busy_instances(cfg, cfg.concurrent_instances - 1):
        return _measure_profile(cfg, command, progress)


@contextlib.contextmanager
def busy_instances(cfg: ProfileConfig, count: int, timeout_s: float = 300.0) -> Iterator[None]:
    """``count`` processes that each build the model and run decode steps (batch 4 over half their KV pool) until
    the block ends: the other instances of a cluster sharing this machine, all busy."""
    if count <= 0:
        yield
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fresh interpreter: no torch state or threads inherited
    stop, ready = ctx.Event(), ctx.Semaphore(0)
    procs = [ctx.Process(target=_busy_instance, args=(cfg, i, stop, ready), daemon=True) for i in range(count)]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            if not ready.acquire(timeout=timeout_s):
                raise RuntimeError(f"a busy instance did not start within {timeout_s:.0f} s")
        yield
    finally:
        stop.set()
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _busy_instance(cfg: ProfileConfig, index: int, stop, ready) -> None:
    import torch

    from llumnix.engine.runner import ModelRunner, SeqInput

    if not cfg.device.startswith("cuda") and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    runner = ModelRunner(cfg.model, cfg.num_blocks, cfg.block_size, device=cfg.device,
                         dtype=getattr(torch, cfg.dtype), seed=cfg.seed + 1 + index)
    batch = 4
    ctx_tokens = max(1, min(runner.config.max_position, cfg.capacity_tokens // (2 * batch)))
    tables = _tables([ctx_tokens] * batch, cfg.block_size)
    seqs = [SeqInput([1 + i], ctx_tokens - 1, t) for i, t in enumerate(tables)]
    runner.decode(seqs)
    ready.release()
    while not stop.is_set():
        runner.decode(seqs)


def _measure_profile(cfg: ProfileConfig, command: str, progress: Callable | None) -> Profile:
    import torch

    from llumnix.engine.kv_cache import KVCachePool
    from llumnix.engine.runner import ModelRunner, SeqInput

    dtype = getattr(torch, cfg.dtype)
    runner = ModelRunner(cfg.model, cfg.num_blocks, cfg.block_size, device=cfg.device, dtype=dtype, seed=cfg.seed)
    mc = runner.config
    gen = torch.Generator(device=runner.device).manual_seed(cfg.seed)
    runner.kv_cache.cache.normal_(generator=gen)  # timings on real-looking data, never on zeros
    rng = np.random.default_rng(cfg.seed)
    cuda = runner.device.type == "cuda"
    sync = _synchronizer(runner.device)

    def timed(fn: Callable[[], object]) -> float:
        return _median_time_s(fn, sync, cfg.warmup, cfg.repeats)

    p_grid, d_grid = prefill_grid(cfg, mc.max_position), decode_grid(cfg, mc.max_position)
    copy_grid = [n for n in cfg.grid("copy_blocks") if n <= cfg.num_blocks]
    bar = progress(total=len(p_grid) + len(d_grid) + len(copy_grid)) if progress else None

    prefill: list[PrefillPoint] = []
    for b, n in p_grid:
        tables = _tables([n] * b, cfg.block_size)
        seqs = [SeqInput(rng.integers(0, mc.vocab_size, n).tolist(), 0, t) for t in tables]
        t = timed(lambda seqs=seqs: runner.prefill(seqs))
        prefill.append(PrefillPoint(total_tokens=b * n, sum_sq_tokens=b * n * n, time_s=t))
        log.info("prefill batch %d x %d tokens: %.2f ms", b, n, t * 1e3)
        bar and bar.update()

    decode: list[DecodePoint] = []
    for b, total in d_grid:
        ctx = _split(total, b)
        tables = _tables(ctx, cfg.block_size)
        seqs = [SeqInput([int(rng.integers(mc.vocab_size))], c - 1, t) for c, t in zip(ctx, tables, strict=True)]
        t = timed(lambda seqs=seqs: runner.decode(seqs))
        decode.append(DecodePoint(batch_size=b, total_context_tokens=total, time_s=t))
        log.info("decode batch %d, %d context tokens: %.2f ms", b, total, t * 1e3)
        bar and bar.update()

    # KV block copies between two pools: one migration stage of n blocks, or a blocking copy of n * block_size tokens.
    dst = KVCachePool(mc.num_layers, max(copy_grid), cfg.block_size, num_kv_heads=mc.num_kv_heads,
                      head_dim=mc.head_dim, dtype=dtype, device=runner.device)
    transfer = PoolTransfer(runner.kv_cache, {1: dst}, cfg.transport)
    copy_times = []
    for n in copy_grid:
        src_ids = sorted(rng.choice(cfg.num_blocks, n, replace=False).tolist())
        dst_ids = list(range(n))
        t = timed(lambda s=src_ids, d=dst_ids: transfer.start(Copy(-1, 1, 0, tuple(s), tuple(d), True)))
        copy_times.append(t)
        log.info("copy %d blocks (%s): %.3f ms", n, cfg.transport, t * 1e3)
        bar and bar.update()
    bar and bar.close()
    stage_overhead_s, s_per_block = _fit_line(copy_grid, copy_times)
    bytes_per_block = runner.kv_cache.bytes_per_block
    bandwidth = bytes_per_block / s_per_block
    step_overhead_s = measure_step_overhead_s(cfg.num_blocks, cfg.block_size)

    dev_name = device_name(cfg.device)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    kv_bytes_per_token = mc.kv_bytes_per_token(dtype)
    assumptions = [
        f"engine: llumnix's own paged-KV LLaMA in PyTorch {torch.__version__}"
        + (f" (CUDA {torch.version.cuda})" if cuda else "")
        + "; random weights (seeded); prefill attention is SDPA per sequence; decode steps "
        + ("replayed as CUDA graphs (one per batch bucket)" if runner.cuda_graphs else "run eagerly")
        + ", decode attention "
        + ("read in place from the paged KV by a Triton kernel" if runner.paged_kernel
           else "over each sequence's paged K/V gathered into a padded copy (SDPA)")
        + ("; residual add + RMS norm, rotary and SiLU x up fused (Triton)" if runner.fused_ops else ""),
        "prefill points: one step over b equal prompts of n tokens (sum_sq_tokens = b * n^2), median of "
        f"{cfg.repeats} after {cfg.warmup} warm-up; time includes building the inputs and greedy sampling",
        "decode points: one step over b sequences whose total context is split evenly; each batch size also has its "
        "largest context that fits the pool",
        f"step_overhead_s: median cost of a step of the real LocalScheduler/Llumlet (EngineInstance) around an "
        f"executor that runs no model, batch 32, measured on this machine's CPU ({step_overhead_s * 1e6:.0f} us)",
        f"migration: KV block copies between two pools of this process, {TRANSPORT_NOTES[cfg.transport]}; a line "
        f"time = overhead + n * block_bytes / bandwidth fitted over {list(copy_grid)} blocks; no RPC or network "
        "handshake is included in migration_stage_overhead_s",
        "blocking_copy points: the same copies, n blocks = n * block_size tokens copied in one go, synchronised",
        f"total_blocks = {cfg.num_blocks} (the instance's KV pool as profiled; 792 caps LLaMA-7B to the paper's A10 "
        f"memory), max_batched_tokens = {cfg.batched_tokens}, max_num_seqs = {cfg.max_num_seqs}, watermark = "
        f"{cfg.watermark}",
    ]
    if cfg.concurrent_instances > 1:
        assumptions.append(
            f"CPU sharing: every point was measured while {cfg.concurrent_instances - 1} other instance processes of "
            f"{cfg.model} ran decode steps on the same machine ({cfg.concurrent_instances} instances sharing its "
            f"{os.cpu_count()} CPUs, all busy): one instance's step times in such a cluster at full load, not alone"
        )
    shared = f", {cfg.concurrent_instances} instances sharing the machine" if cfg.concurrent_instances > 1 else ""
    return Profile(
        name=cfg.name,
        description=(f"Measured step times of llumnix's torch engine serving {cfg.model} ({cfg.dtype}, random weights) "
                     f"on {dev_name}, KV pool of {cfg.num_blocks} blocks of {cfg.block_size} tokens{shared}."),
        provenance=f"measured: {command}, {dev_name}, {date}",
        reconstructed=False,
        assumptions=assumptions,
        device=dev_name,
        model=f"{cfg.model} {cfg.dtype}",
        num_layers=mc.num_layers,
        hidden_size=mc.hidden_size,
        num_kv_heads=mc.num_kv_heads,
        head_dim=mc.head_dim,
        dtype_bytes=dtype.itemsize,
        block_size=cfg.block_size,
        total_blocks=cfg.num_blocks,
        kv_bytes_per_token=kv_bytes_per_token,
        watermark=cfg.watermark,
        max_batched_tokens=cfg.batched_tokens,
        max_num_seqs=cfg.max_num_seqs,
        step_overhead_s=step_overhead_s,
        migration_bandwidth_bytes_per_s=bandwidth,
        migration_stage_overhead_s=stage_overhead_s,
        prefill=prefill,
        decode=decode,
        blocking_copy=[BlockingCopyPoint(num_tokens=n * cfg.block_size, time_s=t)
                       for n, t in zip(copy_grid, copy_times, strict=True)],
    )


# -- decode step vs the memory-bandwidth floor -----------------------------------------------------------------------
def measure_copy_bandwidth(device: str, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device memory bandwidth from a large device-to-device copy, counting bytes read plus bytes written."""
    import torch

    a = torch.randn(nbytes // 4, device=device)
    b = torch.empty_like(a)
    t = _median_time_s(lambda: b.copy_(a), _synchronizer(a.device), 3, repeats)
    return 2 * a.numel() * a.element_size() / t


def decode_floor(device: str, model: str, dtype: str, batch: int, context_tokens: int, repeats: int = 10,
                 seed: int = 0, cpu_threads: int | None = 1, cuda_graphs: bool | None = None,
                 paged_kernel: bool | None = None, fused_ops: bool | None = None) -> dict:
    """Time a decode step of ``batch`` sequences of ``context_tokens`` each and compare it with the bytes it must
    move: every weight once plus every context token's K and V once, over the measured copy bandwidth."""
    (row,) = decode_floor_grid(device, model, dtype, [batch], [context_tokens], repeats, seed, cpu_threads,
                               cuda_graphs, paged_kernel, fused_ops=fused_ops)
    if not row["fits"]:
        raise ValueError(f"batch {batch} x {context_tokens} tokens does not fit the device's free memory "
                         f"({row['kv_bytes'] / 2**30:.1f} GiB of KV next to {row['weight_bytes'] / 2**30:.1f} GiB of "
                         "weights)")
    return row


@dataclass(frozen=True)
class KernelConfig:
    """The paged decode kernel's constants for one run of the grid (None: the engine's own, ``paged_attention``)."""

    partition: int | None = None
    tile: int | None = None
    num_warps: int | None = None
    programs_per_sm: int | None = None
    full_programs_per_sm: int | None = None
    full_num_warps: int | None = None

    @classmethod
    def parse(cls, text: str) -> KernelConfig:
        """'512', '512/32', ... '512/32/4/4/1/4': PARTITION[/BLOCK_N[/NUM_WARPS[/PROGRAMS_PER_SM[/FULL[/FULL_WARPS]]]]]
        (FULL: ``FULL_PROGRAMS_PER_SM``, 0 for never one pass; FULL_WARPS: ``FULL_NUM_WARPS``)."""
        try:
            parts = [int(x) for x in text.split("/")]
        except ValueError:
            parts = []
        if not 1 <= len(parts) <= 6 or min(parts[:4]) < 1 or min(parts) < 0 or (len(parts) == 6 and parts[5] < 1):
            raise ValueError(f"kernel config {text!r}: expected PARTITION[/TILE[/WARPS[/PROGRAMS_PER_SM[/FULL[/FULL_WARPS]"
                             "]]]] of positive integers (FULL may be 0)")
        return cls(*parts)


@contextlib.contextmanager
def _kernel_constants(config: KernelConfig) -> Iterator[dict[str, int]]:
    """Set the paged kernel's module constants for a block (restored after); yields those in force."""
    from llumnix.engine import paged_attention as pa

    names = {"partition": "PARTITION", "tile": "BLOCK_N", "num_warps": "NUM_WARPS",
             "programs_per_sm": "PROGRAMS_PER_SM", "full_programs_per_sm": "FULL_PROGRAMS_PER_SM",
             "full_num_warps": "FULL_NUM_WARPS"}
    saved = {key: getattr(pa, name) for key, name in names.items()}
    for key, name in names.items():
        value = getattr(config, key)
        setattr(pa, name, saved[key] if value is None else value)
    try:
        yield {key: getattr(pa, name) for key, name in names.items()}
    finally:
        for key, name in names.items():
            setattr(pa, name, saved[key])


def decode_floor_grid(device: str, model: str, dtype: str, batches: list[int], contexts: list[int],
                      repeats: int = 10, seed: int = 0, cpu_threads: int | None = 1, cuda_graphs: bool | None = None,
                      paged_kernel: bool | None = None, kernel_configs: list[KernelConfig] | None = None,
                      memory_margin_bytes: int = 3 << 30, fused_ops: bool | None = None) -> list[dict]:
    """``decode_floor`` over every (kernel config, batch, context) cell, in one process and on one runner (the pool
    sized for the largest cell that fits; CUDA graphs captured once per batch and kernel config). On CUDA a cell
    whose KV does not fit the free memory next to the weights (less ``memory_margin_bytes``) is listed with
    ``fits`` False and no times."""
    with torch_threads(device, cpu_threads):
        return _decode_floor_grid(device, model, dtype, batches, contexts, repeats, seed, cuda_graphs, paged_kernel,
                                  kernel_configs or [KernelConfig()], memory_margin_bytes, fused_ops)


def _decode_floor_grid(device: str, model: str, dtype: str, batches: list[int], contexts: list[int], repeats: int,
                       seed: int, cuda_graphs: bool | None, paged_kernel: bool | None,
                       kernel_configs: list[KernelConfig], memory_margin_bytes: int,
                       fused_ops: bool | None) -> list[dict]:
    import platform

    import torch

    from llumnix.engine.model import get_model_config
    from llumnix.engine.runner import ModelRunner, SeqInput

    bs = 16
    torch_dtype = getattr(torch, dtype)
    mc = get_model_config(model)
    cuda = device.startswith("cuda")
    bandwidth = measure_copy_bandwidth(device)
    kv_per_token = mc.kv_bytes_per_token(torch_dtype)
    weight_estimate = mc.num_params * torch_dtype.itemsize
    if cuda:
        torch.cuda.empty_cache()  # the copy's buffers
        kv_budget = torch.cuda.mem_get_info(torch.device(device))[0] - weight_estimate - memory_margin_bytes
    else:
        kv_budget = None

    def fits(b: int, n: int) -> bool:
        return kv_budget is None or b * blocks_for(n, bs) * bs * kv_per_token <= kv_budget

    cells = [(b, n) for b in batches for n in contexts]
    fitting = [(b, n) for b, n in cells if fits(b, n)]
    num_blocks = max([b * blocks_for(n, bs) for b, n in fitting], default=1)
    runner = ModelRunner(model, num_blocks, bs, device=device, dtype=torch_dtype, seed=seed, cuda_graphs=cuda_graphs,
                         paged_kernel=paged_kernel, fused_ops=fused_ops)
    runner.kv_cache.cache.normal_(generator=torch.Generator(device=runner.device).manual_seed(seed))
    mc = runner.config
    rng = np.random.default_rng(seed)
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    common = {
        "device_name": device_name(device),
        "model": model,
        "dtype": dtype,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "",
        "triton_version": triton_version,
        "host": platform.node(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "cuda_graphs": runner.cuda_graphs,
        "paged_kernel": runner.paged_kernel,
        "fused_ops": runner.fused_ops,
        "weight_bytes": weight_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth,
        "weights_only_floor_s": weight_bytes / bandwidth,
        "repeats": repeats,
    }

    sync = _synchronizer(runner.device)

    def step_s(b: int, ctx: int) -> float:
        tables = _tables([ctx] * b, bs)
        seqs = [SeqInput([int(rng.integers(mc.vocab_size))], ctx - 1, t) for t in tables]
        return _median_time_s(lambda: runner.decode(seqs), sync, 3, repeats)

    rows = []
    for config in kernel_configs:
        with _kernel_constants(config) as constants:
            runner._static.clear()  # graphs captured with other kernel constants
            kernel = constants if runner.paged_kernel else {}
            for b in batches:
                short = step_s(b, 1) if any(fits(b, n) for n in contexts) else None  # weights, launches, sampling
                for n in contexts:
                    kv_bytes = b * n * kv_per_token
                    floor = (weight_bytes + kv_bytes) / bandwidth
                    row = {**common, **kernel, "batch": b, "context_tokens_per_seq": n, "fits": fits(b, n),
                           "kv_bytes": kv_bytes, "floor_s": floor, "kv_part_floor_s": kv_bytes / bandwidth,
                           "decode_step_s": None, "decode_step_context1_s": None, "step_over_floor": None,
                           "kv_part_s": None}
                    if row["fits"]:
                        step = step_s(b, n)
                        row |= {"decode_step_s": step, "decode_step_context1_s": short, "step_over_floor": step / floor,
                                "kv_part_s": step - short,
                                "cuda_graphs": runner.cuda_graphs}  # False once a capture failed (eager from then)
                        log.info("decode batch %d x %d tokens (partition %s): %.2f ms, %.2fx the floor", b, n,
                                 kernel.get("partition"), step * 1e3, step / floor)
                    rows.append(row)
    return rows


# -- prefill vs the compute floor ------------------------------------------------------------------------------------
def measure_matmul_rate(device: str, dtype: str, n: int = 8192, repeats: int = 10) -> float:
    """Dense matmul throughput (FLOP/s) of an n x n x n product in ``dtype``: the rate a prefill's GEMMs can reach."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype), generator=gen)
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype), generator=gen)
    return 2 * n**3 / _median_time_s(lambda: a @ b, _synchronizer(a.device), 3, repeats)


def prefill_flops(mc, tokens: int) -> float:
    """FLOPs of one sequence's prefill of ``tokens`` tokens: every linear layer over every token, causal attention
    (QK^T and PV over the lower triangle: 2 x 2 x n^2 / 2 x hidden per layer) and the LM head for the last token."""
    h, kv = mc.hidden_size, mc.num_kv_heads * mc.head_dim
    linear_per_token = mc.num_layers * (2 * h * h + 2 * h * kv + 3 * h * mc.intermediate_size)
    return 2 * linear_per_token * tokens + 2 * mc.num_layers * tokens**2 * h + 2 * h * mc.vocab_size


def prefill_floor(device: str, model: str, dtype: str, lengths: list[int], repeats: int = 5, seed: int = 0,
                  cpu_threads: int | None = 1) -> list[dict]:
    """Time the prefill of one sequence of each length and compare it with its FLOPs over the measured matmul
    rate (``measure_matmul_rate``)."""
    import platform

    import torch

    from llumnix.engine.runner import ModelRunner, SeqInput

    with torch_threads(device, cpu_threads):
        bs = 16
        rate = measure_matmul_rate(device, dtype)
        runner = ModelRunner(model, blocks_for(max(lengths), bs), bs, device=device, dtype=getattr(torch, dtype),
                             seed=seed)
        mc = runner.config
        rng = np.random.default_rng(seed)
        sync = _synchronizer(runner.device)
        rows = []
        for n in lengths:
            seq = SeqInput(rng.integers(mc.vocab_size, size=n).tolist(), 0, list(range(blocks_for(n, bs))))
            t = _median_time_s(lambda seq=seq: runner.prefill([seq]), sync, 2, repeats)
            flops = prefill_flops(mc, n)
            rows.append({"device_name": device_name(device), "model": model, "dtype": dtype,
                         "torch_version": torch.__version__, "cuda_version": torch.version.cuda or "",
                         "host": platform.node(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
                         "matmul_flops_per_s": rate, "tokens": n, "flops": flops, "prefill_s": t,
                         "floor_s": flops / rate, "prefill_over_floor": t * rate / flops, "repeats": repeats})
            log.info("prefill %d tokens: %.2f ms, %.2fx the compute floor", n, t * 1e3, t * rate / flops)
        return rows


# -- where a decode step's time goes ---------------------------------------------------------------------------------
# the first kind whose key a kernel's name contains (lower case): cuBLAS's split-K GEMVs before the attention keys
KERNEL_KINDS = (("matmul", ("gemm", "gemv", "cutlass", "nvjet", "xmma", "cublas", "splitk")),
                ("attention", ("_partition_kernel", "_combine_kernel", "paged", "attn", "flash", "sdpa")),
                ("norm/rope/act", ("norm", "rope", "rsqrt", "silu", "mul", "add", "pow", "mean", "cat", "neg", "cos",
                                   "sin")),
                ("copy/index", ("copy", "index", "scatter", "gather", "fill")))


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in lowered for k in keys)), "other")


def decode_step_breakdown(device: str, model: str, dtype: str, batch: int, context_tokens: int, steps: int = 5,
                          seed: int = 0) -> list[dict]:
    """GPU kernel time of an eager decode step by kind (torch.profiler), next to the CUDA-graph step's wall time: how
    much of a step is matrix products, attention, the small element-wise kernels, and launch gaps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from llumnix.engine.runner import ModelRunner, SeqInput

    bs = 16
    runner = ModelRunner(model, batch * blocks_for(context_tokens, bs), bs, device=device,
                         dtype=getattr(torch, dtype), seed=seed, cuda_graphs=False)
    mc = runner.config
    rng = np.random.default_rng(seed)
    seqs = [SeqInput([int(rng.integers(mc.vocab_size))], context_tokens - 1, t)
            for t in _tables([context_tokens] * batch, bs)]

    sync = _synchronizer(runner.device)
    eager_s = _median_time_s(functools.partial(runner.decode, seqs), sync, 3, steps)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.decode(seqs)
        sync()
    kernels = []  # (name, seconds per step, launches per step)
    for evt in prof.key_averages():
        us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if us and evt.key:
            kernels.append((evt.key, us / 1e6 / steps, evt.count / steps))
    del runner, prof
    gc.collect()
    torch.cuda.empty_cache()  # the eager runner's KV pool, before the graph runner allocates its own
    graphs = ModelRunner(model, batch * blocks_for(context_tokens, bs), bs, device=device,
                         dtype=getattr(torch, dtype), seed=seed)
    graph_s = _median_time_s(lambda: graphs.decode(seqs), sync, 3, 10)
    base = {"device_name": device_name(device), "model": model, "dtype": dtype, "batch": batch,
            "context_tokens_per_seq": context_tokens, "eager_step_s": eager_s, "graph_step_s": graph_s,
            "kernel_total_s": sum(k[1] for k in kernels)}
    return [base | {"kind": kernel_kind(name), "kernel": name[:120], "kernel_s": sec, "launches": n}
            for name, sec, n in sorted(kernels, key=lambda k: -k[1])]
