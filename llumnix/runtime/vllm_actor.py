"""A vLLM engine as a Ray instance actor (``llumnix serve --backend vllm``): ``InstanceActor``'s step loop, load
reports, token streaming, draining and retiring over a ``VllmInstance``, with vLLM's blocking migration in place of
the multi-stage protocol.

vLLM's engine is not thread-safe, so its step runs on the actor's event loop (the torch actor computes in a worker
thread): calls (new requests, polls, migrations) are served between steps, the only time vLLM's state is touched.

Migration, source side (``_drive_once``): holding the step lock, the source exports the request (prompt and tokens so
far; with ``vllm_migration: kv`` also its KV blocks, which travel in the call) and asks the destination to take it
(``mig_accept``). Only once the destination has queued it does the source release it, so if the destination refuses
(draining, or too little free KV for the request: the paper's PRE-ALLOC refusal) or the call fails, nothing changed
on the source and the request keeps running there. The destination continues it by recomputing its prefix or from the
copied KV (``VllmInstance.migrate_in``); under greedy decoding the stream is token-identical. Accepting never takes
the destination's step lock, so two instances migrating to each other cannot deadlock.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from llumnix.core.block_manager import blocks_for
from llumnix.core.llumlet import LlumletConfig
from llumnix.core.request import Request
from llumnix.runtime.ray_instance import InstanceActor, RequestMoved

if TYPE_CHECKING:
    from llumnix.runtime.vllm_instance import MigratedRequest, VllmInstance

log = logging.getLogger(__name__)


class VllmInstanceActor(InstanceActor):
    """Create with ``ray.remote(VllmInstanceActor)`` like ``InstanceActor`` (``ray_instance.actor_class`` picks it)."""

    engine: VllmInstance

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
        engine = VllmInstance(self.instance_id, config, LlumletConfig(enable_priorities=spec.priorities), time.time)
        self._step_tokens: list[tuple[int, int, int]] = []
        engine.on_token = lambda req, tok: self._step_tokens.append((req.request_id, req.num_generated - 1, tok))
        self._with_kv = spec.vllm_migration == "kv"
        info = {
            "vocab_size": engine.vocab_size,
            "max_position": engine.max_model_len,
            "kv_bytes_per_block": engine.kv_bytes_per_block,
            "model": f"vllm:{spec.model}",
        }
        log.info("instance %d: vLLM engine up (%s, %d blocks of %d)", self.instance_id, model_dir,
                 engine.blocks.num_blocks, engine.block_size)
        return engine, info

    async def _step_once(self) -> bool:
        if not self.engine.has_work():
            return False
        t0 = time.perf_counter()
        finished = self.engine.step()
        self._busy_s += time.perf_counter() - t0
        tokens, self._step_tokens = self._step_tokens, []
        self._report_step(tokens, finished)
        return True

    async def check(self) -> dict[str, Any]:
        """``InstanceActor.check`` plus the tokens whose KV migrations loaded rather than recomputed here."""
        return {**await super().check(), "kv_loaded_tokens": self.engine.connector.num_loaded_tokens}

    # -- migration: source side ----------------------------------------------------------------------------------
    async def _drive_once(self, migration_id: int, req: Request, dst_id: int, dst: Any) -> None:
        ll = self.llumlet
        ll.migrating.add(req.request_id)
        start = self.clock()
        moved, reason, num_bytes = False, "the request left the instance", 0
        try:
            async with self._lock:  # between steps: the request does not decode while it moves
                if self.engine.holds(req.request_id):
                    try:
                        migrated = self.engine.export(req.request_id, with_kv=self._with_kv)
                        moved = bool(await dst.mig_accept.remote(migration_id, migrated, self.instance_id, start))
                        reason = "the destination refused it (draining or too little free KV)"
                    except Exception as e:  # the destination died or the export failed: the request stays here
                        reason = f"failed: {e!r}"
                    if moved:
                        self.engine.release(req.request_id)
                        num_bytes = migrated.kv.num_bytes if migrated.kv is not None else 0
        finally:
            ll.migrating.discard(req.request_id)
            ll.migrations_out -= 1  # the slot migrate_out claimed
        end = self.clock()
        if moved:
            self._mig_committed += 1
            self._mig_downtime_s += end - start
            self._mig_bytes += num_bytes
            self._emit(RequestMoved(req.request_id, dst_id, end - start))
        else:
            self._mig_aborted += 1
            if self.engine.holds(req.request_id):
                req.migrations.append((start, end, self.instance_id, dst_id, 0.0, 1, False))
            log.info("instance %d: migration %d to %d aborted: %s", self.instance_id, migration_id, dst_id, reason)
        self._work.set()

    # -- migration: destination side -----------------------------------------------------------------------------
    async def mig_accept(self, migration_id: int, migrated: MigratedRequest, src_id: int, started_s: float) -> bool:
        """Continue a request the source exported (it releases its copy once this returns True). False when this
        instance takes no requests or lacks the free KV blocks for the request's tokens so far plus one."""
        req = migrated.request
        if self._failed or self._stopping or self.llumlet.draining or not self._has_room_for(req):
            return False
        now = self.clock()
        req.migrations.append((started_s, now, src_id, self.instance_id, now - started_s, 1, True))
        self.engine.migrate_in(migrated)
        self._work.set()
        log.debug("instance %d: took request %d from %d (migration %d)", self.instance_id, req.request_id, src_id,
                  migration_id)
        return True

    def _has_room_for(self, req: Request) -> bool:
        blocks = self.engine.blocks
        room = blocks.num_free_blocks - blocks.watermark_blocks - self.scheduler.waiting_demand_blocks
        return room >= blocks_for(req.seq_len + 1, blocks.block_size)


__all__ = ["VllmInstanceActor"]
