"""The single-block attention backends against float64 attention, forward and backward.

On CPU only the fp32 reference path runs (its hand-written backward against autograd); on a GPU every aten
backend (cuDNN, flash, memory-efficient) is checked in each dtype it computes in, dense and ragged, causal and
full, GQA, and "auto" must give a finite, exact result for every floating dtype (cuDNN fed fp32 returns
garbage without an error, which once made the fp32 trainer's loss NaN from step 1).
"""
import pytest
import torch

from longvl.parallel.block_attention import attention_backward, attention_forward

BF16_TOL = dict(atol=3e-2, rtol=3e-2)  # bf16 inputs, outputs O(1); kernels accumulate in fp32
FP16_TOL = dict(atol=5e-3, rtol=5e-3)
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
FP32_GPU_TOL = dict(atol=1e-4, rtol=1e-4)  # fp32 GPU kernels (no tf32 inside attention)
GPU_TOL = {torch.bfloat16: BF16_TOL, torch.float16: FP16_TOL, torch.float32: FP32_GPU_TOL}


def _inputs(device, dtype, sq, sk, q_heads=28, kv_heads=4, dim=64):
    torch.manual_seed(1)
    q = torch.randn(1, sq, q_heads, dim, device=device, dtype=dtype)
    k, v = torch.randn(2, 1, sk, kv_heads, dim, device=device, dtype=dtype).unbind(0)
    return q, k, v, torch.randn_like(q)


def _exact(q, k, v, dout, causal, cu_q, cu_k):
    """float64 autograd through the reference forward: the ground truth for every backend."""
    full = [x.double().requires_grad_() for x in (q, k, v)]
    out, lse, _ = attention_forward(*full, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                    backend="reference")
    return (out, lse, *torch.autograd.grad(out, full, dout.double()))


def _cases(device):
    cu = lambda lens: torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
    return [  # (name, sq, sk, causal, cu_q, cu_k)
        ("dense_causal", 96, 96, True, None, None),
        ("dense_full_rect", 64, 128, False, None, None),
        ("varlen_causal", 80, 80, True, cu([16, 40, 24]), cu([16, 40, 24])),
        ("varlen_full_rect", 40, 80, False, cu([8, 20, 12]), cu([16, 40, 24])),
    ]


def test_reference_backward_matches_autograd():
    for name, sq, sk, causal, cu_q, cu_k in _cases(torch.device("cpu")):
        q, k, v, dout = _inputs("cpu", torch.float32, sq, sk, q_heads=4, kv_heads=2, dim=16)
        out, lse, *grads = _exact(q, k, v, dout, causal, cu_q, cu_k)
        mine_out, mine_lse, aux = attention_forward(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        mine = attention_backward(dout, q, k, v, mine_out, mine_lse, aux, causal=causal, cu_seqlens_q=cu_q,
                                  cu_seqlens_k=cu_k)
        torch.testing.assert_close(mine_out.double(), out, **FP32_TOL, msg=name)
        torch.testing.assert_close(mine_lse.double(), lse, **FP32_TOL, msg=name)
        for got, want in zip(mine, grads):
            torch.testing.assert_close(got.double(), want, **FP32_TOL, msg=name)


def test_bad_input_raises():
    q, k, v, _ = _inputs("cpu", torch.float32, 8, 8, q_heads=3, kv_heads=2, dim=8)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        attention_forward(q, k, v, causal=True)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention_forward(q, k[:, :, :1], v[:, :, :1], causal=True, backend="tpu")


@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_a_backend_refuses_a_dtype_it_cannot_compute(backend):
    q, k, v, _ = _inputs("cpu", torch.float32, 8, 8, q_heads=4, kv_heads=2, dim=8)
    with pytest.raises(ValueError, match=f"the {backend} attention backend does not compute in torch.float32"):
        attention_forward(q, k, v, causal=True, backend=backend)


def test_auto_picks_a_backend_for_every_dtype():
    from longvl.parallel.block_attention import BACKEND_DTYPES, resolve_backend

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert resolve_backend("auto", torch.device("cpu"), dtype) == "reference"
        chosen = resolve_backend("auto", torch.device("cuda"), dtype)
        assert dtype in BACKEND_DTYPES[chosen], (dtype, chosen)
    assert resolve_backend("auto", torch.device("cuda"), torch.float32) == "efficient"
    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == "cudnn"
    # a packed batch is one flash call; cuDNN would run (and plan) each of its sequence lengths apart
    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16, packed=True) == "flash"
    assert resolve_backend("auto", torch.device("cuda"), torch.float32, packed=True) == "efficient"
    torch.use_deterministic_algorithms(True)
    try:   # cuDNN's backward is not deterministic: deterministic runs take flash
        assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16) == "flash"
    finally:
        torch.use_deterministic_algorithms(False)


