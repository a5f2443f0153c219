"""ModelRunner: runs prefill / decode steps of the LLaMA model over the paged KV cache and samples greedily.

It executes exactly the batch it is given; which sequences run, and which blocks they own, is the scheduler's call.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from llumnix.engine import paged_attention
from llumnix.engine.kv_cache import KVCachePool
from llumnix.engine.model import (
    LlamaForCausalLM,
    ModelConfig,
    build_model,
    causal_attention,
    repeat_kv,
)


@dataclass
class SeqInput:
    token_ids: list[int]  # tokens to process in this step
    start_pos: int  # tokens of this sequence already in the KV cache
    block_table: list[int]  # must cover positions [0, start_pos + len(token_ids))


def group_by_length(lens: list[int], max_padding: float = 2.0) -> list[list[int]]:
    """Split indices into groups, longest first, where padding every member to the group's longest costs at most
    `max_padding` x the group's real length: decode pads within a group, so memory stays O(total tokens) even when
    one long sequence shares the batch with many short ones."""
    groups: list[list[int]] = []
    total = 0
    for i in sorted(range(len(lens)), key=lambda j: -lens[j]):
        if groups and (len(groups[-1]) + 1) * lens[groups[-1][0]] <= max_padding * (total + lens[i]):
            groups[-1].append(i)
            total += lens[i]
        else:
            groups.append([i])
            total = lens[i]
    return groups


log = logging.getLogger(__name__)

# Static-shape decode (CUDA graphs): batches padded up to a bucket; the gather path also pads contexts up to a multiple
# of this many tokens (the paged kernel's block tables are sized for the longest context once).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
CONTEXT_BUCKET = 256
MAX_DECODE_GRAPHS = 48  # captured shapes kept; a step of another shape runs eagerly
# The cuBLAS workspace (bytes) of the products in captured decode steps: none, so that cuBLAS does not split their K
# dimension over programs and add a reduction kernel (LLaMA-7B on an H200: two of the four products per layer at
# batch 1-32, 64 more kernels a step; inside the graph the products take 0.12-0.17 ms less without, benchmarks/
# gpu_blas_choice.sh). Prefill and eager steps keep torch's workspace: without one, prefill of 256-1024 tokens is
# 1.8-3x slower. None leaves the workspace alone.
DECODE_GRAPH_BLAS_WORKSPACE: int | None = 0
CUBLAS_WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"


def _fill_tables(out: np.ndarray, seqs: list[SeqInput], fill: int) -> None:
    """Block tables into ``out`` (int32 [rows, width], rows >= len(seqs)), padded with ``fill``. In numpy: a torch
    tensor per row cost ~30 us, 4 ms a step at batch 128, while the GPU waited (the step's inputs are filled between
    steps)."""
    out.fill(fill)
    width = out.shape[1]
    for i, s in enumerate(seqs):
        table = s.block_table[:width]
        out[i, : len(table)] = table


def _padded_tables(seqs: list[SeqInput], width: int, fill: int, rows: int) -> torch.Tensor:
    """Block tables as an int32 [rows, width] tensor (CPU), padded with ``fill``."""
    out = np.empty((rows, width), dtype=np.int32)
    _fill_tables(out, seqs, fill)
    return torch.from_numpy(out)


@contextlib.contextmanager
def _blas_workspace(size: int | None) -> Iterator[None]:
    """cuBLAS workspaces made inside take ``size`` bytes (torch makes one per handle and stream, when first used:
    a graph's capture stream gets its own), then the size goes back to what it was. Through
    ``torch.backends.cuda.cublas_workspace_size`` where torch has it; older torch (2.11) reads the size from
    CUBLAS_WORKSPACE_CONFIG (":KiB:COUNT") whenever it makes a workspace, so that is set for the while instead."""
    if size is None:
        yield
        return
    set_size = getattr(torch.backends.cuda, "cublas_workspace_size", None)
    if set_size is not None:
        before = set_size()
        set_size(size)
        try:
            yield
        finally:
            set_size(before)
        return
    before_env = os.environ.get(CUBLAS_WORKSPACE_ENV)
    os.environ[CUBLAS_WORKSPACE_ENV] = f":{size // 1024}:1"
    try:
        yield
    finally:
        if before_env is None:
            del os.environ[CUBLAS_WORKSPACE_ENV]
        else:
            os.environ[CUBLAS_WORKSPACE_ENV] = before_env


def _bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= n), None)


class PagedDecodeAttention:
    """A decode step's attention over the paged pool (the ``AttnFn`` of the paged kernel's steps): each layer's new
    keys and values written at ``slots``, then every row's context read in place through ``tables`` / ``lens``.
    ``rope_store``: the fused model's rotary writes them instead, in the same kernel (k and v then come as None)."""

    def __init__(self, kv: KVCachePool, slots: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor) -> None:
        self.kv, self.slots, self.tables, self.lens = kv, slots, tables, lens

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
        if k is not None:
            self.kv.write_slots(layer, self.slots, k, v)
        return self.kv.paged_decode(layer, q, self.tables, self.lens)

    def rope_store(self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.kv.rope_store(layer, qkv, cos, sin, self.slots)


class StaticDecode:
    """One decode step of a fixed shape (``batch`` rows, contexts padded to ``context`` tokens) over static input
    buffers, so that a CUDA graph can replay it. Rows beyond the real batch, and context positions beyond a row's
    length, point at the pool's scratch slot and are masked out. ``run`` returns the logits of every row."""

    def __init__(self, runner: ModelRunner, batch: int, context: int) -> None:
        dev = runner.device
        self.runner, self.batch, self.context = runner, batch, context
        scratch, bs = runner.kv_cache.scratch_slot, runner.kv_cache.block_size
        # The inputs are packed in one buffer: longs (ids, positions, slots), then for the kernel int32s (context
        # lengths, then the block tables), filled in numpy in a pinned host copy and sent with one asynchronous copy a
        # step (five synchronous ones before: the fill on an H200's host, batch 1 94 -> 45-62 us, batch 128 581 ->
        # 270-490 us, but batch 256 627 -> 780-920 us, not understood; benchmarks/h200-step-host*.csv; then two
        # copies, one longer than one: h200-step-host-decompose.csv).
        pinned = dev.type == "cuda"
        width = -(-context // bs) if runner.paged_kernel else 0
        nbytes = 3 * batch * 8 + (batch * (1 + width) * 4 if runner.paged_kernel else 0)
        self._buf = torch.zeros(nbytes, dtype=torch.uint8, device=dev)
        self._host_buf = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pinned)
        longs = self._buf[: 24 * batch].view(torch.long).view(3, batch)
        self.ids, self.positions, self.slots = longs.unbind(0)
        self.slots.fill_(scratch)
        self._host_longs = self._host_buf[: 24 * batch].numpy().view(np.int64).reshape(3, batch)
        self._host_ints = self._host_buf[24 * batch :].numpy().view(np.int32)
        # the last copy out of the host buffer (recorded once it has been sent)
        self._sent = torch.cuda.Event() if pinned else None
        self._sent_pending = False
        if runner.paged_kernel:  # the kernel's inputs: context lengths, block tables (padding: the scratch block)
            ints = self._buf[24 * batch :].view(torch.int32)
            self.lens, self.tables = ints[:batch], ints[batch:].view(batch, width)
            self.lens.fill_(1)
            self.tables.fill_(scratch // bs)
        else:  # the gather path's: every context slot (padding: the scratch slot) and the key mask
            self.ctx = torch.full((batch, context), scratch, dtype=torch.long, device=dev)
            # Every row attends at least one position: a fully masked row would give NaN, and NaN in the scratch
            # slot would spread through the zero weights of masked positions (0 * NaN) into real rows.
            self.mask = torch.zeros(batch, 1, 1, context, dtype=torch.bool, device=dev)
            self.mask[..., 0] = True
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None  # the greedy tokens of ``logits``, taken inside the graph

    def fill(self, seqs: list[SeqInput], lens: list[int]) -> None:
        kv, scratch = self.runner.kv_cache, self.runner.kv_cache.scratch_slot
        bs, n = kv.block_size, len(seqs)
        if self._sent_pending:  # the host buffer is still being read by the last step's copy
            self._sent.synchronize()
        longs = self._host_longs
        longs[0, :n] = [s.token_ids[0] for s in seqs]
        longs[1, :n] = [s.start_pos for s in seqs]
        longs[2, :n] = [s.block_table[s.start_pos // bs] * bs + s.start_pos % bs for s in seqs]
        longs[:2, n:] = 0
        longs[2, n:] = scratch
        if self.runner.paged_kernel:
            ints = self._host_ints
            ints[:n] = lens
            ints[n : self.batch] = 1
            _fill_tables(ints[self.batch :].reshape(self.batch, -1), seqs, scratch // bs)
        self._buf.copy_(self._host_buf, non_blocking=True)
        if self._sent is not None:
            self._sent.record(torch.cuda.current_stream(self._buf.device))
            self._sent_pending = True
        if self.runner.paged_kernel:
            return
        ctx = torch.full((self.batch, self.context), scratch, dtype=torch.long)
        for i, (s, length) in enumerate(zip(seqs, lens, strict=True)):
            ctx[i, :length] = kv.slot_mapping(s.block_table, 0, length)
        self.ctx.copy_(ctx)
        self.mask.copy_((torch.arange(self.context) < torch.tensor(lens + [1] * (self.batch - len(seqs)))
                         [:, None])[:, None, None, :])

    def forward(self) -> torch.Tensor:
        kv, model = self.runner.kv_cache, self.runner.model
        if self.runner.paged_kernel:
            return model.compute_logits(model(self.ids, self.positions,
                                              PagedDecodeAttention(kv, self.slots, self.tables, self.lens)))

        def attn(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kv.write_slots(layer, self.slots, k, v)
            ks, vs = (repeat_kv(x, q.shape[1]).transpose(1, 2) for x in kv.gather_slots(layer, self.ctx))
            return F.scaled_dot_product_attention(q[:, :, None], ks, vs, attn_mask=self.mask)[:, :, 0]

        return model.compute_logits(model(self.ids, self.positions, attn))

    def _forward_sample(self) -> None:
        self.logits = self.forward()
        self.tokens = self.logits.argmax(-1)

    def capture(self, pool) -> None:
        """Record ``forward`` and the greedy sampling as a CUDA graph (after two warm-up runs on a side stream,
        which compute this step's own KV writes: replaying writes the same values), its products with
        DECODE_GRAPH_BLAS_WORKSPACE. Sampling inside the graph saves the host two launches a step (a copy of the
        logits and the argmax) while the GPU waits."""
        side = torch.cuda.Stream(self.runner.device)
        side.wait_stream(torch.cuda.current_stream(self.runner.device))
        with _blas_workspace(DECODE_GRAPH_BLAS_WORKSPACE):
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward_sample()
            torch.cuda.current_stream(self.runner.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self._forward_sample()

    def run(self) -> torch.Tensor:
        """One step: its ``logits`` (returned) and ``tokens`` (a graph's output buffers: the next replay overwrites
        them)."""
        if self.graph is None:
            self._forward_sample()
        else:
            self.graph.replay()
        return self.logits


class ModelRunner:
    """``cuda_graphs`` (default: on CUDA): decode steps run as replays of CUDA graphs captured per batch bucket
    (``BATCH_BUCKETS``; per context bucket too on the gather path, which only graphs steps whose sequences fit one
    padded group), which removes the per-kernel launch cost of eager PyTorch; other steps, and every step on CPU,
    run eagerly. ``paged_kernel`` (default: where Triton runs, i.e. on CUDA): decode attention reads K/V in place
    through the block tables (``paged_attention``) instead of gathering a padded copy of every sequence's context
    first; on CUDA it is also what makes decoding deterministic run to run (gather + SDPA is not, measured).
    ``invariant_batch`` R (default: off): batch-invariant decoding. Every decode step runs as chunks of exactly R
    rows (padded) and attention per sequence, so a sequence's logits are the same bits whatever other sequences
    share its step; a migrated request then decodes on its new instance exactly as it would have on its old one.
    It costs the padding (R rows of matrix work for any batch). ``fused_ops`` (default: on CUDA where Triton runs):
    residual adds with the next norm, rotary and SiLU-times-up as one kernel each (``fused_ops``; the model's bits may
    differ from the unfused path's in the last place, each path deterministic on its own)."""

    def __init__(
        self,
        config: ModelConfig | str,
        num_blocks: int,
        block_size: int = 16,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        cuda_graphs: bool | None = None,
        paged_kernel: bool | None = None,
        invariant_batch: int | None = None,
        fused_ops: bool | None = None,
    ):
        self.device, self.dtype = torch.device(device), dtype
        self.model = build_model(config, self.device, dtype, seed)  # a preset's name, a real model's, or a shape
        self.config = self.model.config
        self.kv_cache = KVCachePool(
            self.config.num_layers,
            num_blocks,
            block_size,
            num_kv_heads=self.config.num_kv_heads,
            head_dim=self.config.head_dim,
            dtype=dtype,
            device=self.device,
            scratch_blocks=1,
        )
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs needs a CUDA device")
        shape_ok = self.config.head_dim & (self.config.head_dim - 1) == 0  # the kernel's head dim: a power of two
        self.paged_kernel = paged_attention.available(self.device) and shape_ok if paged_kernel is None else paged_kernel
        if self.paged_kernel and not paged_attention.available(self.device):
            raise ValueError("the paged decode kernel needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
        fused_ok = paged_attention.available(self.device) and shape_ok
        self.fused_ops = fused_ok and self.device.type == "cuda" if fused_ops is None else fused_ops
        if self.fused_ops and not fused_ok:
            raise ValueError("the fused kernels need Triton, a power-of-two head dim and a CUDA device (or "
                             "TRITON_INTERPRET=1)")
        self.model.fused_ops = self.fused_ops
        if invariant_batch is not None and invariant_batch < 1:
            raise ValueError(f"invariant_batch must be a positive number of rows, got {invariant_batch}")
        self.invariant_batch = invariant_batch
        self._static: dict[tuple[int, int], StaticDecode] = {}
        self._tokens_host: torch.Tensor | None = None  # pinned, where a CUDA step's tokens land (_host_list)
        self._tokens_read = None
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    def prefill(self, seqs: list[SeqInput]) -> list[int]:
        return self._host_list(self.prefill_logits(seqs).argmax(-1))

    @torch.inference_mode()
    def decode(self, seqs: list[SeqInput]) -> list[int]:
        """Greedy next tokens: the argmax of ``decode_logits``' rows (taken inside a captured step's graph)."""
        return self._host_list(self._decode_steps(seqs, tokens=True))

    @torch.inference_mode()
    def _host_list(self, tokens: torch.Tensor) -> list[int]:
        """The step's tokens as a list. On CUDA through a pinned buffer and an event: ``tolist`` on a GPU tensor
        copies into pageable memory, a copy the driver stages while the thread waits, and meanwhile other threads'
        calls into the driver (a serving instance's migration reads, writes and sends) waited too (traced: up to a
        decode step on either side of a migration's stop-and-copy)."""
        if tokens.device.type != "cuda":
            return tokens.tolist()
        n = tokens.numel()
        if self._tokens_host is None or self._tokens_host.numel() < n:
            self._tokens_host = torch.empty(max(n, 256), dtype=torch.long, pin_memory=True)
            self._tokens_read = torch.cuda.Event()
        host = self._tokens_host[:n]
        host.copy_(tokens.reshape(-1).long(), non_blocking=True)
        self._tokens_read.record()
        self._tokens_read.synchronize()
        return host.tolist()

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _check(self, seqs: list[SeqInput]) -> None:
        if not seqs:
            raise ValueError("empty batch")
        for s in seqs:
            if not s.token_ids:
                raise ValueError("a sequence has no tokens to process")
            if s.start_pos + len(s.token_ids) > self.config.max_position:
                raise ValueError(f"sequence of {s.start_pos + len(s.token_ids)} tokens > max_position")

    @torch.inference_mode()
    def prefill_logits(self, seqs: list[SeqInput]) -> torch.Tensor:
        """Logits [B, vocab] (fp32) after each sequence's last token. Linear layers run over all tokens at once;
        attention runs per sequence (causal, plus any prefix already cached at start_pos > 0)."""
        self._check(seqs)
        kv = self.kv_cache
        ids = self._tensor([t for s in seqs for t in s.token_ids])
        positions = torch.cat([torch.arange(s.start_pos, s.start_pos + len(s.token_ids)) for s in seqs])
        slots = torch.cat([kv.slot_mapping(s.block_table, s.start_pos, len(s.token_ids)) for s in seqs])
        slots = slots.to(self.device)
        prefix_slots = [
            kv.slot_mapping(s.block_table, 0, s.start_pos + len(s.token_ids)).to(self.device) if s.start_pos else None
            for s in seqs
        ]
        ends = torch.tensor([len(s.token_ids) for s in seqs]).cumsum(0).tolist()
        starts = [0, *ends[:-1]]

        def attn(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kv.write_slots(layer, slots, k, v)
            out = torch.empty_like(q)
            for a, b, ctx in zip(starts, ends, prefix_slots, strict=True):
                ks, vs = (k[a:b], v[a:b]) if ctx is None else kv.gather_slots(layer, ctx)
                out[a:b] = causal_attention(q[a:b], ks, vs)
            return out

        hidden = self.model(ids, positions.to(self.device), attn)
        return self.model.compute_logits(hidden[self._tensor([e - 1 for e in ends])])

    @torch.inference_mode()
    def decode_logits(self, seqs: list[SeqInput]) -> torch.Tensor:
        """Logits [B, vocab] (fp32) for one new token per sequence, attending to its whole paged KV history.
        With ``invariant_batch`` R, the step runs in chunks of R rows, the last one padded: every sequence then
        goes through the same shapes whatever else is in its batch."""
        return self._decode_steps(seqs, tokens=False)

    def _decode_steps(self, seqs: list[SeqInput], tokens: bool) -> torch.Tensor:
        """The step's logits, or greedy tokens, of every sequence: one step, or one per chunk of ``invariant_batch``
        rows."""
        self._check(seqs)
        if any(len(s.token_ids) != 1 for s in seqs):
            raise ValueError("decode takes exactly one token per sequence")
        lens = [s.start_pos + 1 for s in seqs]
        rows = self.invariant_batch
        if rows is None or len(seqs) <= rows:
            return self._decode(seqs, lens, rows, tokens, keep=not tokens)
        return torch.cat([self._decode(seqs[i : i + rows], lens[i : i + rows], rows, tokens, keep=True)
                          for i in range(0, len(seqs), rows)])

    def _decode(self, seqs: list[SeqInput], lens: list[int], rows: int | None, tokens: bool = False,
                keep: bool = True) -> torch.Tensor:
        """One decode step of ``seqs`` (padded to ``rows`` rows if given): their logits, or their greedy tokens.
        Captured or static-shape steps where they apply; otherwise eagerly: the paged kernel, or keys gathered per
        length group (see group_by_length), padded and masked, one SDPA call per group (per sequence when ``rows``
        is given: padding a sequence's context to another's length could change its bits). ``keep``: a static
        step's result is copied out of its output buffer, which the next replay overwrites (not needed by a caller
        that reads it before the next step)."""
        # A static step pads contexts to a bucket: harmless for the kernel (it reads each row's own length), not for
        # the gather path's masked SDPA, whose padded length depends on the batch.
        if (self.cuda_graphs or rows) and (rows is None or self.paged_kernel):
            static = self._static_decode(seqs, lens, rows)
            if static is not None:
                static.run()
                out = (static.tokens if tokens else static.logits)[: len(seqs)]
                return out.clone() if keep else out
        kv, pad = self.kv_cache, (rows or len(seqs)) - len(seqs)
        ids = self._tensor([s.token_ids[0] for s in seqs] + [0] * pad)
        positions = self._tensor([s.start_pos for s in seqs] + [0] * pad)
        slots = torch.cat([kv.slot_mapping(s.block_table, s.start_pos, 1) for s in seqs]
                          + [torch.full((pad,), kv.scratch_slot, dtype=torch.long)]).to(self.device)
        if self.paged_kernel:  # no gather: the kernel reads the pool through the block tables
            width = max(-(-n // kv.block_size) for n in lens)
            tables = _padded_tables(seqs, width, kv.scratch_slot // kv.block_size, len(seqs) + pad).to(self.device)
            lens_t = torch.tensor(lens + [1] * pad, dtype=torch.int32, device=self.device)
            paged = PagedDecodeAttention(kv, slots, tables, lens_t)
            logits = self.model.compute_logits(self.model(ids, positions, paged))[: len(seqs)]
            return logits.argmax(-1) if tokens else logits
        groups = []  # (sequence indices, padded slots [b, L], key mask [b, 1, 1, L])
        for g in group_by_length(lens) if rows is None else [[i] for i in range(len(seqs))]:
            ctx = pad_sequence([kv.slot_mapping(seqs[i].block_table, 0, lens[i]) for i in g], batch_first=True)
            mask = torch.arange(ctx.shape[1]) < torch.tensor([lens[i] for i in g])[:, None]
            groups.append((self._tensor(g), ctx.to(self.device), mask[:, None, None, :].to(self.device)))

        def attn(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kv.write_slots(layer, slots, k, v)
            out = torch.zeros_like(q)  # padding rows attend nothing
            for idx, ctx, mask in groups:
                ks, vs = (repeat_kv(x, q.shape[1]).transpose(1, 2) for x in kv.gather_slots(layer, ctx))
                out[idx] = F.scaled_dot_product_attention(q[idx][:, :, None], ks, vs, attn_mask=mask)[:, :, 0]
            return out

        logits = self.model.compute_logits(self.model(ids, positions, attn))[: len(seqs)]
        return logits.argmax(-1) if tokens else logits

    def _static_decode(self, seqs: list[SeqInput], lens: list[int], rows: int | None) -> StaticDecode | None:
        """The static-shape step for this batch's shape (``rows`` rows, or the batch's bucket), its inputs filled
        with ``seqs``, captured as a CUDA graph first if new and ``cuda_graphs``; or None: run eagerly."""
        batch = rows or _bucket(len(lens), BATCH_BUCKETS)
        if batch is None:  # too many rows
            return None
        if not self.paged_kernel and len(group_by_length(lens)) > 1:  # gathering padded contexts: > 2x the KV
            return None
        if self.paged_kernel:  # the kernel reads each row's own length: one step per batch size covers every context
            context = self.config.max_position
        else:
            context = min(-(-max(lens) // CONTEXT_BUCKET) * CONTEXT_BUCKET, self.config.max_position)
        key = (batch, context)
        static = self._static.get(key)
        if static is None:
            if len(self._static) >= MAX_DECODE_GRAPHS:
                return None
            static = StaticDecode(self, batch, context)
            static.fill(seqs, lens)
            if self.cuda_graphs:
                try:
                    static.capture(self._graph_pool)
                except RuntimeError as e:  # e.g. a kernel that synchronises with the host under capture: stay eager
                    log.warning("CUDA graph capture of a decode step (batch %d, context %d) failed, decode steps "
                                "run eagerly from now on: %s", batch, context, e)
                    self.cuda_graphs = False
                    return None
            self._static[key] = static
            return static
        static.fill(seqs, lens)
        return static


@torch.inference_mode()
def dense_logits(model: LlamaForCausalLM, token_ids: list[int]) -> torch.Tensor:
    """Reference: logits [T, vocab] of one sequence with plain causal attention, no cache."""
    device = model.embed_tokens.weight.device
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)
    hidden = model(ids, torch.arange(len(token_ids), device=device), lambda _, q, k, v: causal_attention(q, k, v))
    return model.compute_logits(hidden)


def dense_generate(model: LlamaForCausalLM, prompt_ids: list[int], n: int) -> list[int]:
    """Reference greedy generation: recompute the whole sequence for each of the `n` new tokens."""
    ids = list(prompt_ids)
    for _ in range(n):
        ids.append(int(dense_logits(model, ids)[-1].argmax()))
    return ids[len(prompt_ids) :]
