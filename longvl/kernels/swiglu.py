"""SwiGLU: the elementwise silu(gate) * up and the fused gate / up / down MLP of Qwen2- and Llama-style blocks.

The elementwise kernels are memory-bound, so the design counts passes over [tokens, intermediate] buffers.
Forward reads gate and up once and writes h; silu is never stored but recomputed in backward, whose single
kernel reads (dh, gate, up) and writes (dgate, dup), optionally also h for the down projection's weight grad.

The MLP keeps the three GEMMs on cuBLAS and removes every other pass. Forward saves x and the gate / up
pre-activations (or only x with recompute=True, which recomputes the two GEMMs in backward). Backward takes
the intermediate columns in BACKWARD_PARTS slices: per slice it computes dh = dout @ Wd[:, slice], one kernel
overwrites that slice of the gate and up buffers (ours, dead after this backward) with dgate and dup and the dh
buffer with h, and the down weight's gradient for those columns is written. So backward needs one new buffer of
a slice's size (half the intermediate size) instead of eager's four intermediate-sized ones; the GEMMs stay
wide enough (thousands of columns at real widths) to keep cuBLAS at its speed.
(A Triton GEMM for gate / up with the SwiGLU epilogue measured slower than cuBLAS + the elementwise kernel,
see bench/results/swiglu_*.json, and is gone.)
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from longvl.kernels._utils import cdiv

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TILE = 2048  # elements per program of the elementwise kernels: 8 per thread with NUM_WARPS = 8
NUM_WARPS = 8
BACKWARD_PARTS = 2  # slices of the intermediate dim the MLP's backward takes in turn (module docstring)


@triton.jit
def _tile(n_rows, n_cols, n_col_blocks, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """This program's rows [R, 1], columns [1, C] and mask (one flat grid: no 65535 limit on any axis)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = (pid // n_col_blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = (pid % n_col_blocks) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    return rows[:, None], cols[None, :], (rows < n_rows)[:, None] & (cols < n_cols)[None, :]


