"""RMSNorm with an optional fused residual add: Triton kernels, autograd Function and nn.Module.

Three casting conventions exist in the wild and users depend on the exact rounding:
  llama: y = (offset + w) * cast(x * rstd)      (fp32 statistics; normalise in fp32, round to x's dtype, scale)
  gemma: y = cast(x * rstd * (offset + w))      (everything in fp32, one rounding; Gemma uses offset = 1)
  none:  every step in x's dtype, as a module written in plain torch computes it for a bf16 / fp16 input:
         the squares, their mean (summed in fp32, as torch's mean is), mean + eps, rstd, x * rstd, offset + w and
         the product are each rounded to x's dtype (Liger-Kernel's casting mode "none").
The output has x's dtype. Backward is fp32 math in every convention, on the values the forward rounded.
With a residual, the kernel also returns residual_sum = x + residual (rounded to x's dtype, as a pre-norm
decoder's `residual = residual + hidden`) and normalises that sum.

Backward never writes into a tensor autograd may still hold: dX gets its own buffer, because the incoming
gradient can be shared with other branches of the graph. dW: a persistent grid of programs each accumulates an
fp32 partial over its rows; the partials are added with fp32 atomics and the last program rounds the sum, in
the same launch (which matters at small sizes, where each extra launch costs several percent), or, under
torch.use_deterministic_algorithms, summed by a second small kernel in a fixed order.
"""
import functools

import torch
import triton
import triton.language as tl

from longvl import kernels
from longvl.kernels._utils import cdiv, check_kernel_tensor, multiprocessor_count, next_power_of_2

CASTINGS = ("llama", "gemma", "none")
MAX_HIDDEN = 65536  # one row must fit in a program's registers


@triton.jit
def _tile_offsets(rows, cols, stride):
    return rows[:, None] * stride + cols[None, :]


@triton.jit
def _tile_mask(rows, cols, n_rows, n_cols):
    return (rows < n_rows)[:, None] & (cols < n_cols)[None, :]


