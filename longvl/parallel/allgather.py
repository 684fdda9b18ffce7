"""Llama3-style context parallelism: all-gather the KV heads, attend once per key set, reduce-scatter dK/dV.

Only the KV heads travel (GQA-native), in head groups: group g+1 is being gathered while group g computes,
and the local causal block (which needs no communication) runs while group 0 is in flight. With zigzag
pieces (see `ring`), rank r's queries see, besides their own causal block:
  piece 1 of ranks < r   (all local queries, no mask)   and
  all tokens of ranks > r (piece-2 queries, no mask),
so every rank merges at most three partial results, whatever the number of ranks: the rounding error does
not grow with the ring size. The gathered KV is kept for the backward (R x local KV of the KV heads only),
whose dK/dV go back to their owners with one fp32 reduce-scatter per head group.
"""
import torch
import torch.distributed as dist

from longvl.parallel.rows import add_rows, take
from longvl.parallel.comm import all_gather_async, reduce_scatter_async
from longvl.parallel.block_attention import attention_backward, attention_forward
from longvl.parallel.merge import merge_block


def _key_sets(docs, rank, size, causal):
    """Per remote call: (q rows, (rank ids, positions) of the gathered keys, varlen kwargs)."""
    if not causal:
        others = [t for t in range(size) if t != rank]
        return [(None, docs.gathered_index(others, (1, 2)), docs.varlen(2, 2 * (size - 1)))] if others else []
    calls = []
    if rank > 0:
        calls.append((None, docs.gathered_index(range(rank), (1,)), docs.varlen(2, rank)))
    if rank < size - 1:
        later = range(rank + 1, size)
        calls.append((docs.rows(2), docs.gathered_index(later, (1, 2)), docs.varlen(1, 2 * len(later))))
    return calls


def _select(gathered, index):
    """Keys and values at (rank, position) pairs of a gathered (R, B, S, 2, h, D) buffer, as (B, N, h, D)."""
    picked = gathered.transpose(1, 2)[index].movedim(0, 1)  # (B, N, 2, h, D)
    return picked[:, :, 0], picked[:, :, 1]


class AllGatherKVAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, docs, backend, head_groups):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        kv_heads, q_per_kv = k.shape[2], q.shape[2] // k.shape[2]
        if kv_heads % head_groups:
            raise ValueError(f"head_groups={head_groups} must divide the {kv_heads} KV heads")
        step = kv_heads // head_groups
        kv_slices = [slice(g * step, (g + 1) * step) for g in range(head_groups)]
        q_slices = [slice(s.start * q_per_kv, s.stop * q_per_kv) for s in kv_slices]
        pack = lambda s: torch.stack([k[:, :, s], v[:, :, s]], dim=2)  # (B, S, 2, h, D)
        pending = all_gather_async(pack(kv_slices[0]), group)
        local_out, local_lse, local_aux = attention_forward(q, k, v, causal=causal, scale=scale, backend=backend,
                                                            **docs.varlen(2, 2))
        out, lse = local_out.float(), local_lse.float().clone()
        calls = _key_sets(docs, rank, size, causal)
        gathered, auxes = [], []
        for g in range(head_groups):
            buffer, work = pending
            work.wait()
            if g + 1 < head_groups:
                pending = all_gather_async(pack(kv_slices[g + 1]), group)
            gathered.append(buffer)
            qs = q_slices[g]
            for q_rows, index, varlen in calls:
                keys, values = _select(buffer, index)
                block_out, block_lse, aux = attention_forward(
                    take(q[:, :, qs], q_rows), keys, values, causal=False, scale=scale, backend=backend, **varlen)
                auxes.append(aux)
                merge_block(out[:, :, qs], lse[:, :, qs], block_out, block_lse, q_rows)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, *gathered)
        ctx.args = (group, causal, scale, docs, local_aux, calls, auxes, kv_slices, q_slices)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *gathered = ctx.saved_tensors
        group, causal, scale, docs, local_aux, calls, auxes, kv_slices, q_slices = ctx.args
        dout = dout.contiguous()
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, local_aux, causal=causal, scale=scale,
                                        **docs.varlen(2, 2))
        dq, dk, dv = dq.float(), dk.float(), dv.float()
        aux_iter = iter(auxes)
        scattered = []
        for g, buffer in enumerate(gathered):
            qs = q_slices[g]
            grad = torch.zeros_like(buffer, dtype=torch.float32)
            for q_rows, index, varlen in calls:
                keys, values = _select(buffer, index)
                dq_b, dk_b, dv_b = attention_backward(
                    take(dout[:, :, qs], q_rows), take(q[:, :, qs], q_rows), keys, values,
                    take(out[:, :, qs], q_rows), take(lse[:, :, qs], q_rows), next(aux_iter), causal=False,
                    scale=scale, **varlen)
                add_rows(dq[:, :, qs], q_rows, dq_b)
                grad.transpose(1, 2).index_put_(index, torch.stack([dk_b, dv_b], 2).movedim(1, 0).float(),
                                                accumulate=True)
            scattered.append(reduce_scatter_async(grad, group))  # overlaps the next group's compute
        for (own, work), s in zip(scattered, kv_slices):
            work.wait()
            dk[:, :, s] += own[:, :, 0]
            dv[:, :, s] += own[:, :, 1]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def allgather_attention(q, k, v, group, docs, *, causal=True, scale=None, backend="auto", head_groups=None):
    """All-gather-KV attention over `group` on ring-local q (B, S, Hq, D), k, v (B, S, Hkv, D)."""
    head_groups = head_groups or (2 if k.shape[2] % 2 == 0 else 1)
    return AllGatherKVAttention.apply(q, k, v, group, causal, scale, docs, backend, head_groups)
