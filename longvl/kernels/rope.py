"""Rotary position embedding for q and k in one call: Triton kernel, autograd Function and `apply_rope`.

Rotate-half convention (Qwen2 / Llama, HF's apply_rotary_pos_emb) over the first `rotary_dim` features of each
head; features past it are copied. One program handles one token and a block of heads of both q and k, so
cos/sin are read (or computed) once per token instead of once per head. With position_ids and theta the angles
are made in the kernel: angle = fp32(pos * inv_freq) with HF's fp32 inv_freq, so arbitrary positions (packed
documents that restart, zigzag context-parallel shards) cost no cos/sin table at all.

Given cos/sin are used exactly as HF does, half by half: out[:h] = x1 cos[:h] - x2 sin[:h],
out[h:] = x2 cos[h:] + x1 sin[h:]. The math runs in fp32 and rounds once at the store.

Any head dim: a program holds a head's half in a power-of-two block of lanes and masks the lanes past it (a
power-of-two head dim masks none). An odd head dim D rotates its first D - 1 features (halves of (D - 1) / 2) and
passes the last one through, as Liger-Kernel does; its cos/sin may then also be the table HF's rotary embedding
builds for D (width D + 1, two equal halves of (D + 1) / 2: the first (D - 1) / 2 of each half are used), and
angles from position_ids use that embedding's frequencies theta^(-2i / D).
"""
import functools

import torch
import triton
import triton.language as tl

from longvl.kernels._utils import cdiv, check_kernel_tensor, next_power_of_2

LAYOUTS = ("bhsd", "bshd")
MAX_HEAD_ELEMENTS = 4096  # heads x half-dim one program rotates for q (and again for k)


