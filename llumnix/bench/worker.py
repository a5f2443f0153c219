"""An executor whose model and KV pool live in a child process: the destination of a cross-process migration.

``WorkerExecutor`` is an ``Executor`` like any other, so an ``EngineInstance`` (scheduler, block manager, llumlet) in
this process wraps it and ``migrate_in_process`` drives a migration to or from it unchanged. Steps and block commands
go to the child over a pipe (small messages, answered in order); KV blocks go over a ``DistChannel`` (gloo or NCCL)
between the two processes, so a stage's copy is a real cross-process transfer.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from llumnix.core.local_scheduler import StepKind, StepPlan
from llumnix.engine.executor import Executor, seq_inputs
from llumnix.runtime.dist_channel import DistChannel, Transfer, pair_key, serve_store

log = logging.getLogger(__name__)

Poll = Callable[[], bool]


class WorkerError(RuntimeError):
    """The child process failed a command (its traceback is in the message) or died."""


@dataclass(frozen=True)
class WorkerSpec:
    model: str
    num_blocks: int
    block_size: int
    device: str
    dtype: str
    seed: int
    backend: str = "gloo"  # the KV channel's: gloo (CPU tensors) or nccl (CUDA tensors)
    timeout_s: float = 120.0  # a channel transfer or a command's reply
    build_timeout_s: float = 900.0  # the child's start: imports, model build, channel
    cpu_threads: int | None = 1
    parent_device: str = "cpu"  # the device of this process's end of an NCCL channel
    invariant_batch: int | None = None  # batch-invariant decoding (ModelRunner)
    store_address: str = ""
    key: str = ""


class WorkerExecutor(Executor):
    """A ``TorchExecutor`` in a spawned child process. ``close()`` (or ``with``) ends the child."""

    def __init__(self, spec: WorkerSpec) -> None:
        mp = torch.multiprocessing.get_context("spawn")
        self._store, address = serve_store("127.0.0.1")
        self.spec = spec = replace(spec, store_address=address, key=pair_key("bench", "worker"))
        self._conn, child_conn = mp.Pipe()
        self.process = mp.Process(target=_worker_main, args=(child_conn, spec), name="llumnix-kv-worker", daemon=True)
        self.process.start()
        child_conn.close()
        self._sent, self._received = 1, 0  # ticket 0: the child's start
        self._replies: dict[int, tuple[bool, Any]] = {}
        self._sends: dict[int, Transfer] = {}  # pushes in flight, by the ticket of the worker's receive
        self.channel: DistChannel | None = None
        try:
            info = self._result(0, spec.build_timeout_s)
            self.num_blocks, self.block_size = spec.num_blocks, spec.block_size
            self.vocab_size: int = info["vocab_size"]
            self.device_name: str = info["device_name"]
            self._block_shape: tuple[int, ...] = info["block_shape"]  # [layer, k|v, block, ...] without the block dim
            local = spec.parent_device if spec.backend == "nccl" else None
            self.channel = DistChannel.connect(address, spec.key, 0, spec.backend, spec.timeout_s, local, "127.0.0.1")
        except BaseException:
            self.close()
            raise

    # -- Executor ------------------------------------------------------------------------------------------------
    def bind(self, block_manager) -> None:
        self._tables = block_manager.table

    def execute(self, plan: StepPlan) -> list[int]:
        return self.run(plan.kind, seq_inputs(plan, self.vocab_size, self._tables))

    def run(self, kind: StepKind, seqs: list) -> list[int]:
        return self._call("run", kind, seqs)

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """The blocks' KV, sent by the child over the channel (on the channel's device)."""
        out: list[torch.Tensor] = []
        self.pull_blocks(block_ids, out.append)
        self.synchronize()
        return out[0]

    def write_blocks(self, block_ids: list[int], payload: torch.Tensor) -> None:
        self.push_blocks(block_ids, payload)
        self.synchronize()

    def synchronize(self) -> None:
        """Wait for every command sent so far (each ends synchronised in the child); raise the first failure."""
        while self._received < self._sent:
            self._collect(self.spec.timeout_s)
        replies, self._replies = self._replies, {}
        for ticket in list(self._sends):
            self._sent_done(ticket)
        for ok, value in replies.values():
            if not ok:
                raise WorkerError(value)

    def weights_fingerprint(self) -> list[float]:
        return self._call("fingerprint")

    # -- KV over the channel -------------------------------------------------------------------------------------
    def push_blocks(self, block_ids: list[int], payload: torch.Tensor) -> Poll:
        """Start writing ``payload`` into the child's ``block_ids``; the poll is True once they are written there."""
        ticket = self._submit("recv_blocks", list(block_ids), tuple(payload.shape))
        self._sends[ticket] = self.channel.isend(payload)  # alive until the worker has it (a dropped send is lost)
        return lambda: self._done(ticket)

    def pull_blocks(self, block_ids: list[int], into: Callable[[torch.Tensor], None]) -> Poll:
        """Ask the child for its ``block_ids`` and hand them to ``into`` once received (NCCL: ordered on the current
        CUDA stream, the CPU does not wait; gloo: the CPU waits); the poll is True once the child has sent them."""
        ticket = self._submit("send_blocks", list(block_ids))
        shape = (*self._block_shape[:2], len(block_ids), *self._block_shape[2:])
        into(self.channel.irecv(self.channel.empty(shape, self.spec.dtype)).wait_ordered())
        return lambda: self._done(ticket)

    @contextlib.contextmanager
    def deterministic(self):
        """The child runs under ``deterministic_kernels`` (as this process does for the identity check) meanwhile."""
        self._call("deterministic", True)
        yield  # on an error the worker is closed: nothing to restore
        self._call("deterministic", False)

    # -- the pipe --------------------------------------------------------------------------------------------------
    def _submit(self, op: str, *args: Any) -> int:
        try:
            self._conn.send((op, args))
        except (OSError, EOFError) as e:
            raise self._died() from e
        self._sent += 1
        return self._sent - 1

    def _collect(self, timeout_s: float | None) -> bool:
        """Store the next reply; False if none came within ``timeout_s`` (None: never block)."""
        try:
            if not self._conn.poll(timeout_s or 0):
                if timeout_s:
                    raise WorkerError(f"the worker did not answer within {timeout_s:g} s")
                return False
            reply = self._conn.recv()
        except (OSError, EOFError) as e:
            raise self._died() from e
        self._replies[self._received] = reply
        self._received += 1
        return True

    def _done(self, ticket: int) -> bool:
        while self._received <= ticket and self._collect(None):
            pass
        if self._received <= ticket:
            return False
        self._sent_done(ticket)
        ok, value = self._replies.pop(ticket, (True, None))
        if not ok:
            raise WorkerError(value)
        return True

    def _sent_done(self, ticket: int) -> None:
        """The worker has answered ``ticket``: its push (if any) has ended; collect how (at once)."""
        sent = self._sends.pop(ticket, None)
        if sent is not None and self._replies.get(ticket, (True, None))[0]:
            sent.wait()

    def _result(self, ticket: int, timeout_s: float) -> Any:
        while self._received <= ticket:
            self._collect(timeout_s)
        ok, value = self._replies.pop(ticket)
        if not ok:
            raise WorkerError(value)
        return value

    def _call(self, op: str, *args: Any) -> Any:
        return self._result(self._submit(op, *args), self.spec.timeout_s)

    def _died(self) -> WorkerError:
        self.process.join(1.0)
        return WorkerError(f"the worker process exited (code {self.process.exitcode})")

    def close(self) -> None:
        """End the child: asked to, or killed after 10 s (it may be stuck in a transfer this side abandoned)."""
        if self.channel is not None:
            self.channel.close()
        if self.process.is_alive():
            with contextlib.suppress(Exception):
                self._conn.send(("close", ()))
            self.process.join(10.0)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5.0)
        self._conn.close()

    def __enter__(self) -> WorkerExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the child ---------------------------------------------------------------------------------------------------------