@triton.jit
def _swiglu_forward_kernel(
    gate_ptr, up_ptr, h_ptr, n_rows, n_cols, n_col_blocks, gate_stride, up_stride, h_stride,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    rows, cols, mask = _tile(n_rows, n_cols, n_col_blocks, BLOCK_ROWS, BLOCK_COLS)
    gate = tl.load(gate_ptr + rows * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + rows * up_stride + cols, mask=mask, other=0.0).to(tl.float32)
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + rows * h_stride + cols, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(
    dh_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, h_ptr, n_rows, n_cols, n_col_blocks,
    dh_stride, gate_stride, up_stride, dgate_stride, dup_stride, h_stride,
    STORE_H: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """Every element is loaded before it is stored, so outputs may alias inputs (dgate over gate, h over dh)."""
    rows, cols, mask = _tile(n_rows, n_cols, n_col_blocks, BLOCK_ROWS, BLOCK_COLS)
    dh = tl.load(dh_ptr + rows * dh_stride + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + rows * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + rows * up_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    dgate = dh * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(dgate_ptr + rows * dgate_stride + cols, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + rows * dup_stride + cols, (dh * silu).to(dup_ptr.dtype.element_ty), mask=mask)
    if STORE_H:
        tl.store(h_ptr + rows * h_stride + cols, (silu * up).to(h_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D [rows, cols] view with unit column stride (a copy only when no such view exists)."""
    t = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t if t.stride(-1) == 1 else t.contiguous()


def _as_one_row_if_contiguous(*tensors):
    """Contiguous operands become one long row: no partly masked tile at the end of every row."""
    if all(t.is_contiguous() for t in tensors):
        return [t.view(1, -1) for t in tensors]
    return tensors


@functools.lru_cache(maxsize=256)
def _tile_shape(n_rows: int, n_cols: int):
    """(rows, cols) of one program's TILE elements: the split that pads the fewest elements (wider on ties), so
    strided rows of 18944 columns (the halves of a fused [tokens, 2 I] gate_up projection) are not 7.5 %
    masked lanes as with 2048-wide tiles."""
    def padded(block_cols):
        block_rows = TILE // block_cols
        return cdiv(n_rows, block_rows) * block_rows * cdiv(n_cols, block_cols) * block_cols

    block_cols = min((2048, 1024, 512, 256), key=padded)  # min keeps the first (widest) of equals
    return TILE // block_cols, block_cols


def _launch(rows: torch.Tensor):
    """Grid and the kernel's size arguments for a [rows, cols] operand."""
    n_rows, n_cols = rows.shape
    block_rows, block_cols = _tile_shape(n_rows, n_cols)
    n_col_blocks = cdiv(n_cols, block_cols)
    grid = (cdiv(n_rows, block_rows) * n_col_blocks,)
    return grid, dict(n_rows=n_rows, n_cols=n_cols, n_col_blocks=n_col_blocks, BLOCK_ROWS=block_rows,
                      BLOCK_COLS=block_cols, num_warps=NUM_WARPS)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h = silu(gate) * up for 2-D [rows, cols] tensors with unit column stride, into a new buffer."""
    h = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if h.numel():
        gate_rows, up_rows, h_rows = _as_one_row_if_contiguous(gate, up, h)
        grid, sizes = _launch(h_rows)
        _swiglu_forward_kernel[grid](gate_rows, up_rows, h_rows, gate_stride=gate_rows.stride(0),
                                     up_stride=up_rows.stride(0), h_stride=h_rows.stride(0), **sizes)
    return h


def swiglu_backward(dh, gate, up, dgate, dup, h=None):
    """Writes dgate, dup (and h = silu(gate) * up when given); any output may be the buffer of any input."""
    if dh.numel():
        store_h = h is not None
        dh, gate, up, dgate, dup, h = _as_one_row_if_contiguous(dh, gate, up, dgate, dup, h if store_h else dh)
        grid, sizes = _launch(dh)
        _swiglu_backward_kernel[grid](
            dh, gate, up, dgate, dup, h, dh_stride=dh.stride(0), gate_stride=gate.stride(0),
            up_stride=up.stride(0), dgate_stride=dgate.stride(0), dup_stride=dup.stride(0), h_stride=h.stride(0),
            STORE_H=store_h, **sizes)


def _check_floating(name: str, t: torch.Tensor):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}")


def _check_plain(name: str, t: torch.Tensor):
    """Triton needs local tensors: a still-sharded DTensor means the weights were never gathered."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        raise TypeError(f"{name} is a DTensor ({t.placements}): call the MLP inside the forward of the module "
                        f"that FSDP wraps, where its parameters are gathered plain tensors")


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, overwrite_inputs_in_backward):
        gate2d, up2d = _rows(gate), _rows(up)
        ctx.overwrite = overwrite_inputs_in_backward and gate2d.data_ptr() == gate.data_ptr() \
            and up2d.data_ptr() == up.data_ptr()
        ctx.consumed = False
        ctx.save_for_backward(gate2d, up2d)
        return swiglu_forward(gate2d, up2d).view(gate.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h):
        if ctx.consumed:
            raise RuntimeError("swiglu(..., overwrite_inputs_in_backward=True) cannot run backward twice: the "
                               "first backward overwrote gate and up with their gradients")
        gate, up = ctx.saved_tensors
        dh = _rows(grad_h)
        if ctx.overwrite:
            ctx.consumed = True
            dgate, dup = gate, up
        else:
            dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        swiglu_backward(dh, gate, up, dgate, dup)
        shape = grad_h.shape
        return dgate.view(shape), dup.view(shape), None


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, overwrite_inputs_in_backward: bool = False) -> torch.Tensor:
    """silu(gate) * up, computed in fp32 and rounded to the inputs' dtype; differentiable.

    Inputs are left untouched unless `overwrite_inputs_in_backward=True`, which makes backward store the
    gradients in gate's and up's own buffers (as Liger-Kernel always does): backward then allocates nothing,
    but gate and up hold garbage afterwards, so only use it when they are temporaries nothing else reads.
    """
    _check_floating("gate", gate)
    _check_floating("up", up)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"gate and up must share dtype and device, got {gate.dtype} on {gate.device} and "
                         f"{up.dtype} on {up.device}")
    if gate.dim() == 0:
        raise ValueError("gate and up must have at least one dimension")
    return SwiGLUFunction.apply(gate, up, overwrite_inputs_in_backward)


def _column_parts(intermediate: int):
    """The intermediate columns in BACKWARD_PARTS slices: backward holds dh (then h) for one slice at a time."""
    bounds = [intermediate * i // BACKWARD_PARTS for i in range(BACKWARD_PARTS + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


class SwiGLUMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias, recompute):
        x2d = x.reshape(-1, x.shape[-1])
        gate = F.linear(x2d, gate_weight, gate_bias)
        up = F.linear(x2d, up_weight, up_bias)
        h = swiglu_forward(gate, up)
        ctx.recompute, ctx.consumed = recompute, False
        if recompute:
            del gate, up  # freed before the down GEMM allocates its output
            saved = ()
        else:
            saved = (gate, up)
        out = F.linear(h, down_weight, down_bias)
        ctx.save_for_backward(x, gate_weight, up_weight, down_weight, gate_bias, up_bias, *saved)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.consumed:
            raise RuntimeError("swiglu_mlp(recompute=False) cannot run backward twice (retain_graph): its first "
                               "backward reused the saved gate / up buffers; use recompute=True")
        x, gate_weight, up_weight, down_weight, gate_bias, up_bias, *saved = ctx.saved_tensors
        needs = ctx.needs_input_grad
        x2d = x.reshape(-1, x.shape[-1])
        dout = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.recompute:
            gate, up = F.linear(x2d, gate_weight, gate_bias), F.linear(x2d, up_weight, up_bias)
        else:
            ctx.consumed = True
            gate, up = saved
        grad_down_weight = torch.empty_like(down_weight) if needs[3] else None
        for cols in _column_parts(gate.shape[1]):
            dh = dout @ down_weight[:, cols]
            # In place: dgate over gate, dup over up, h over dh (only the down weight's gradient needs h).
            swiglu_backward(dh, gate[:, cols], up[:, cols], gate[:, cols], up[:, cols], h=dh if needs[3] else None)
            if needs[3]:
                torch.mm(dout.t(), dh, out=grad_down_weight[:, cols])
            del dh
        dgate, dup = gate, up
        grad_down_bias = dout.sum(0) if needs[6] else None
        grad_x = None
        if needs[0]:
            grad_x = dgate @ gate_weight
            grad_x.addmm_(dup, up_weight)
            grad_x = grad_x.view(x.shape)
        grad_gate_weight = dgate.t() @ x2d if needs[1] else None
        grad_up_weight = dup.t() @ x2d if needs[2] else None
        grad_gate_bias = dgate.sum(0) if needs[4] else None
        grad_up_bias = dup.sum(0) if needs[5] else None
        return (grad_x, grad_gate_weight, grad_up_weight, grad_down_weight,
                grad_gate_bias, grad_up_bias, grad_down_bias, None)


def swiglu_mlp(x, gate_weight, up_weight, down_weight, gate_bias=None, up_bias=None, down_bias=None, *,
               recompute=False):
    """down(silu(gate(x)) * up(x)) with nn.Linear weight layouts ([out, in]); differentiable in every input.

    recompute=False saves x and the two [tokens, intermediate] pre-activations for backward; recompute=True
    saves only x and spends two more GEMMs in backward to recompute them. Under autocast, inputs are cast to
    the autocast dtype first (as F.linear would).
    """
    for name, t in dict(x=x, gate_weight=gate_weight, up_weight=up_weight, down_weight=down_weight).items():
        _check_floating(name, t)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias = (
            t if t is None else t.to(dtype) for t in (x, gate_weight, up_weight, down_weight,
                                                       gate_bias, up_bias, down_bias))
    _check_plain("x", x)
    if x.dim() < 1:
        raise ValueError("x must have a hidden dimension")
    hidden, intermediate = x.shape[-1], gate_weight.shape[0]
    expected = dict(gate_weight=(intermediate, hidden), up_weight=(intermediate, hidden),
                    down_weight=(hidden, intermediate), gate_bias=(intermediate,), up_bias=(intermediate,),
                    down_bias=(hidden,))
    given = dict(gate_weight=gate_weight, up_weight=up_weight, down_weight=down_weight, gate_bias=gate_bias,
                 up_bias=up_bias, down_bias=down_bias)
    for name, t in given.items():
        if t is None:
            continue
        _check_floating(name, t)
        _check_plain(name, t)
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {expected[name]} for hidden size "
                             f"{hidden} (x's last dim) and intermediate size {intermediate} (gate_weight's rows)")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}: all inputs "
                             f"must share dtype and device")
    return SwiGLUMLPFunction.apply(x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias,
                                   bool(recompute))