def _check_gpu_backend(backend, dtype):
    for name, sq, sk, causal, cu_q, cu_k in _cases(torch.device("cuda")):
        q, k, v, dout = _inputs("cuda", dtype, sq, sk)
        out, lse, *grads = _exact(q, k, v, dout, causal, cu_q, cu_k)
        mine_out, mine_lse, aux = attention_forward(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                                    backend=backend)
        mine = attention_backward(dout, q, k, v, mine_out, mine_lse, aux, causal=causal, cu_seqlens_q=cu_q,
                                  cu_seqlens_k=cu_k)
        tol = GPU_TOL[dtype]
        label = f"{backend} {dtype} {name}"
        assert mine_out.dtype == dtype and torch.isfinite(mine_out).all(), label
        torch.testing.assert_close(mine_out.double(), out, **tol, msg=f"{label} out")
        torch.testing.assert_close(mine_lse.double(), lse, **tol, msg=f"{label} lse")
        for got, want, what in zip(mine, grads, "qkv"):
            torch.testing.assert_close(got.double(), want, **tol, msg=f"{label} d{what}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_backends_match_reference(backend, dtype):
    from longvl.parallel.block_attention import BACKEND_DTYPES

    if dtype not in BACKEND_DTYPES[backend]:
        q, k, v, _ = _inputs("cuda", dtype, 16, 16)
        with pytest.raises(ValueError, match="does not compute in"):
            attention_forward(q, k, v, causal=True, backend=backend)
        return
    _check_gpu_backend(backend, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_auto_backend_is_exact_for_every_dtype(dtype):
    _check_gpu_backend("auto", dtype)


def test_per_sequence_loop_matches_ragged_reference():
    """cuDNN and the memory-efficient kernel run packed batches one sequence at a time; with the reference kernel
    standing in for the dense kernel (CPU), the loop must equal ragged reference attention, forward and backward."""
    import longvl.parallel.block_attention as la

    def dense_forward(q, k, v, causal, scale):
        out, lse = la._reference_forward(q, k, v, causal, scale, None, None)
        return out, lse, None

    def dense_backward(dout, q, k, v, out, lse, causal, scale, extras):
        return la._reference_backward(dout, q, k, v, out, lse, causal, scale, None, None)

    for name, sq, sk, causal, cu_q, cu_k in _cases(torch.device("cpu"))[2:]:
        q, k, v, dout = _inputs("cpu", torch.float64, sq, sk, q_heads=4, kv_heads=2, dim=16)
        out, lse, *grads = _exact(q, k, v, dout, causal, cu_q, cu_k)
        varlen = la._varlen(cu_q, cu_k, None, None, None, None)
        mine_out, mine_lse, aux = la._per_sequence_forward(dense_forward, "test", q, k, v, causal, 0.25, varlen)
        mine = la._per_sequence_backward(dense_backward, dout, q, k, v, mine_out, mine_lse, causal, 0.25, varlen, aux)
        torch.testing.assert_close(mine_out, out, **FP32_TOL, msg=name)
        torch.testing.assert_close(mine_lse.double(), lse, **FP32_TOL, msg=name)
        for got, want in zip(mine, grads):
            torch.testing.assert_close(got, want, **FP32_TOL, msg=name)
