"""Ulysses (DeepSpeed) sequence parallelism: trade sequence shards for head shards with all-to-all.

Each rank sends q, k, v as (B, S/P, H, D) and gets (B, S, H/P, D): the whole sequence for H/P heads, so any
single-GPU attention (or, in the hybrid, a ring over other ranks) runs on it; the output goes back the same
way. Needs Hq % P == 0. With fewer KV heads than ranks (GQA), each KV head is replicated P/Hkv times first
so rank i gets the KV head of its query heads; autograd sums the replicas' gradients.
"""
import torch

from longvl.parallel.comm import heads_to_seq, seq_to_heads


class _AllToAll(torch.autograd.Function):
    """Sequence -> heads (`to_heads`) or heads -> sequence; the gradient goes the other way."""

    @staticmethod
    def forward(ctx, x, group, to_heads):
        ctx.group, ctx.to_heads = group, to_heads
        return (seq_to_heads if to_heads else heads_to_seq)(x, group)

    @staticmethod
    def backward(ctx, grad):
        return (heads_to_seq if ctx.to_heads else seq_to_heads)(grad.contiguous(), ctx.group), None, None


def ulysses_attention(q, k, v, group, size, inner):
    """All-to-all q, k, v over `group` (`size` ranks), run `inner(q, k, v)` on the head shard, and return."""
    q_heads, kv_heads = q.shape[2], k.shape[2]
    if q_heads % size:
        raise ValueError(f"Ulysses over {size} ranks needs the query heads ({q_heads}) divisible by {size}")
    if kv_heads % size:
        if size % kv_heads:
            raise ValueError(f"Ulysses over {size} ranks needs KV heads ({kv_heads}) divisible by {size} or "
                             f"dividing it")
        k = k.repeat_interleave(size // kv_heads, dim=2)
        v = v.repeat_interleave(size // kv_heads, dim=2)
    out = inner(*(_AllToAll.apply(x, group, True) for x in (q, k, v)))
    return _AllToAll.apply(out, group, False)