@triton.jit
def _rotate_heads(
    x_ptr, out_ptr, x_head_stride, out_head_stride, first_head, n_heads, cos1, cos2, sin1, sin2,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, PASS: tl.constexpr, BLOCK_PASS: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
):
    heads = first_head + tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads < n_heads)[:, None] & (dims < HALF)[None, :]
    x_at = x_ptr + heads[:, None].to(tl.int64) * x_head_stride + dims[None, :]
    out_at = out_ptr + heads[:, None].to(tl.int64) * out_head_stride + dims[None, :]
    x1 = tl.load(x_at, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_at + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_at, (x1 * cos1[None, :] - x2 * sin1[None, :]).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_at + HALF, (x2 * cos2[None, :] + x1 * sin2[None, :]).to(out_ptr.dtype.element_ty), mask=mask)
    if PASS > 0:
        rest = tl.arange(0, BLOCK_PASS)
        rest_mask = (heads < n_heads)[:, None] & (rest < PASS)[None, :]
        rest_x_at = x_ptr + heads[:, None].to(tl.int64) * x_head_stride + 2 * HALF + rest[None, :]
        rest_out_at = out_ptr + heads[:, None].to(tl.int64) * out_head_stride + 2 * HALF + rest[None, :]
        tl.store(rest_out_at, tl.load(rest_x_at, mask=rest_mask), mask=rest_mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, pos_ptr, inv_freq_ptr,
    seq_len, n_q_heads, n_k_heads,
    q_sb, q_ss, q_sh, k_sb, k_ss, k_sh, qo_sb, qo_ss, qo_sh, ko_sb, ko_ss, ko_sh,
    cos_sb, cos_ss, sin_sb, sin_ss, pos_sb, pos_ss,
    FROM_POSITIONS: tl.constexpr, BACKWARD: tl.constexpr, DO_Q: tl.constexpr, DO_K: tl.constexpr,
    HALF: tl.constexpr, TABLE_HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, PASS: tl.constexpr,
    BLOCK_PASS: tl.constexpr, BLOCK_Q_HEADS: tl.constexpr, BLOCK_K_HEADS: tl.constexpr,
):
    """Program (token, head block). BACKWARD applies the transposed rotation: sin1 -> -sin2, sin2 -> -sin1.
    A table's second half starts at column TABLE_HALF (HALF, or (D + 1) / 2 in HF's table of an odd head dim)."""
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    b = token // seq_len
    s = token % seq_len
    dims = tl.arange(0, BLOCK_HALF)
    dim_ok = dims < HALF
    if FROM_POSITIONS:
        pos = tl.load(pos_ptr + b * pos_sb + s * pos_ss).to(tl.float32)
        angle = pos * tl.load(inv_freq_ptr + dims, mask=dim_ok, other=0.0)
        # Reduce to [-pi, pi] first: hardware sin/cos lose accuracy on the large angles of long sequences.
        # 2 pi = 6.28125 + 0.00193...: the short high part keeps turns * 6.28125 exact.
        turns = tl.floor(angle * 0.15915494309189535 + 0.5)
        angle = (angle - turns * 6.28125) - turns * 0.0019353071795864769
        cos1 = tl.cos(angle)
        sin1 = tl.sin(angle)
        cos2 = cos1
        sin2 = sin1
    else:
        cos_at = cos_ptr + b * cos_sb + s * cos_ss + dims
        sin_at = sin_ptr + b * sin_sb + s * sin_ss + dims
        cos1 = tl.load(cos_at, mask=dim_ok, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_at + TABLE_HALF, mask=dim_ok, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_at, mask=dim_ok, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_at + TABLE_HALF, mask=dim_ok, other=0.0).to(tl.float32)
    if BACKWARD:
        sin1, sin2 = -sin2, -sin1
    if DO_Q:
        _rotate_heads(q_ptr + b * q_sb + s * q_ss, q_out_ptr + b * qo_sb + s * qo_ss, q_sh, qo_sh,
                      head_block * BLOCK_Q_HEADS, n_q_heads, cos1, cos2, sin1, sin2,
                      HALF, BLOCK_HALF, PASS, BLOCK_PASS, BLOCK_Q_HEADS)
    if DO_K:
        _rotate_heads(k_ptr + b * k_sb + s * k_ss, k_out_ptr + b * ko_sb + s * ko_ss, k_sh, ko_sh,
                      head_block * BLOCK_K_HEADS, n_k_heads, cos1, cos2, sin1, sin2,
                      HALF, BLOCK_HALF, PASS, BLOCK_PASS, BLOCK_K_HEADS)


_INV_FREQ_CACHE = {}


def _inv_freq(theta, dim, device):
    """HF's fp32 inverse frequencies for a rotary width `dim`, bit for bit, cached per (theta, dim, device)."""
    key = (theta, dim, device)
    if key not in _INV_FREQ_CACHE:
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        _INV_FREQ_CACHE[key] = (1.0 / (theta ** exponents)).to(device)
    return _INV_FREQ_CACHE[key]


def _bshd_strides(t, layout):
    """(batch, seq, head) strides of a 4-D q/k/grad in the given layout."""
    sb, s1, s2, _ = t.stride()
    return (sb, s1, s2) if layout == "bshd" else (sb, s2, s1)


def _table_strides(table):
    """(batch, seq) strides of a (B, S, ...) or (S, ...) table; a batch of 1 broadcasts with stride 0."""
    if table.dim() == 1 or (table.dim() == 2 and table.dtype.is_floating_point):
        return 0, table.stride(0)
    return (0 if table.shape[0] == 1 else table.stride(0)), table.stride(1)


