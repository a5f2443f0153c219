"""A vLLM engine as a Ray instance actor (``llumnix serve --backend vllm``): ``InstanceActor``'s step loop, load
reports, token streaming, draining, retiring and migration driver over a ``VllmInstance``.

vLLM's engine is not thread-safe, so its step runs on the actor's event loop (the torch actor computes in a worker
thread): calls (new requests, polls, migrations) are served between steps, the only time vLLM's state is touched.

Migration goes through the same ``Migration`` states as the torch actor's, in one stop-and-copy stage (vLLM offers no
hook to copy blocks while the request decodes), with the step lock held from the stage's start to its commit:
PRE-ALLOC reserves the request's blocks on the destination (refused when it is draining or lacks the free KV: the
request keeps running on the source); the copy hands the destination the request's tokens so far and, with
``vllm_migration: kv``, its KV blocks (``VllmTransfer``); COMMIT continues it there, by recomputing its prefix or
from the copied KV (``VllmInstance.migrate_in``), and only then does the source release it. Under greedy decoding the
stream is token-identical. Accepting never takes the destination's step lock, so two instances migrating to each
other cannot deadlock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from llumnix.core.llumlet import LlumletConfig
from llumnix.core.migration import MigrationConfig
from llumnix.core.migration_protocol import Copy
from llumnix.core.request import RequestStatus
from llumnix.engine.kv_transfer import KVTransfer, PendingCopy, TaskCopy, check_copy
from llumnix.runtime.instance_actor import InstanceActor, RequestDone, request_stats

if TYPE_CHECKING:
    from llumnix.runtime.vllm_instance import MigratedRequest, VllmInstance

log = logging.getLogger(__name__)


class VllmTransfer(KVTransfer):
    """A migration's copy between vLLM actors: the request's tokens so far (and, ``with_kv``, a copy of its KV blocks)
    in one actor call to the destination's ``mig_receive``."""

    name = "vllm"

    def __init__(self, engine: VllmInstance, peers: Mapping[int, Any], with_kv: bool) -> None:
        self.engine, self.peers, self.with_kv = engine, peers, with_kv

    def start(self, copy: Copy) -> PendingCopy:
        check_copy(copy)
        migrated = self.engine.export(copy.request_id, with_kv=self.with_kv)
        return TaskCopy(asyncio.get_running_loop().create_task(self._send(copy, migrated)))

    async def _send(self, copy: Copy, migrated: MigratedRequest) -> int:
        await self.peers[copy.dst].mig_receive.remote(copy.migration_id, migrated)
        return migrated.kv.num_bytes if migrated.kv is not None else 0


class VllmInstanceActor(InstanceActor):
    """Create with ``ray.remote(VllmInstanceActor)`` like ``InstanceActor`` (``llumnix.runtime.backends`` picks it)."""

    engine: VllmInstance
    lock_through_stop_and_copy = True

    def _build_engine(self) -> tuple[VllmInstance, dict[str, Any]]:
        import torch

        from llumnix.runtime.vllm_instance import VllmInstance, VllmInstanceConfig
        from llumnix.runtime.vllm_model import ensure_model_dir, max_positions

        spec = self.spec
        torch.set_num_threads(spec.torch_threads)  # before vLLM starts: it then forbids changing it
        model_dir = ensure_model_dir(spec.model, spec.seed)
        max_len = max_positions(model_dir)
        num_blocks = None
        if spec.num_blocks is not None:
            num_blocks = spec.num_blocks + 1  # vLLM keeps one more, its null block
            kv_tokens = spec.num_blocks * spec.block_size
            max_len = min(max_len, kv_tokens) if max_len else kv_tokens
        config = VllmInstanceConfig(
            model_dir,
            block_size=spec.block_size,
            num_blocks=num_blocks,
            max_model_len=max_len,
            max_num_seqs=spec.max_num_seqs,
            max_num_batched_tokens=spec.max_batched_tokens,
            dtype=spec.dtype,
            enable_priorities=spec.priorities,
            watermark=spec.watermark,
            seed=spec.seed,
        )
        engine = VllmInstance(self.instance_id, config,
                              LlumletConfig(enable_priorities=spec.priorities, candidate=spec.candidate), self.clock)
        self._step_tokens: list[tuple[int, int, int]] = []
        engine.on_token = lambda req, tok: self._step_tokens.append((req.request_id, req.num_generated - 1, tok))
        info = {
            "vocab_size": engine.vocab_size,
            "max_position": engine.max_model_len,
            "kv_bytes_per_block": engine.kv_bytes_per_block,
            "model": f"vllm:{spec.model}",
        }
        log.info("instance %d: vLLM engine up (%s, %d blocks of %d)", self.instance_id, model_dir,
                 engine.blocks.num_blocks, engine.block_size)
        return engine, info

    def _migration_config(self) -> MigrationConfig:
        from llumnix.runtime.vllm_instance import VLLM_MIGRATION

        return VLLM_MIGRATION

    def _build_transport(self, transport) -> KVTransfer:
        return VllmTransfer(self.engine, self._peers, with_kv=self.spec.vllm_migration == "kv")

    async def _step_once(self) -> bool:
        if not self.engine.has_work():
            return False
        self._step_report = self.llumlet.load()  # vLLM schedules inside its step: the load just before it
        t0 = time.perf_counter()
        finished = self.engine.step()
        self._busy_s += time.perf_counter() - t0
        self._report = self._step_report
        tokens, self._step_tokens = self._step_tokens, []
        self._report_step(tokens, finished)
        self._changed()
        return True

    async def check(self) -> dict[str, Any]:
        """``InstanceActor.check`` plus the tokens whose KV migrations loaded rather than recomputed here."""
        return {**await super().check(), "kv_loaded_tokens": self.engine.connector.num_loaded_tokens}

    async def abort(self, request_id: int) -> bool:
        """Finish a request here now (its client is done with it); False if this engine does not hold it (a request
        in its stop-and-copy is released to its destination before the step lock is free again)."""
        async with self._lock:  # between steps: vLLM's state is touched only then
            if not self.engine.holds(request_id):
                return False
            req = self.engine.release(request_id)
        req.status, req.finish_s = RequestStatus.FINISHED, self.clock()
        self._finished += 1
        self._emit(RequestDone(req.request_id, request_stats(req)))
        self._changed()
        return True

    # -- migration: destination side -----------------------------------------------------------------------------
    async def mig_receive(self, migration_id: int, migrated: MigratedRequest) -> None:
        """A migration's copy: keep the request's tokens (and KV) until its COMMIT continues it here."""
        self._check_incoming(migration_id)
        self.engine.stash(self.llumlet.incoming[migration_id].owner_key, migrated)


__all__ = ["VllmInstanceActor", "VllmTransfer"]
