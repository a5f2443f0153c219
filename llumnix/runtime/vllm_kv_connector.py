"""A vLLM v1 KV connector that lands a migrated request's KV blocks in a destination engine.

The source side needs no connector: ``VllmInstance.read_kv`` copies the request's blocks straight out of the paged
KV tensors (the engine runs in-process). The destination registers the payload with ``expect`` right after adding the
request; when the scheduler admits it, ``get_num_new_matched_tokens`` reports the payload's tokens as externally
computed, the scheduler allocates blocks for them, and the worker side copies the payload into those blocks before
the forward pass (a synchronous load). Only the token(s) the payload lacks are then computed.

A copy is block-granular and layout-agnostic: every per-layer KV tensor indexes blocks on its first dimension, and a
token's slot (block ``i // block_size``, offset ``i % block_size``) is the same in both engines.

vLLM keeps one worker-side connector per process (a global). Two in-process engines therefore share it; this one
keeps no state on the worker side beyond the per-step metadata its own engine's scheduler binds, so that is safe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

CONNECTOR_NAME = "LlumnixMigrationConnector"
CONNECTOR_MODULE = __name__


@dataclass
class MigratedKV:
    """The KV of a request's first ``num_tokens`` tokens: per attention layer, its blocks in the engine's layout."""

    num_tokens: int
    block_size: int
    layers: dict[str, torch.Tensor]

    @property
    def num_blocks(self) -> int:
        return next(iter(self.layers.values())).shape[0] if self.layers else 0

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers.values())


@dataclass
class BlockLoad:
    """Copy payload blocks ``[first_block, first_block + len(block_ids))`` into the destination's ``block_ids``."""

    block_ids: list[int]
    first_block: int
    kv: MigratedKV


@dataclass
class MigrationMetadata(KVConnectorMetadata):
    loads: list[BlockLoad] = field(default_factory=list)


class LlumnixMigrationConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.block_size = vllm_config.cache_config.block_size
        self._expected: dict[str, MigratedKV] = {}  # vLLM request id -> payload not yet loaded
        self._local_hit_tokens: dict[str, int] = {}  # block-aligned prefix-cache hit seen at admission
        self._pending: list[BlockLoad] = []
        self.num_loaded_tokens = 0  # tokens whose KV came from a payload rather than a forward pass

    # -- scheduler side -------------------------------------------------------------------------------------------
    def expect(self, request_id: str, kv: MigratedKV) -> None:
        if kv.block_size != self.block_size:
            raise ValueError(f"payload block size {kv.block_size} != engine block size {self.block_size}")
        self._expected[request_id] = kv

    def forget(self, request_id: str) -> None:
        self._expected.pop(request_id, None)
        self._local_hit_tokens.pop(request_id, None)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        kv = self._expected.get(request.request_id)
        if kv is None:
            return 0, False
        # At least one token must be computed here to produce the next token's logits.
        usable = min(kv.num_tokens, request.num_tokens - 1)
        self._local_hit_tokens[request.request_id] = num_computed_tokens
        return max(0, usable - num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        kv = self._expected.pop(request.request_id, None)
        local = self._local_hit_tokens.pop(request.request_id, 0)
        if kv is None or num_external_tokens <= 0:
            return
        first = local // self.block_size  # a local hit handed to the connector is block-aligned
        last = -(-(local + num_external_tokens) // self.block_size)
        block_ids = blocks.get_block_ids()[0][first:last]
        self._pending.append(BlockLoad(block_ids, first, kv))
        self.num_loaded_tokens += num_external_tokens

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = MigrationMetadata(self._pending)
        self._pending = []
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self.forget(request.request_id)
        return False, None

    # -- worker side ----------------------------------------------------------------------------------------------
    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, MigrationMetadata)
        for load in meta.loads:
            dst_ids = torch.tensor(load.block_ids, dtype=torch.long)
            src = slice(load.first_block, load.first_block + len(load.block_ids))
            for name, layer in forward_context.no_compile_layers.items():
                cache = getattr(layer, "kv_cache", None)
                if cache is None or name not in load.kv.layers:
                    continue
                cache.index_copy_(0, dst_ids, load.kv.layers[name][src].to(cache.device))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return