@triton.jit
def _forward_load(x_ptr, residual_ptr, sum_ptr, rows, cols, n_rows, n_cols, x_stride, residual_stride, sum_stride,
                  HAS_RESIDUAL: tl.constexpr):
    """One column piece of the rows' input in fp32: x, or x + residual (rounded and stored as the sum output)."""
    mask = _tile_mask(rows, cols, n_rows, n_cols)
    x = tl.load(x_ptr + _tile_offsets(rows, cols, x_stride), mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + _tile_offsets(rows, cols, residual_stride), mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + _tile_offsets(rows, cols, sum_stride), x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _rounded(value, dtype: tl.constexpr):
    """value (fp32) rounded to `dtype` and back: one step of a computation carried out in that dtype."""
    return value.to(dtype).to(tl.float32)


@triton.jit
def _squares(x, dtype: tl.constexpr, IN_DTYPE: tl.constexpr):
    if IN_DTYPE:
        return _rounded(x * x, dtype)
    return x * x


@triton.jit
def _scale(w_ptr, cols, n_cols, offset, dtype: tl.constexpr, IN_DTYPE: tl.constexpr):
    """offset + w in fp32 (in `dtype` when IN_DTYPE)."""
    scale = offset + tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    if IN_DTYPE:
        scale = _rounded(scale, dtype)
    return scale


@triton.jit
def _forward_store(x, rstd, w_ptr, y_ptr, rows, cols, n_rows, n_cols, y_stride, offset, GEMMA: tl.constexpr,
                   IN_DTYPE: tl.constexpr):
    """y for one piece; llama and none round the normalised value to the output's (= x's) dtype before scaling."""
    scale = _scale(w_ptr, cols, n_cols, offset, y_ptr.dtype.element_ty, IN_DTYPE)
    normed = x * rstd[:, None]
    if not GEMMA:
        normed = _rounded(normed, y_ptr.dtype.element_ty)
    tl.store(y_ptr + _tile_offsets(rows, cols, y_stride), (normed * scale[None, :]).to(y_ptr.dtype.element_ty),
             mask=_tile_mask(rows, cols, n_rows, n_cols))


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr, residual_ptr, sum_ptr, w_ptr, y_ptr, rstd_ptr,
    n_rows, n_cols, x_stride, residual_stride, sum_stride, y_stride,
    eps, offset,
    GEMMA: tl.constexpr, IN_DTYPE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE_RSTD: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, TAIL: tl.constexpr,
):
    """ROWS rows per program; each row is held in two power-of-two pieces, [0, BLOCK) and [BLOCK, BLOCK + TAIL)
    (TAIL = 0: one piece), so that a hidden size like 4608 = 4096 + 512 wastes no lanes on padding."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    x = _forward_load(x_ptr, residual_ptr, sum_ptr, rows, cols, n_rows, n_cols, x_stride, residual_stride,
                      sum_stride, HAS_RESIDUAL)
    sum_sq = tl.sum(_squares(x, y_ptr.dtype.element_ty, IN_DTYPE), axis=1)
    if TAIL > 0:
        tail_cols = BLOCK + tl.arange(0, TAIL)
        tail = _forward_load(x_ptr, residual_ptr, sum_ptr, rows, tail_cols, n_rows, n_cols, x_stride,
                             residual_stride, sum_stride, HAS_RESIDUAL)
        sum_sq += tl.sum(_squares(tail, y_ptr.dtype.element_ty, IN_DTYPE), axis=1)
    if IN_DTYPE:
        mean_sq = _rounded(sum_sq / n_cols, y_ptr.dtype.element_ty)
        rstd = _rounded(tl.rsqrt(_rounded(mean_sq + eps, y_ptr.dtype.element_ty)), y_ptr.dtype.element_ty)
    else:
        rstd = tl.rsqrt(sum_sq / n_cols + eps)
    if STORE_RSTD:
        tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)
    _forward_store(x, rstd, w_ptr, y_ptr, rows, cols, n_rows, n_cols, y_stride, offset, GEMMA, IN_DTYPE)
    if TAIL > 0:
        _forward_store(tail, rstd, w_ptr, y_ptr, rows, tail_cols, n_rows, n_cols, y_stride, offset, GEMMA,
                       IN_DTYPE)


@triton.jit
def _load_tile(ptr, rows, cols, n_rows, n_cols, stride):
    return tl.load(ptr + _tile_offsets(rows, cols, stride), mask=_tile_mask(rows, cols, n_rows, n_cols), other=0.0)


@triton.jit
def _backward_terms(x, dy, rstd, scale, GEMMA: tl.constexpr):
    """(normalised input, d normalised, this tile's dW terms) in fp32 for one column piece."""
    dyf = dy.to(tl.float32)
    normed = x.to(tl.float32) * rstd[:, None]
    if GEMMA:
        dw = dyf * normed
    else:
        dw = dyf * normed.to(x.dtype).to(tl.float32)
    return normed, dyf * scale[None, :], dw


@triton.jit
def _store_dx(dx_ptr, dsum_ptr, rows, cols, n_rows, n_cols, dx_stride, dsum_stride, normed, dnormed, rstd,
              projection, HAS_DSUM: tl.constexpr):
    mask = _tile_mask(rows, cols, n_rows, n_cols)
    dx = rstd[:, None] * (dnormed - normed * projection[:, None])
    if HAS_DSUM:
        dx += tl.load(dsum_ptr + _tile_offsets(rows, cols, dsum_stride), mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + _tile_offsets(rows, cols, dx_stride), dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_rows(x_ptr, dy_ptr, rstd_ptr, rows, cols, tail_cols, n_rows, n_cols, x_stride, dy_stride,
               TAIL: tl.constexpr):
    """x and dy of a row block in the forward's two pieces (the tail pieces are stand-ins when TAIL = 0), and rstd."""
    x = _load_tile(x_ptr, rows, cols, n_rows, n_cols, x_stride)
    dy = _load_tile(dy_ptr, rows, cols, n_rows, n_cols, dy_stride)
    if TAIL > 0:
        tail_x = _load_tile(x_ptr, rows, tail_cols, n_rows, n_cols, x_stride)
        tail_dy = _load_tile(dy_ptr, rows, tail_cols, n_rows, n_cols, dy_stride)
    else:
        tail_x, tail_dy = x, dy
    return x, dy, tail_x, tail_dy, tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)


@triton.jit
def _rms_norm_backward_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dsum_ptr, dx_ptr, dw_partial_ptr, counter_ptr, dw_ptr,
    n_rows, n_cols, dy_stride, x_stride, dsum_stride, dx_stride,
    offset,
    GEMMA: tl.constexpr, IN_DTYPE: tl.constexpr, HAS_DSUM: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
    TAIL: tl.constexpr, ATOMIC_DW: tl.constexpr,
):
    """Persistent: program p handles row blocks p, p + P, ... Rows are held in the forward's two pieces.

    Each step issues the loads of the program's next row block before working on the current one: with only a
    couple of programs resident per SM, memory would otherwise idle through every reduction and store (loading
    two blocks ahead measured slower on an H200). dW: with ATOMIC_DW each program adds its fp32 column sums into
    one fp32 row and the last program to finish rounds it into dW (one launch; the order of the adds varies);
    otherwise each writes them to its own row of `dw_partial` for _sum_partials_kernel (bitwise reproducible).
    """
    pid = tl.program_id(0)
    step = tl.num_programs(0) * ROWS
    cols = tl.arange(0, BLOCK)
    scale = _scale(w_ptr, cols, n_cols, offset, dx_ptr.dtype.element_ty, IN_DTYPE)
    dw = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    if TAIL > 0:
        tail_cols = BLOCK + tl.arange(0, TAIL)
        tail_scale = _scale(w_ptr, tail_cols, n_cols, offset, dx_ptr.dtype.element_ty, IN_DTYPE)
        tail_dw = tl.zeros((ROWS, TAIL), dtype=tl.float32)
    else:
        tail_cols = cols
    rows = pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    x, dy, tail_x, tail_dy, rstd = _load_rows(x_ptr, dy_ptr, rstd_ptr, rows, cols, tail_cols, n_rows, n_cols,
                                              x_stride, dy_stride, TAIL)
    for first in range(pid * ROWS, n_rows, step):
        rows = first + tl.arange(0, ROWS).to(tl.int64)
        next_x, next_dy, next_tail_x, next_tail_dy, next_rstd = _load_rows(
            x_ptr, dy_ptr, rstd_ptr, rows + step, cols, tail_cols, n_rows, n_cols, x_stride, dy_stride,
            TAIL)
        normed, dnormed, dw_terms = _backward_terms(x, dy, rstd, scale, GEMMA)
        dw += dw_terms
        dot = tl.sum(dnormed * normed, axis=1)
        if TAIL > 0:
            tail_normed, tail_dnormed, tail_terms = _backward_terms(tail_x, tail_dy, rstd, tail_scale, GEMMA)
            tail_dw += tail_terms
            dot += tl.sum(tail_dnormed * tail_normed, axis=1)
        projection = dot / n_cols
        _store_dx(dx_ptr, dsum_ptr, rows, cols, n_rows, n_cols, dx_stride, dsum_stride, normed, dnormed, rstd,
                  projection, HAS_DSUM)
        if TAIL > 0:
            _store_dx(dx_ptr, dsum_ptr, rows, tail_cols, n_rows, n_cols, dx_stride, dsum_stride, tail_normed,
                      tail_dnormed, rstd, projection, HAS_DSUM)
        x, dy, tail_x, tail_dy, rstd = next_x, next_dy, next_tail_x, next_tail_dy, next_rstd
    if ATOMIC_DW:
        tl.atomic_add(dw_partial_ptr + cols, tl.sum(dw, axis=0), mask=cols < n_cols, sem="relaxed")
        if TAIL > 0:
            tl.atomic_add(dw_partial_ptr + tail_cols, tl.sum(tail_dw, axis=0), mask=tail_cols < n_cols,
                          sem="relaxed")
        # Every thread's adds precede the barrier, so the counter's release covers them all: the program that
        # finds itself last (acquire) then reads the complete sum.
        tl.debug_barrier()
        if tl.atomic_add(counter_ptr, 1, sem="acq_rel") == tl.num_programs(0) - 1:
            total = tl.load(dw_partial_ptr + cols, mask=cols < n_cols, cache_modifier=".cg")
            tl.store(dw_ptr + cols, total.to(dw_ptr.dtype.element_ty), mask=cols < n_cols)
            if TAIL > 0:
                total = tl.load(dw_partial_ptr + tail_cols, mask=tail_cols < n_cols, cache_modifier=".cg")
                tl.store(dw_ptr + tail_cols, total.to(dw_ptr.dtype.element_ty), mask=tail_cols < n_cols)
    else:
        tl.store(dw_partial_ptr + pid * n_cols + cols, tl.sum(dw, axis=0), mask=cols < n_cols)
        if TAIL > 0:
            tl.store(dw_partial_ptr + pid * n_cols + tail_cols, tl.sum(tail_dw, axis=0), mask=tail_cols < n_cols)


