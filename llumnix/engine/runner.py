"""ModelRunner: runs prefill / decode steps of the LLaMA model over the paged KV cache and samples greedily.

It executes exactly the batch it is given; which sequences run, and which blocks they own, is the scheduler's call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llumnix.engine.kv_cache import KVCachePool
from llumnix.engine.model import LlamaForCausalLM, ModelConfig, build_model, causal_attention, get_model_config


@dataclass
class SeqInput:
    token_ids: list[int]  # tokens to process in this step
    start_pos: int  # tokens of this sequence already in the KV cache
    block_table: list[int]  # must cover positions [0, start_pos + len(token_ids))


def varlen_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_of_key: torch.Tensor) -> torch.Tensor:
    """One query per sequence against its own keys, without padding.

    q [B, H, D]; k, v [N, KVH, D]: the keys of all sequences concatenated; seq_of_key [N] (sorted) says whose each is.
    Memory is O(N * H * D) however unequal the lengths (padding to the longest could cost B x max_len).
    """
    num_seqs, heads, dim = q.shape
    kv_heads = k.shape[1]
    shape = (num_seqs, kv_heads, heads // kv_heads)
    qk = q.float().view(*shape, dim)[seq_of_key]  # [N, KVH, G, D]
    scores = torch.einsum("nkgd,nkd->nkg", qk, k.float()) * dim**-0.5
    index = seq_of_key[:, None, None].expand_as(scores)
    smax = torch.full(shape, float("-inf"), device=q.device).scatter_reduce(0, index, scores, "amax")
    p = (scores - smax[seq_of_key]).exp()
    denom = torch.zeros(shape, device=q.device).index_add_(0, seq_of_key, p)
    out = torch.zeros(*shape, dim, device=q.device).index_add_(0, seq_of_key, p[..., None] * v.float()[:, :, None, :])
    return (out / denom[..., None]).view(num_seqs, heads, dim).to(q.dtype)


class ModelRunner:
    def __init__(
        self,
        config: ModelConfig | str,
        num_blocks: int,
        block_size: int = 16,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ):
        self.config = get_model_config(config) if isinstance(config, str) else config
        self.device, self.dtype = torch.device(device), dtype
        self.model = build_model(self.config, self.device, dtype, seed)
        self.kv_cache = KVCachePool(
            self.config.num_layers,
            num_blocks,
            block_size,
            num_kv_heads=self.config.num_kv_heads,
            head_dim=self.config.head_dim,
            dtype=dtype,
            device=self.device,
        )

    def prefill(self, seqs: list[SeqInput]) -> list[int]:
        return self.prefill_logits(seqs).argmax(-1).tolist()

    def decode(self, seqs: list[SeqInput]) -> list[int]:
        return self.decode_logits(seqs).argmax(-1).tolist()

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
            for a, b, ctx in zip(starts, ends, prefix_slots):
                ks, vs = (k[a:b], v[a:b]) if ctx is None else kv.gather_slots(layer, ctx)
                out[a:b] = causal_attention(q[a:b], ks, vs)
            return out

        hidden = self.model(ids, positions.to(self.device), attn)
        return self.model.compute_logits(hidden[self._tensor([e - 1 for e in ends])])

    @torch.inference_mode()
    def decode_logits(self, seqs: list[SeqInput]) -> torch.Tensor:
        """Logits [B, vocab] (fp32) for one new token per sequence, attending to its whole paged KV history."""
        self._check(seqs)
        if any(len(s.token_ids) != 1 for s in seqs):
            raise ValueError("decode takes exactly one token per sequence")
        kv = self.kv_cache
        ids = self._tensor([s.token_ids[0] for s in seqs])
        positions = self._tensor([s.start_pos for s in seqs])
        slots = torch.cat([kv.slot_mapping(s.block_table, s.start_pos, 1) for s in seqs]).to(self.device)
        ctx_slots = torch.cat([kv.slot_mapping(s.block_table, 0, s.start_pos + 1) for s in seqs]).to(self.device)
        seq_of_key = torch.repeat_interleave(
            torch.arange(len(seqs)), torch.tensor([s.start_pos + 1 for s in seqs])
        ).to(self.device)

        def attn(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kv.write_slots(layer, slots, k, v)
            ks, vs = kv.gather_slots(layer, ctx_slots)
            return varlen_decode_attention(q, ks, vs, seq_of_key)

        return self.model.compute_logits(self.model(ids, positions, attn))


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
