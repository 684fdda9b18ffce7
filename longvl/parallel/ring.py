"""Zigzag ring attention: KV blocks travel the ring while each rank computes on the block it holds.

Rank r holds zigzag pieces r and 2R-1-r of every document (see `sharding`). At step s it holds the KV of
rank src = (r - s) mod R; causal work per step is then always half a square block:
  s = 0:   local q against local kv, causal;
  src < r: all local q against piece 1 of src's kv (entirely in the past), no mask;
  src > r: piece 2 of local q against all of src's kv (entirely in the past), no mask.
The next KV block is in flight while the current one computes. Partial outputs merge in fp32 (`merge`).
Backward re-circulates KV; each block's dK/dV (fp32) joins an accumulator that follows one step behind
the KV and ends on the rank that owns the block after a last hop.
"""
import torch
import torch.distributed as dist

from longvl.parallel.rows import add_rows, take
from longvl.parallel.comm import RingExchange
from longvl.parallel.block_attention import attention_backward, attention_forward
from longvl.parallel.merge import merge_block


def _schedule(docs, rank, size, causal):
    """Per step: (q rows, kv rows, causal, varlen kwargs)."""
    if not causal:
        return [(None, None, False, docs.varlen(2, 2))] * size
    first, second = docs.rows(1), docs.rows(2)
    steps = [(None, None, True, docs.varlen(2, 2))]
    for step in range(1, size):
        src = (rank - step) % size
        steps.append((None, first, False, docs.varlen(2, 1)) if src < rank
                     else (second, None, False, docs.varlen(1, 2)))
    return steps


class ZigzagRingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, docs, backend):
        size = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        ring = RingExchange(group) if size > 1 else None
        schedule = _schedule(docs, rank, size, causal)
        kv = torch.stack([k, v])
        out = lse = None
        auxes = []
        for step, (q_rows, kv_rows, block_causal, varlen) in enumerate(schedule):
            if step + 1 < size:
                next_kv, handle = ring.start(kv)
            block_out, block_lse, aux = attention_forward(
                take(q, q_rows), take(kv[0], kv_rows), take(kv[1], kv_rows), causal=block_causal, scale=scale,
                backend=backend, **varlen)
            auxes.append(aux)
            if out is None:
                out, lse = block_out.float(), block_lse.float().clone()
            else:
                merge_block(out, lse, block_out, block_lse, q_rows)
            if step + 1 < size:
                handle.wait()
                kv = next_kv
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (ring, schedule, auxes, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring, schedule, auxes, scale = ctx.args
        size = len(schedule)
        dout = dout.contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        kv = torch.stack([k, v])
        dkv = dkv_handle = None
        for step, (q_rows, kv_rows, block_causal, varlen) in enumerate(schedule):
            if step + 1 < size:
                next_kv, kv_handle = ring.start(kv)
            dq_b, dk_b, dv_b = attention_backward(
                take(dout, q_rows), take(q, q_rows), take(kv[0], kv_rows), take(kv[1], kv_rows),
                take(out, q_rows), take(lse, q_rows), auxes[step], causal=block_causal, scale=scale, **varlen)
            add_rows(dq, q_rows, dq_b)
            block_dkv = torch.stack([dk_b, dv_b]).float()
            if kv_rows is not None:
                full = kv.new_zeros(kv.shape, dtype=torch.float32)
                add_rows(full[0], kv_rows, block_dkv[0])
                add_rows(full[1], kv_rows, block_dkv[1])
                block_dkv = full
            if dkv_handle is not None:
                dkv_handle.wait()
                block_dkv += dkv
            if size > 1:  # pass the accumulator on: after the last step it reaches the block's owner
                dkv, dkv_handle = ring.start(block_dkv)
            else:
                dkv = block_dkv
            if step + 1 < size:
                kv_handle.wait()
                kv = next_kv
        if dkv_handle is not None:
            dkv_handle.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def ring_attention(q, k, v, group, docs, *, causal=True, scale=None, backend="auto"):
    """Zigzag ring attention over `group` on ring-local q (B, S, Hq, D), k, v (B, S, Hkv, D)."""
    return ZigzagRingAttention.apply(q, k, v, group, causal, scale, docs, backend)
