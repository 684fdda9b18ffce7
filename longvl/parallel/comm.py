"""Collectives shared by the context-parallel algorithms.

All of them are issued by every rank of the group in the same order (the algorithms never branch on rank
around a collective), which is what keeps NCCL and gloo from deadlocking. Asynchronous ones return a handle
whose `wait()` must be called before the result is read.
"""
import warnings

import torch
import torch.distributed as dist


class RingExchange:
    """Send a tensor to the next rank of the ring and receive the previous rank's, asynchronously."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def start(self, send):
        """Post the send of `send` and the receive of a same-shaped tensor; returns (received, handle)."""
        received = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, self.next, self.group),
               dist.P2POp(dist.irecv, received, self.prev, self.group)]
        return received, _Handles(dist.batch_isend_irecv(ops))


class _Handles:
    def __init__(self, works):
        self.works = works

    def wait(self):
        for work in self.works:
            work.wait()


def all_gather_async(local, group):
    """(world, *local.shape) buffer filled with every rank's `local`, and its handle."""
    world = dist.get_world_size(group)
    out = local.new_empty((world * local.shape[0],) + tuple(local.shape[1:]))  # gloo wants it concatenated
    with warnings.catch_warnings():  # deprecated for a new name in torch 2.13, the only name in 2.11
        warnings.simplefilter("ignore", FutureWarning)
        work = dist.all_gather_into_tensor(out, local.contiguous(), group=group, async_op=True)
    return out.view((world,) + tuple(local.shape)), work


def reduce_scatter_async(full, group):
    """Sum of every rank's (world, ...) `full` buffer, each rank receiving its own slice; and the handle."""
    out = full.new_empty(full.shape[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        work = dist.reduce_scatter_tensor(out, full.flatten(0, 1).contiguous(), group=group, async_op=True)
    return out, work


def all_to_all(x, group):
    """Exchange x (world, ...) so that slice i goes to rank i; returns (world, ...) with slice j from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def seq_to_heads(x, group):
    """(B, S/P, H, D) sequence-sharded -> (B, S, H/P, D) head-sharded (the Ulysses forward exchange)."""
    world = dist.get_world_size(group)
    b, s, h, d = x.shape
    parts = x.view(b, s, world, h // world, d).permute(2, 0, 1, 3, 4)
    out = all_to_all(parts, group)  # (P, B, s, h/P, D), slice j = rank j's sequence part
    return out.permute(1, 0, 2, 3, 4).reshape(b, world * s, h // world, d)


def heads_to_seq(x, group):
    """(B, S, H/P, D) head-sharded -> (B, S/P, H, D) sequence-sharded (inverse of `seq_to_heads`)."""
    world = dist.get_world_size(group)
    b, s, h, d = x.shape
    parts = x.view(b, world, s // world, h, d).permute(1, 0, 2, 3, 4)
    out = all_to_all(parts, group)  # (P, B, S/P, h, D), slice j = rank j's heads
    return out.permute(1, 2, 0, 3, 4).reshape(b, s // world, world * h, d)
