"""Attention over one block of the sequence on one GPU, returning the log-sum-exp that context parallelism
needs to merge blocks.

Every context-parallel algorithm calls `attention_forward` / `attention_backward` on blocks of the sequence;
`block_attention` wraps the pair as an autograd function for a rank that holds whole documents (no context
parallelism, or after the Ulysses exchange). The backward takes the *final* (merged) output and
log-sum-exp, not the block's own, so that the block gradients sum to the exact gradient (the
flash-attention backward identity).

Layout: q (B, Sq, Hq, D), k and v (B, Sk, Hkv, D), Hq a multiple of Hkv (GQA). Returns out (B, Sq, Hq, D) in
q's dtype and lse (B, Sq, Hq) in fp32. Packed batches pass `cu_seqlens_q` / `cu_seqlens_k` (int32 cumulative
lengths, B == 1): sequence i of q attends only to sequence i of k. `causal` is bottom-right aligned per
sequence (row i of a length-m query against n keys sees keys j <= i + n - m); the algorithms here only use
it on square blocks, where every backend agrees.

Backends (`backend=`) and the dtypes they compute in (`BACKEND_DTYPES`):
- "cudnn": aten's cuDNN SDPA, bf16 / fp16; packed batches as one call per sequence.
- "flash": aten's flash-attention 2, bf16 / fp16, dense and varlen, GQA-native.
- "efficient": aten's memory-efficient kernel, fp32 / bf16 / fp16; packed batches one call per sequence.
- "reference": PyTorch math with an explicit mask, in fp32 (float64 kept): CPU and tests.
"auto" takes "reference" on CPU; on a GPU, for bf16 / fp16, "flash" for packed batches (cuDNN builds an execution
plan for every new sequence length, and real packs bring new lengths every step: seconds per step against
milliseconds, bench/results/attention_backends_*.json) and under `torch.use_deterministic_algorithms` (flash's backward
is then deterministic, cuDNN's is not), "cudnn" for dense blocks; "efficient" for fp32. A backend asked
for a dtype it cannot compute raises ValueError: cuDNN's SDPA fed fp32 does not refuse, it returns garbage.
flash-attn is not installed in our environments, so no path depends on it.
"""
import dataclasses
import functools

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)
# What each backend computes in. For dense half-precision blocks the GPU choice is cuDNN, the fastest of the three
# in bench/results/attention_backends_*.json.
BACKEND_DTYPES = {
    "cudnn": HALF_DTYPES,
    "flash": HALF_DTYPES,
    "efficient": (torch.float32,) + HALF_DTYPES,
    "reference": (torch.float64, torch.float32) + HALF_DTYPES,
}
_BACKENDS = tuple(BACKEND_DTYPES)


@dataclasses.dataclass
class BlockAux:
    """What a backend's backward needs besides q, k, v, out and lse (RNG state, ragged offsets)."""
    backend: str
    extras: tuple = ()


def _check(q, k, v, cu_seqlens_q, cu_seqlens_k):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q (B, S, Hq, D) and k, v (B, S, Hkv, D); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or q.shape[2] % k.shape[2]:
        raise ValueError(f"batch and head dim must match and Hq must be a multiple of Hkv: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("pass both cu_seqlens_q and cu_seqlens_k, or neither")
    if cu_seqlens_q is not None:
        if q.shape[0] != 1:
            raise ValueError(f"packed (cu_seqlens) attention needs batch size 1, got {q.shape[0]}")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
        if not q.is_cuda and (int(cu_seqlens_q[-1]) != q.shape[1] or int(cu_seqlens_k[-1]) != k.shape[1]):
            raise ValueError(f"cu_seqlens end at {int(cu_seqlens_q[-1])} / {int(cu_seqlens_k[-1])} but the "
                             f"sequences have {q.shape[1]} / {k.shape[1]} tokens")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, packed: bool = False) -> str:
    """The backend that runs `dtype` tensors on `device` (`packed`: with cu_seqlens): "auto" picks one, an explicit
    one must fit."""
    if backend not in ("auto",) + _BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {('auto',) + _BACKENDS}")
    if backend == "auto":
        if device.type != "cuda":
            return "reference"
        if dtype not in HALF_DTYPES:
            return "efficient"
        # cuDNN's backward is not deterministic (torch's own SDPA dispatch skips it under deterministic
        # algorithms); flash's backward is, when torch asks for determinism. cuDNN runs a packed batch as one call
        # per sequence and plans each new length afresh; flash takes the whole pack in one varlen call.
        return "flash" if packed or torch.are_deterministic_algorithms_enabled() else "cudnn"
    if dtype not in BACKEND_DTYPES[backend]:
        fits = [name for name, dtypes in BACKEND_DTYPES.items() if dtype in dtypes]
        raise ValueError(f"the {backend} attention backend does not compute in {dtype}; backends for {dtype}: "
                         f"{fits} (or backend='auto')")
    if backend != "reference" and device.type != "cuda":
        raise ValueError(f"the {backend} attention backend runs on CUDA tensors, got {device}; use 'reference'")
    return backend


