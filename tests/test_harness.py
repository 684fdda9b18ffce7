"""The test harness itself: distributed spawning (results, errors, timeouts), the interpreter switch and the
interpreter's fixes (bf16 rounding, libdevice tanh)."""
import os
import time

import pytest
import torch
import torch.distributed as dist
import triton
import triton.language as tl
from triton.language.extra import libdevice

from longvl import kernels
from tests.distributed import run_distributed


def _all_reduce_rank(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    got = [torch.zeros(1) for _ in range(world_size)]
    dist.all_gather(got, torch.tensor([float(rank)]))
    return t.item(), [g.item() for g in got]


def _all_to_all_and_ring(rank, world_size):
    x = torch.arange(world_size, dtype=torch.float32) + 10 * rank
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x)
    send, recv = torch.tensor([float(rank)]), torch.zeros(1)
    ops = [dist.P2POp(dist.isend, send, (rank + 1) % world_size),
           dist.P2POp(dist.irecv, recv, (rank - 1) % world_size)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out.tolist(), recv.item()


def _hang_on_rank_zero(rank, world_size):
    if rank == 0:
        time.sleep(3600)
    dist.barrier()


def _raise_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    return rank


@pytest.mark.parametrize("world_size", [2, 4])
def test_collectives_on_gloo(world_size):
    results = run_distributed(_all_reduce_rank, world_size)
    total = world_size * (world_size + 1) / 2
    assert [r[0] for r in results] == [total] * world_size
    assert all(r[1] == list(map(float, range(world_size))) for r in results)


@pytest.mark.parametrize("world_size", [2, 4])
def test_all_to_all_and_send_recv_on_gloo(world_size):
    for rank, (a2a, from_prev) in enumerate(run_distributed(_all_to_all_and_ring, world_size)):
        assert a2a == [float(rank + 10 * src) for src in range(world_size)]
        assert from_prev == float((rank - 1) % world_size)


def test_hung_collective_is_killed_by_the_timeout():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish"):
        run_distributed(_hang_on_rank_zero, 2, timeout=15)
    assert time.monotonic() - start < 40


def test_rank_exception_reaches_the_test():
    with pytest.raises(RuntimeError, match="deliberate failure on rank 1"):
        run_distributed(_raise_on_rank_one, 2, timeout=60)


def test_interpreter_is_on_exactly_when_there_is_no_gpu():
    if "TRITON_INTERPRET" in os.environ and torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET set explicitly")
    assert kernels.INTERPRETED == (not torch.cuda.is_available())


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=offsets < n), mask=offsets < n)


@triton.jit
def _tanh_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(y_ptr + offsets, libdevice.tanh(tl.load(x_ptr + offsets, mask=offsets < n)), mask=offsets < n)


def test_kernels_round_to_bf16_and_take_tanh_as_on_the_gpu(device):
    """fp32 -> bf16 stores round to nearest even (the interpreter alone would truncate), bitwise as torch's
    conversion, specials included; libdevice's tanh runs (the interpreter alone returns None) within 2 ulp."""
    x = torch.cat([torch.randn(4000, device=device) * 10, torch.tensor(
        [float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 3.4e38, 1e-40, -1e-40], device=device)])
    y = torch.empty_like(x, dtype=torch.bfloat16)
    _copy_kernel[(1,)](x, y, x.numel(), BLOCK=4096)
    want = x.bfloat16()
    assert (torch.equal(y.view(torch.int16)[~x.isnan()], want.view(torch.int16)[~x.isnan()])
            and y[x.isnan()].isnan().all())
    t = torch.empty_like(x)
    _tanh_kernel[(1,)](x, t, x.numel(), BLOCK=4096)
    finite = ~x.isnan()
    torch.testing.assert_close(t[finite].double(), torch.tanh(x[finite].double()), atol=2**-126,
                               rtol=2 * 2**-23)   # atol: the GPU flushes subnormal results to zero
