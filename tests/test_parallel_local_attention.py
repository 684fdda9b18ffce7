"""The single-block attention backends against float64 attention, forward and backward.

On CPU only the fp32 reference path runs (its hand-written backward against autograd); on a GPU every aten
backend (cuDNN, flash, memory-efficient) is checked in bf16, dense and ragged, causal and full, GQA.
"""
import pytest
import torch

from longvl.parallel.local_attention import attention_backward, attention_forward

BF16_TOL = dict(atol=3e-2, rtol=3e-2)  # bf16 inputs, outputs O(1); kernels accumulate in fp32
FP32_TOL = dict(atol=1e-5, rtol=1e-5)


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


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient"])
def test_gpu_backends_match_reference(backend):
    for name, sq, sk, causal, cu_q, cu_k in _cases(torch.device("cuda")):
        if backend == "efficient" and cu_q is not None:
            continue  # dense only
        q, k, v, dout = _inputs("cuda", torch.bfloat16, sq, sk)
        out, lse, *grads = _exact(q, k, v, dout, causal, cu_q, cu_k)
        mine_out, mine_lse, aux = attention_forward(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                                    backend=backend)
        mine = attention_backward(dout, q, k, v, mine_out, mine_lse, aux, causal=causal, cu_seqlens_q=cu_q,
                                  cu_seqlens_k=cu_k)
        torch.testing.assert_close(mine_out.double(), out, **BF16_TOL, msg=f"{backend} {name} out")
        torch.testing.assert_close(mine_lse.double(), lse, **BF16_TOL, msg=f"{backend} {name} lse")
        for got, want, what in zip(mine, grads, "qkv"):
            torch.testing.assert_close(got.double(), want, **BF16_TOL, msg=f"{backend} {name} d{what}")


def test_per_sequence_loop_matches_ragged_reference(monkeypatch):
    """The cuDNN backend runs packed batches one sequence at a time; with the reference kernel standing in
    for cuDNN (CPU), the loop must equal ragged reference attention, forward and backward."""
    import longvl.parallel.local_attention as la

    def dense_forward(q, k, v, causal, scale):
        out, lse = la._reference_forward(q, k, v, causal, scale, None, None)
        return out, lse, None

    def dense_backward(dout, q, k, v, out, lse, causal, scale, extras):
        return la._reference_backward(dout, q, k, v, out, lse, causal, scale, None, None)

    monkeypatch.setattr(la, "_cudnn_dense_forward", dense_forward)
    monkeypatch.setattr(la, "_cudnn_dense_backward", dense_backward)
    for name, sq, sk, causal, cu_q, cu_k in _cases(torch.device("cpu"))[2:]:
        q, k, v, dout = _inputs("cpu", torch.float64, sq, sk, q_heads=4, kv_heads=2, dim=16)
        out, lse, *grads = _exact(q, k, v, dout, causal, cu_q, cu_k)
        mine_out, mine_lse, aux = la._cudnn_forward(q, k, v, causal, 0.25, la._varlen(cu_q, cu_k, None, None,
                                                                                       None, None))
        mine = la._cudnn_backward(dout, q, k, v, mine_out, mine_lse, causal, 0.25,
                                  la._varlen(cu_q, cu_k, None, None, None, None), aux)
        torch.testing.assert_close(mine_out, out, **FP32_TOL, msg=name)
        torch.testing.assert_close(mine_lse.double(), lse, **FP32_TOL, msg=name)
        for got, want in zip(mine, grads):
            torch.testing.assert_close(got, want, **FP32_TOL, msg=name)