# ---------------------------------------------------------------- reference (fp32, explicit mask)
def _mask(sq, sk, causal, cu_q, cu_k, device):
    """Boolean (Sq, Sk) mask: same sequence and, if causal, bottom-right causal inside it."""
    if cu_q is None:
        cu_q = torch.tensor([0, sq], device=device)
        cu_k = torch.tensor([0, sk], device=device)
    rows, cols = torch.arange(sq, device=device), torch.arange(sk, device=device)
    seq_q = torch.searchsorted(cu_q[1:].long(), rows, right=True)
    seq_k = torch.searchsorted(cu_k[1:].long(), cols, right=True)
    mask = seq_q[:, None] == seq_k[None, :]
    if causal:
        pos_q = rows - cu_q.long()[seq_q]
        pos_k = cols - cu_k.long()[seq_k]
        len_q = (cu_q[1:] - cu_q[:-1]).long()[seq_q]
        len_k = (cu_k[1:] - cu_k[:-1]).long()[seq_k]
        mask &= pos_k[None, :] - len_k[None, :] <= pos_q[:, None] - len_q[:, None]
    return mask


def _expand_kv(x, groups):
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def _reduce_kv(dx, groups):
    if groups == 1:
        return dx
    b, s, h, d = dx.shape
    return dx.view(b, s, h // groups, groups, d).sum(3)


def _wide(x):
    """fp32 for half-precision inputs, float64 kept as is (the float64 ground truth in tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _reference_probs(q, k, causal, scale, cu_q, cu_k, lse=None):
    groups = q.shape[2] // k.shape[2]
    scores = torch.einsum("bqhd,bkhd->bhqk", _wide(q), _expand_kv(_wide(k), groups)) * scale
    mask = _mask(q.shape[1], k.shape[1], causal, cu_q, cu_k, q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=-1).transpose(1, 2)  # (B, Sq, H)
    probs = torch.exp(scores - lse.transpose(1, 2).unsqueeze(-1)).nan_to_num(0.0)
    return probs, lse


def _reference_forward(q, k, v, causal, scale, cu_q, cu_k):
    probs, lse = _reference_probs(q, k, causal, scale, cu_q, cu_k)
    groups = q.shape[2] // k.shape[2]
    out = torch.einsum("bhqk,bkhd->bqhd", probs, _expand_kv(_wide(v), groups))
    return out.to(q.dtype), lse


def _reference_backward(dout, q, k, v, out, lse, causal, scale, cu_q, cu_k):
    groups = q.shape[2] // k.shape[2]
    probs, _ = _reference_probs(q, k, causal, scale, cu_q, cu_k, lse=lse)
    kf, vf, dof = _expand_kv(_wide(k), groups), _expand_kv(_wide(v), groups), _wide(dout)
    dv = torch.einsum("bhqk,bqhd->bkhd", probs, dof)
    dprobs = torch.einsum("bqhd,bkhd->bhqk", dof, vf)
    delta = (dof * _wide(out)).sum(-1).transpose(1, 2).unsqueeze(-1)  # (B, H, Sq, 1)
    dscores = probs * (dprobs - delta) * scale
    dq = torch.einsum("bhqk,bkhd->bqhd", dscores, kf)
    dk = torch.einsum("bhqk,bqhd->bkhd", dscores, _wide(q))
    return dq, _reduce_kv(dk, groups), _reduce_kv(dv, groups)


# ---------------------------------------------------------------- aten GPU kernels
@dataclasses.dataclass
class Varlen:
    """A ragged batch: device offsets for kernels that take them, host lengths for per-sequence loops."""
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    lens_q: list
    lens_k: list

    def segments(self):
        """((q start, q end), (k start, k end)) of every sequence."""
        starts_q, starts_k = [0], [0]
        for n, m in zip(self.lens_q, self.lens_k):
            starts_q.append(starts_q[-1] + n)
            starts_k.append(starts_k[-1] + m)
        return [((starts_q[i], starts_q[i + 1]), (starts_k[i], starts_k[i + 1])) for i in range(len(self.lens_q))]


def _cudnn_dense_forward(q, k, v, causal, scale):
    groups = q.shape[2] // k.shape[2]  # cuDNN wants equal head counts: expand KV here, sum dK/dV after
    k, v = _expand_kv(k, groups), _expand_kv(v, groups)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, causal, False, scale=scale)
    out = res[0].transpose(1, 2)
    lse = res[1].reshape(q.shape[0], q.shape[2], q.shape[1]).transpose(1, 2)
    return out, lse, (res[2], res[3], res[6], res[7], tuple(res[1].shape), res[1].stride())


def _cudnn_dense_backward(dout, q, k, v, out, lse, causal, scale, extras):
    groups = q.shape[2] // k.shape[2]
    ke, ve = _expand_kv(k, groups), _expand_kv(v, groups)
    cum_q, cum_k, seed, offset, lse_shape, lse_stride = extras
    kernel_lse = torch.empty_strided(lse_shape, lse_stride, dtype=torch.float32, device=lse.device)
    kernel_lse.copy_(lse.transpose(1, 2).reshape(lse_shape))  # the merged lse, in the layout cuDNN made
    t = lambda x: x.transpose(1, 2)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        t(dout), t(q), t(ke), t(ve), t(out), kernel_lse, seed, offset, None, cum_q, cum_k, q.shape[1], k.shape[1],
        0.0, causal, scale=scale)
    return t(dq), _reduce_kv(t(dk), groups), _reduce_kv(t(dv), groups)


def _flash_forward(q, k, v, causal, scale, varlen):
    if varlen is None:
        out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, None, None, q.shape[1], k.shape[1], 0.0, causal, False, scale=scale)
        return out, lse.transpose(1, 2), BlockAux("flash", (rng, unused))
    out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
        q[0], k[0], v[0], varlen.cu_q, varlen.cu_k, varlen.max_q, varlen.max_k, 0.0, causal, False, scale=scale)
    return out.unsqueeze(0), lse.t().unsqueeze(0), BlockAux("flash", (rng, unused))


def _flash_backward(dout, q, k, v, out, lse, causal, scale, varlen, aux):
    rng, unused = aux.extras
    if varlen is None:
        return torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse.transpose(1, 2).contiguous(), None, None, q.shape[1], k.shape[1], 0.0,
            causal, rng, unused, scale=scale)
    grads = torch.ops.aten._flash_attention_backward(
        dout[0], q[0], k[0], v[0], out[0], lse[0].t().contiguous(), varlen.cu_q, varlen.cu_k, varlen.max_q,
        varlen.max_k, 0.0, causal, rng, unused, scale=scale)
    return tuple(g.unsqueeze(0) for g in grads)


def _per_sequence_forward(dense_forward, backend, q, k, v, causal, scale, varlen):
    """A dense batch in one call, a packed one as one dense call per sequence (`dense_forward` -> (out, lse,
    extras)): how cuDNN (whose ragged op fails on torch 2.11) and the memory-efficient kernel take packed batches."""
    if varlen is None:
        out, lse, extras = dense_forward(q, k, v, causal, scale)
        return out, lse, BlockAux(backend, (extras,))
    out = torch.empty_like(q)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    all_extras = []
    for (a, b), (c, d) in varlen.segments():
        out[:, a:b], lse[:, a:b], extras = dense_forward(q[:, a:b], k[:, c:d], v[:, c:d], causal, scale)
        all_extras.append(extras)
    return out, lse, BlockAux(backend, tuple(all_extras))


def _per_sequence_backward(dense_backward, dout, q, k, v, out, lse, causal, scale, varlen, aux):
    if varlen is None:
        return dense_backward(dout, q, k, v, out, lse, causal, scale, aux.extras[0])
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for ((a, b), (c, d)), extras in zip(varlen.segments(), aux.extras):
        dq[:, a:b], dk[:, c:d], dv[:, c:d] = dense_backward(
            dout[:, a:b], q[:, a:b], k[:, c:d], v[:, c:d], out[:, a:b], lse[:, a:b], causal, scale, extras)
    return dq, dk, dv


def _efficient_dense_forward(q, k, v, causal, scale):
    groups = q.shape[2] // k.shape[2]
    k, v = _expand_kv(k, groups), _expand_kv(v, groups)
    mask_type = 1 if causal else 0  # 1 = top-left causal, equal to ours on the square blocks we use
    out, lse, seed, offset, _, _ = torch.ops.aten._efficient_attention_forward(
        q, k, v, None, None, None, None, None, 0.0, mask_type, True, scale=scale)
    return out, lse[:, :, : q.shape[1]].transpose(1, 2), (seed, offset, tuple(lse.shape))


def _efficient_dense_backward(dout, q, k, v, out, lse, causal, scale, extras):
    groups = q.shape[2] // k.shape[2]
    ke, ve = _expand_kv(k, groups), _expand_kv(v, groups)
    seed, offset, lse_shape = extras
    kernel_lse = lse.new_zeros(lse_shape)  # the kernel pads the sequence dimension of its lse
    kernel_lse[:, :, : q.shape[1]] = lse.transpose(1, 2)
    dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(
        dout, q, ke, ve, None, out, None, None, q.shape[1], k.shape[1], kernel_lse, 0.0, seed, offset,
        1 if causal else 0, False, scale=scale)
    return dq, _reduce_kv(dk, groups), _reduce_kv(dv, groups)


_FORWARD = {"cudnn": functools.partial(_per_sequence_forward, _cudnn_dense_forward, "cudnn"),
            "flash": _flash_forward,
            "efficient": functools.partial(_per_sequence_forward, _efficient_dense_forward, "efficient")}
_BACKWARD = {"cudnn": functools.partial(_per_sequence_backward, _cudnn_dense_backward),
             "flash": _flash_backward,
             "efficient": functools.partial(_per_sequence_backward, _efficient_dense_backward)}


def _varlen(cu_q, cu_k, max_q, max_k, lens_q, lens_k):
    """Bundle ragged-batch arguments; host values not given are read from the offsets (a GPU sync)."""
    if cu_q is None:
        return None
    if lens_q is None:
        lens_q = torch.diff(cu_q).tolist()
    if lens_k is None:
        lens_k = torch.diff(cu_k).tolist()
    return Varlen(cu_q, cu_k, max_q or max(lens_q), max_k or max(lens_k), list(lens_q), list(lens_k))


def attention_forward(q, k, v, *, causal, scale=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                      max_seqlen_k=None, seqlens_q=None, seqlens_k=None, backend="auto"):
    """(out, lse, aux) of softmax(q k^T * scale) v over one block; see the module docstring for layouts.

    Packed batches: `cu_seqlens_*` (device int32 offsets) and, to avoid GPU syncs, the host-side
    `max_seqlen_*` and `seqlens_*` (lists of lengths) when the caller knows them.
    """
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    backend = resolve_backend(backend, q.device, q.dtype, packed=cu_seqlens_q is not None)
    if backend == "reference":
        out, lse = _reference_forward(q, k, v, causal, scale, cu_seqlens_q, cu_seqlens_k)
        return out, lse, BlockAux("reference")
    varlen = _varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqlens_q, seqlens_k)
    square = varlen.lens_q == varlen.lens_k if varlen is not None else q.shape[1] == k.shape[1]
    if causal and backend in ("cudnn", "efficient") and not square:
        raise ValueError(f"the {backend} backend aligns causal masks top-left: causal blocks must be square "
                         f"(use flash or reference for bottom-right causal rectangles)")
    return _FORWARD[backend](q, k, v, causal, scale, varlen)


def attention_backward(dout, q, k, v, out, lse, aux, *, causal, scale=None, cu_seqlens_q=None, cu_seqlens_k=None,
                       max_seqlen_q=None, max_seqlen_k=None, seqlens_q=None, seqlens_k=None):
    """(dq, dk, dv) of one block, given the final out and lse of the rows (which may merge many blocks)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if aux.backend == "reference":
        return _reference_backward(dout, q, k, v, out, lse, causal, scale, cu_seqlens_q, cu_seqlens_k)
    varlen = _varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqlens_q, seqlens_k)
    return _BACKWARD[aux.backend](dout, q, k, v, out, lse, causal, scale, varlen, aux)


class BlockAttention(torch.autograd.Function):
    """`attention_forward` / `attention_backward` as one differentiable call over whole (local) documents."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, varlen, backend):
        out, lse, aux = attention_forward(q, k, v, causal=causal, scale=scale, backend=backend, **varlen)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (aux, causal, scale, varlen)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        aux, causal, scale, varlen = ctx.args
        dq, dk, dv = attention_backward(dout.contiguous(), q, k, v, out, lse, aux, causal=causal, scale=scale,
                                        **varlen)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def block_attention(q, k, v, *, causal=True, scale=None, varlen=None, backend="auto"):
    """Differentiable attention of q over k, v on this rank; `varlen`: `attention_forward`'s packed kwargs."""
    return BlockAttention.apply(q, k, v, causal, scale, varlen or {}, backend)