def _worker_main(conn, spec: WorkerSpec) -> None:
    """Build the executor, report its geometry (reply 0), join the channel, then answer commands in order."""
    try:
        from llumnix.engine.device import deterministic_kernels, device_name
        from llumnix.engine.executor import TorchExecutor

        if spec.cpu_threads and not spec.device.startswith("cuda"):
            torch.set_num_threads(spec.cpu_threads)
        if spec.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(spec.device))
        ex = TorchExecutor(spec.model, spec.num_blocks, spec.block_size, spec.device, spec.dtype, spec.seed,
                           invariant_batch=spec.invariant_batch)
        cache = ex.runner.kv_cache.cache
        conn.send((True, {
            "vocab_size": ex.vocab_size,
            "device_name": device_name(spec.device),
            "block_shape": (*cache.shape[:2], *cache.shape[3:]),
        }))
        channel = DistChannel.connect(spec.store_address, spec.key, 1, spec.backend, spec.timeout_s,
                                      spec.device if spec.backend == "nccl" else None, "127.0.0.1")
    except BaseException:
        conn.send((False, traceback.format_exc()))
        return
    deterministic = contextlib.ExitStack()

    def recv_blocks(block_ids: list[int], shape: tuple[int, ...]) -> None:
        ex.write_blocks(block_ids, channel.recv(channel.empty(shape, spec.dtype)))
        ex.synchronize()

    def set_deterministic(on: bool) -> None:
        if on:
            deterministic.enter_context(deterministic_kernels())
        else:
            deterministic.close()

    ops = {
        "run": ex.run,
        "synchronize": ex.synchronize,
        "recv_blocks": recv_blocks,
        "send_blocks": lambda block_ids: channel.send(ex.read_blocks(block_ids)),
        "fingerprint": ex.weights_fingerprint,
        "deterministic": set_deterministic,
    }
    try:
        while True:
            op, args = conn.recv()
            if op == "close":
                break
            try:
                conn.send((True, ops[op](*args)))
            except Exception:
                conn.send((False, f"{op} failed in the worker:\n{traceback.format_exc()}"))
    except (EOFError, OSError):  # the parent went away
        pass
    finally:
        deterministic.close()
        channel.close()


__all__ = ["WorkerError", "WorkerExecutor", "WorkerSpec"]