@triton.jit
def _sum_partials_kernel(partial_ptr, out_ptr, n_partials, n_cols, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dW = sum of the per-program partials; many narrow column tiles so that no program walks all rows alone."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    total = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for first in range(0, n_partials, BLOCK_P):
        rows = first + tl.arange(0, BLOCK_P)
        mask = (rows < n_partials)[:, None] & col_ok[None, :]
        total += tl.load(partial_ptr + rows[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + cols, tl.sum(total, axis=0).to(out_ptr.dtype.element_ty), mask=col_ok)


def _rows(tensor, n_cols):
    """A (rows, n_cols) view with unit column stride (copying only when the layout forces it)."""
    rows = tensor if tensor.dim() == 2 else tensor.reshape(-1, n_cols)
    return rows if rows.stride(1) == 1 else rows.contiguous()


@functools.lru_cache(maxsize=None)
def _pieces(n_cols):
    """(BLOCK, TAIL): a row as one power-of-two block, or as the largest power of two below it plus a
    power-of-two tail when that pads less (4608 = 4096 + 512 instead of 8192, 1152 = 1024 + 128)."""
    whole = next_power_of_2(n_cols)
    block = 1 << (n_cols.bit_length() - 1)
    rest = n_cols - block
    tail = next_power_of_2(rest) if rest else 0
    return (block, tail) if rest and block + tail < whole else (whole, 0)


# Launch settings per row shape (BLOCK, TAIL), picked from sweeps on an H200 (bf16, 4K-64K tokens) for hidden
# 1152, 3584, 4608 and the pieces they make; other shapes take the setting of the power-of-two width that holds
# them (widths under 4096 group rows per program).
# Forward {(block, tail): (rows per program, warps)}.
_FORWARD_CONFIGS = {(4096, 0): (1, 8), (8192, 0): (1, 4), (16384, 0): (1, 8), (32768, 0): (1, 16),
                    (65536, 0): (1, 16), (1024, 128): (1, 1), (4096, 512): (1, 4)}
# Backward {(block, tail): (rows per step, warps, programs per SM)}, bounded by register use (ptxas, sm_90): a
# program holds its current rows in fp32 plus the prefetched next ones, and rows x width = 8192 at 16 warps (or
# 4096 at 8) fills about half an SM's register file. Widths above 8192 spill registers at any setting.
# bench/tune_norm_rope.py reruns the sweep.
_BACKWARD_CONFIGS = {(2048, 0): (2, 8, 2), (4096, 0): (1, 16, 2), (8192, 0): (1, 16, 1), (16384, 0): (1, 32, 1),
                     (32768, 0): (1, 32, 1), (65536, 0): (1, 32, 1), (1024, 128): (8, 8, 1), (4096, 512): (1, 4, 2)}
# Inputs of at most _SMALL_ELEMENTS (a few thousand tokens) give each program only ~15 row blocks: there two rows
# per step from one program per SM measured faster than one row from two.
_SMALL_ELEMENTS = 2**24
_SMALL_BACKWARD_CONFIGS = {(4096, 0): (2, 16, 1)}


@functools.lru_cache(maxsize=None)
def _forward_config(n_cols):
    """(block, tail, rows per program, warps)."""
    block, tail = _pieces(n_cols)
    padded = (next_power_of_2(block + tail), 0)
    rows, warps = _FORWARD_CONFIGS.get((block, tail)) or _FORWARD_CONFIGS.get(padded) or (4096 // padded[0], 4)
    return block, tail, rows, warps


@functools.lru_cache(maxsize=None)
def _backward_config(n_cols, device_index, small):
    """(block, tail, rows per step, warps, most programs) of the persistent backward; few programs in the
    interpreter, where each one is slow to simulate."""
    block, tail = _pieces(n_cols)
    padded = (next_power_of_2(block + tail), 0)
    configs = {**_BACKWARD_CONFIGS, **_SMALL_BACKWARD_CONFIGS} if small else _BACKWARD_CONFIGS
    rows, warps, programs_per_sm = (configs.get((block, tail)) or configs.get(padded) or (4096 // padded[0], 8, 2))
    most_programs = 4 if kernels.INTERPRETED else programs_per_sm * multiprocessor_count(device_index)
    return block, tail, rows, warps, most_programs


def _atomic_dw():
    """Sum dW with atomics (one launch, order of adds varies) unless torch is asked for deterministic algorithms."""
    return not torch.are_deterministic_algorithms_enabled()


def _forward(x, weight, residual, eps, offset, casting, store_rstd, sum_into_residual=False):
    n_cols = x.shape[-1]
    x2 = _rows(x, n_cols)
    n_rows = x2.shape[0]
    y = torch.empty_like(x2)
    rstd = torch.empty(n_rows if store_rstd else 1, device=x.device, dtype=torch.float32)
    if residual is None:
        res2 = sum2 = x2
    else:
        res2 = _rows(residual, n_cols)
        sum2 = res2 if sum_into_residual else torch.empty_like(x2)
    block, tail, rows, warps = _forward_config(n_cols)
    _rms_norm_forward_kernel[(cdiv(n_rows, rows),)](
        x2, res2, sum2, weight, y, rstd,
        n_rows, n_cols, x2.stride(0), res2.stride(0), sum2.stride(0), y.stride(0),
        eps, offset,
        GEMMA=casting == "gemma", IN_DTYPE=casting == "none", HAS_RESIDUAL=residual is not None,
        STORE_RSTD=store_rstd,
        ROWS=rows, BLOCK=block, TAIL=tail, num_warps=warps,
    )
    if sum_into_residual:
        if sum2.data_ptr() != residual.data_ptr():  # _rows had to copy a strided residual
            residual.copy_(sum2.view(x.shape))
        return y.view(x.shape), residual, rstd
    return y.view(x.shape), sum2.view(x.shape), rstd


def _backward(dy, normed_input, weight, rstd, dsum, offset, casting):
    n_cols = normed_input.shape[-1]
    x2 = _rows(normed_input, n_cols)
    dy2 = _rows(dy, n_cols)
    dsum2 = dy2 if dsum is None else _rows(dsum, n_cols)
    n_rows = x2.shape[0]
    dx = torch.empty_like(x2)
    block, tail, rows, warps, most_programs = _backward_config(n_cols, x2.device.index,
                                                               n_rows * n_cols <= _SMALL_ELEMENTS)
    programs = max(1, min(most_programs, cdiv(n_rows, rows)))
    dw = torch.empty_like(weight)
    atomic = _atomic_dw()
    if atomic:
        dw_partial = torch.zeros(n_cols + 1, device=x2.device, dtype=torch.float32)
        counter = dw_partial[n_cols:].view(torch.int32)
    else:
        dw_partial = torch.empty(programs, n_cols, device=x2.device, dtype=torch.float32)
        counter = dw_partial
    _rms_norm_backward_kernel[(programs,)](
        dy2, x2, weight, rstd, dsum2, dx, dw_partial, counter, dw,
        n_rows, n_cols, dy2.stride(0), x2.stride(0), dsum2.stride(0), dx.stride(0),
        offset,
        GEMMA=casting == "gemma", IN_DTYPE=casting == "none", HAS_DSUM=dsum is not None, ROWS=rows, BLOCK=block,
        TAIL=tail, ATOMIC_DW=atomic,
        num_warps=warps,
    )
    if not atomic:
        _sum_partials_kernel[(cdiv(n_cols, 32),)](dw_partial, dw, programs, n_cols,
                                                  BLOCK_P=min(next_power_of_2(programs), 128), BLOCK_C=32)
    return dx.view(normed_input.shape), dw


class RMSNormFunction(torch.autograd.Function):
    """y = RMSNorm(x [+ residual]); saves the normalised input (x or the sum) and one fp32 rstd per row."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps, offset, casting, in_place):
        needs_grad = any(ctx.needs_input_grad[:3])
        y, normed_input, rstd = _forward(x, weight, residual, eps, offset, casting, store_rstd=needs_grad,
                                         sum_into_residual=in_place)
        if in_place:
            # The sum replaced `residual`'s contents; mark_dirty bumps its version so autograd refuses to run a
            # backward that saved the old value, instead of silently using the overwritten one.
            ctx.mark_dirty(residual)
        ctx.save_for_backward(normed_input, weight, rstd)
        ctx.offset, ctx.casting, ctx.has_residual = offset, casting, residual is not None
        if residual is None:
            return y
        return y, normed_input

    @staticmethod
    def backward(ctx, dy, *maybe_dsum):
        normed_input, weight, rstd = ctx.saved_tensors
        dsum = maybe_dsum[0] if maybe_dsum else None
        if dy is None:
            dy = torch.zeros_like(normed_input)
        dx, dw = _backward(dy, normed_input, weight, rstd, dsum, ctx.offset, ctx.casting)
        # x and residual enter only through their sum, so they share one gradient (as autograd's add does).
        return dx, dw, dx if ctx.has_residual else None, None, None, None, None


def rms_norm(x, weight, eps=1e-6, *, offset=0.0, casting="llama", residual=None, in_place=False):
    """RMSNorm over the last dimension; with `residual`, returns (y, residual_sum) where residual_sum = x + residual.

    in_place=True (only with a residual) writes the sum into `residual` itself, saving one buffer; autograd's
    version check then rejects any graph that still needed the old residual.
    """
    check_kernel_tensor("x", x)
    check_kernel_tensor("weight", weight)
    if casting not in CASTINGS:
        raise ValueError(f"casting must be one of {CASTINGS}, got {casting!r}")
    if weight.dim() != 1 or x.dim() == 0 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match the last dimension of x {tuple(x.shape)}")
    if not 0 < x.shape[-1] <= MAX_HIDDEN:
        raise ValueError(f"hidden size {x.shape[-1]} is outside the supported range 1..{MAX_HIDDEN}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if residual is not None:
        check_kernel_tensor("residual", residual, dtypes=(x.dtype,))
        if residual.shape != x.shape or residual.device != x.device:
            raise ValueError(f"residual {tuple(residual.shape)} on {residual.device} must match x "
                             f"{tuple(x.shape)} on {x.device}")
    elif in_place:
        raise ValueError("in_place=True needs a residual: it stores x + residual into the residual tensor")
    return RMSNormFunction.apply(x, weight, residual, float(eps), float(offset), casting, bool(in_place))


class RMSNorm(torch.nn.Module):
    """Drop-in for HF's Qwen2RMSNorm / LlamaRMSNorm (same `weight` key and `variance_epsilon`); Gemma-style with
    offset=1.0, casting="gemma"; casting="none" for models that norm in their own dtype. The weight starts at
    1 - offset so that a fresh module scales by exactly 1."""

    def __init__(self, hidden_size, eps=1e-6, offset=0.0, casting="llama"):
        super().__init__()
        if casting not in CASTINGS:
            raise ValueError(f"casting must be one of {CASTINGS}, got {casting!r}")
        self.weight = torch.nn.Parameter(torch.full((hidden_size,), 1.0 - offset))
        self.variance_epsilon = eps
        self.offset = offset
        self.casting = casting

    def forward(self, x, residual=None):
        return rms_norm(x, self.weight, self.variance_epsilon, offset=self.offset, casting=self.casting,
                        residual=residual)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, offset={self.offset}, casting={self.casting}"
