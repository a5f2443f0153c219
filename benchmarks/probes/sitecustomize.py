"""Issue 19: a probe for benchmarks/gpu_serve_migration.sh, imported by every Python process started with this
folder on PYTHONPATH (Ray's instance actors too). LLUMNIX_PROBE_SWITCH_S: the interpreter's thread switch interval
(sys.setswitchinterval; CPython's default is 5 ms); LLUMNIX_PROBE_POLL_S: the sleep between completion checks of an
NCCL transfer (llumnix.runtime.dist_channel._POLL_S). Neither is set by the project: they test where a serving
migration's time goes. LLUMNIX_PROBE_PAGEABLE_IDS=1: the KV pool's block ids made as before the pinned
``kv_cache.block_index`` (the A/B of gpu_fig10_nccl.sh idsab). (LLUMNIX_PROBE_POLL_BACKOFF set the backed-off
checks of f6f2d2c, reverted since: the pollab runs of gpu_serve_migration.sh.)"""

import os
import sys

if os.environ.get("LLUMNIX_PROBE_SWITCH_S"):
    sys.setswitchinterval(float(os.environ["LLUMNIX_PROBE_SWITCH_S"]))
if os.environ.get("LLUMNIX_PROBE_POLL_S"):
    import llumnix.runtime.dist_channel as _dc

    _dc._POLL_S = float(os.environ["LLUMNIX_PROBE_POLL_S"])
if os.environ.get("LLUMNIX_PROBE_PAGEABLE_IDS"):
    # the KV pool's block ids sent to the GPU as before 2026-11-29 (night): from pageable memory, the host waiting
    import torch

    import llumnix.engine.kv_cache as _kc

    _kc.block_index = lambda block_ids, device: torch.tensor(block_ids, dtype=torch.long, device=device)

if os.environ.get("LLUMNIX_PROBE_TRACE"):
    # LLUMNIX_PROBE_TRACE=DIR: every call of the serving path's migration steps, timed, one line each (name, start,
    # end in time.time(), thread) into DIR/trace-PID.csv
    import functools
    import threading
    import time

    import llumnix.engine.kv_cache as _kc
    import llumnix.runtime.dist_channel as _dch
    import llumnix.runtime.instance_actor as _ia
    import llumnix.runtime.kv_transport as _kt

    _out = None
    _lock = threading.Lock()

    def _write(name, t0, t1):
        global _out
        with _lock:
            if _out is None:
                _out = open(os.path.join(os.environ["LLUMNIX_PROBE_TRACE"], f"trace-{os.getpid()}.csv"), "a")
            _out.write(f"{name},{t0:.6f},{t1:.6f},{threading.current_thread().name}\n")
            _out.flush()

    def _timed(cls, name):
        fn = getattr(cls, name)
        label = f"{cls.__name__}.{name}"
        if asyncio_iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def wrapper(*a, **k):
                t0 = time.time()
                try:
                    return await fn(*a, **k)
                finally:
                    _write(label, t0, time.time())
        else:
            @functools.wraps(fn)
            def wrapper(*a, **k):
                t0 = time.time()
                try:
                    return fn(*a, **k)
                finally:
                    _write(label, t0, time.time())
        setattr(cls, name, wrapper)

    from inspect import iscoroutinefunction as asyncio_iscoroutinefunction

    for _cls, _names in [
        (_kt.TorchDistTransport, ["send", "receive"]),
        (_dch.DistChannel, ["send", "recv"]),
        (_kc.KVCachePool, ["read_blocks", "write_blocks"]),
        (_ia.InstanceActor, ["kv_recv", "mig_pre_alloc", "mig_commit", "_copy", "_answer", "_step_once", "_execute",
                             "poll"]),
    ]:
        for _n in _names:
            _timed(_cls, _n)