def _last_dim_unit(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _num_warps(elements, from_positions):
    """Warps for a program rotating `elements` (heads x half-dim) pairs, as measured on an H200. Fewer warps when
    the angles are computed: every warp evaluates the per-token sin/cos."""
    if from_positions:
        return 2 if elements >= 1024 else 1
    return 4 if elements >= 1024 else 2


@functools.lru_cache(maxsize=None)
def _launch_config(head_dim, rotary_dim, table_half, n_q, n_k, from_positions):
    """Compile-time sizes, head blocks and warps for one model's attention shape, worked out once."""
    half = rotary_dim // 2
    pass_dims = head_dim - rotary_dim
    block_half = next_power_of_2(half)
    cap = max(1, MAX_HEAD_ELEMENTS // block_half)
    block_q = min(next_power_of_2(max(n_q, 1)), cap)
    block_k = min(next_power_of_2(max(n_k, 1)), cap)
    constants = dict(HALF=half, TABLE_HALF=table_half, BLOCK_HALF=block_half, PASS=pass_dims,
                     BLOCK_PASS=next_power_of_2(max(pass_dims, 1)), BLOCK_Q_HEADS=block_q, BLOCK_K_HEADS=block_k,
                     num_warps=_num_warps(block_half * (block_q + block_k), from_positions))
    return constants, max(cdiv(n_q, block_q), cdiv(n_k, block_k))


_NO_STRIDES = (0, 0, 0)


def _launch(q, k, q_out, k_out, tables, from_positions, layout, rotary_dim, backward):
    """Rotate q -> q_out and k -> k_out (either may be None); tables = (cos, sin) or (positions, inv_freq)."""
    ref = q if q is not None else k
    seq_axis, head_axis = (1, 2) if layout == "bshd" else (2, 1)
    batch, seq = ref.shape[0], ref.shape[seq_axis]
    n_q = q.shape[head_axis] if q is not None else 0
    n_k = k.shape[head_axis] if k is not None else 0
    table_half = rotary_dim // 2 if from_positions else tables[0].shape[-1] // 2
    constants, head_blocks = _launch_config(ref.shape[-1], rotary_dim, table_half, n_q, n_k, from_positions)
    if from_positions:
        positions, inv_freq = tables
        cos = sin = inv_freq
        pos_strides = _table_strides(positions)
        cos_strides = sin_strides = (0, 0)
    else:
        cos, sin = tables
        positions, inv_freq = cos, cos
        pos_strides = (0, 0)
        cos_strides, sin_strides = _table_strides(cos), _table_strides(sin)
    q_strides = _bshd_strides(q, layout) if q is not None else _NO_STRIDES
    k_strides = _bshd_strides(k, layout) if k is not None else _NO_STRIDES
    qo_strides = _bshd_strides(q_out, layout) if q is not None else _NO_STRIDES
    ko_strides = _bshd_strides(k_out, layout) if k is not None else _NO_STRIDES
    _rope_kernel[(batch * seq, head_blocks)](
        q if q is not None else k, k if k is not None else q,
        q_out if q is not None else k_out, k_out if k is not None else q_out,
        cos, sin, positions, inv_freq,
        seq, n_q, n_k, *q_strides, *k_strides, *qo_strides, *ko_strides,
        *cos_strides, *sin_strides, *pos_strides,
        FROM_POSITIONS=from_positions, BACKWARD=backward, DO_Q=q is not None, DO_K=k is not None, **constants,
    )


class RoPEFunction(torch.autograd.Function):
    """Rotates q and k; backward rotates the gradients by the inverse angles with the same kernel."""

    @staticmethod
    def forward(ctx, q, k, table_a, table_b, from_positions, layout, rotary_dim):
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        _launch(q, k, q_out, k_out, (table_a, table_b), from_positions, layout, rotary_dim, backward=False)
        ctx.save_for_backward(table_a, table_b)
        ctx.from_positions, ctx.layout, ctx.rotary_dim = from_positions, layout, rotary_dim
        return q_out, k_out

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        tables = ctx.saved_tensors
        dq_out = _last_dim_unit(dq_out) if dq_out is not None and ctx.needs_input_grad[0] else None
        dk_out = _last_dim_unit(dk_out) if dk_out is not None and ctx.needs_input_grad[1] else None
        if dq_out is None and dk_out is None:
            return None, None, None, None, None, None, None
        dq = torch.empty_like(dq_out) if dq_out is not None else None
        dk = torch.empty_like(dk_out) if dk_out is not None else None
        _launch(dq_out, dk_out, dq, dk, tables, ctx.from_positions, ctx.layout, ctx.rotary_dim, backward=True)
        return dq, dk, None, None, None, None, None


def _check_table(name, table, batch, seq, widths, device):
    check_kernel_tensor(name, table)
    if table.device != device:
        raise ValueError(f"{name} is on {table.device} but q is on {device}")
    lead = table.shape[:-1]
    if table.dim() not in (2, 3) or table.shape[-1] not in widths or lead[-1] != seq or (
            table.dim() == 3 and lead[0] not in (1, batch)):
        width = " or ".join(map(str, widths))
        raise ValueError(f"{name} has shape {tuple(table.shape)}; expected ({batch} or 1, {seq}, {width}) or "
                         f"({seq}, {width})")
    if torch.is_grad_enabled() and table.requires_grad:
        raise ValueError(f"{name} requires grad, but gradients with respect to cos/sin are not computed: detach it")
    return _last_dim_unit(table)


def apply_rope(q, k, cos=None, sin=None, *, position_ids=None, theta=None, layout="bhsd", rotary_dim=None):
    """Rotate q and k (returns new tensors, inputs untouched). Give HF's cos/sin, or position_ids with theta.

    q: (B, Hq, S, D) for layout "bhsd" (HF) or (B, S, Hq, D) for "bshd"; k the same with its own head count.
    cos/sin: (B, S, R), (1, S, R) or (S, R) with R = rotary_dim (default D, or D - 1 for an odd D, whose table may
    also be HF's of width D + 1: module docstring). position_ids: (B, S) or (1, S) ints.
    """
    check_kernel_tensor("q", q)
    check_kernel_tensor("k", k)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D ({layout}), got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    if k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"q ({q.dtype}, {q.device}) and k ({k.dtype}, {k.device}) must share dtype and device")
    head_dim = q.shape[-1]
    seq_dim = 1 if layout == "bshd" else 2
    if k.shape[0] != q.shape[0] or k.shape[seq_dim] != q.shape[seq_dim] or k.shape[-1] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, sequence and head_dim "
                         f"in layout {layout!r}")
    if rotary_dim is None:  # an odd head dim: HF's table and frequencies for D, the last feature passed through
        rotary_dim, freq_dim = head_dim - head_dim % 2, head_dim
        table_widths = (rotary_dim, head_dim + 1) if head_dim % 2 else (rotary_dim,)
    else:
        rotary_dim = freq_dim = int(rotary_dim)
        table_widths = (rotary_dim,)
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim must be even and in (0, head_dim={head_dim}], got {rotary_dim}")
    batch, seq = q.shape[0], q.shape[seq_dim]
    if (cos is None) != (sin is None):
        raise ValueError("give both cos and sin, or neither (then position_ids and theta)")
    if cos is not None:
        if position_ids is not None or theta is not None:
            raise ValueError("give either cos/sin or position_ids/theta, not both")
        tables = (_check_table("cos", cos, batch, seq, table_widths, q.device),
                  _check_table("sin", sin, batch, seq, table_widths, q.device))
        if cos.shape[-1] != sin.shape[-1]:
            raise ValueError(f"cos and sin must have one width, got {cos.shape[-1]} and {sin.shape[-1]}")
    else:
        if position_ids is None or theta is None:
            raise ValueError("without cos/sin, both position_ids and theta are needed")
        check_kernel_tensor("position_ids", position_ids, dtypes=(torch.int64, torch.int32))
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        if position_ids.dim() != 2 or position_ids.shape[1] != seq or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}; expected ({batch} or 1, {seq})")
        if not theta > 0:
            raise ValueError(f"theta must be positive, got {theta}")
        tables = (position_ids.long(), _inv_freq(float(theta), freq_dim, q.device))
    q, k = _last_dim_unit(q), _last_dim_unit(k)
    return RoPEFunction.apply(q, k, *tables, cos is None, layout, rotary_dim)