class SwiGLUMLP(nn.Module):
    """Drop-in for Qwen2MLP / LlamaMLP: same submodules and state-dict keys, fused forward and backward."""

    def __init__(self, hidden_size, intermediate_size, bias=False, recompute=False, device=None, dtype=None):
        super().__init__()
        factory = dict(bias=bias, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **factory)
        self.recompute = recompute

    @classmethod
    def from_linears(cls, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, recompute=False):
        """Wrap existing Linear modules (shared, not copied): training the result trains them."""
        mlp = cls.__new__(cls)
        nn.Module.__init__(mlp)
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = gate_proj, up_proj, down_proj
        mlp.recompute = recompute
        return mlp

    @classmethod
    def from_hf_mlp(cls, mlp: nn.Module, recompute=False):
        """Wrap a Hugging Face Qwen2MLP / LlamaMLP (or any module with those three Linears and SiLU)."""
        act = getattr(mlp, "act_fn", None)
        probe = torch.linspace(-4, 4, 9)
        if act is not None and not torch.allclose(act(probe), F.silu(probe)):  # HF has its own SiLU class
            raise ValueError(f"{type(mlp).__name__} uses activation {type(act).__name__}, not SiLU")
        return cls.from_linears(mlp.gate_proj, mlp.up_proj, mlp.down_proj, recompute)

    def forward(self, x):
        return swiglu_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight,
                          self.gate_proj.bias, self.up_proj.bias, self.down_proj.bias, recompute=self.recompute)

    def extra_repr(self):
        return f"recompute={self.recompute}"
