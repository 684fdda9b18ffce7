"""RMSNorm, bf16: ours vs eager HF Qwen2RMSNorm, torch.compile of it and Liger, forward and forward+backward.

Bytes are the minimum any implementation must move (e = 2 bytes for bf16, N tokens, H hidden):
  forward:          read x, read w, write y                          = (2 N H + H) e
  forward+backward: forward, then read x, dy and w, write dx and dW  = (5 N H + 3 H) e
Our saved fp32 rstd (4 bytes a row) and the fp32 dW partials are not counted: they are costs of our method.
Backward is timed through torch.autograd.grad so that no .grad accumulation kernel is included.
Every provider is timed by replaying a captured CUDA graph ("rms_norm.fwd", "rms_norm.fwd_bwd"): the GPU's
time, which is what a training step pays once launches queue ahead of the GPU. At the main shape the same calls
are also timed with CUDA events around each eager call ("...host_included"): when the Python and launch work
of a call outlasts its kernels, that figure is the host's time, which a user running eager PyTorch sees.
"copy_floor" is a device copy of the same bytes, graph-timed like the others: the reference at sizes too small
to reach the 1 GiB copy ceiling.
On CPU the same code runs at a tiny shape through Triton's interpreter (ours and eager only).
"""
import pytest
import torch

from bench.harness import ON_GPU, measure_copy_floor
from bench.shapes import MODELS, QUICK, token_counts
from longvl.kernels.rms_norm import RMSNorm

DTYPE = torch.bfloat16
EPS = 1e-6
MAIN_TOKENS, MAIN_HIDDEN = 16384, 3584  # Qwen2.5-7B
if ON_GPU:
    SHAPES = [(t, MAIN_HIDDEN) for t in token_counts(MAIN_TOKENS, 4096, 65536)]
    # The other models' widths (SigLIP-so400m's 1152 among them), and Gemma-2-27B's 4608.
    OTHER_WIDTHS = sorted({m["hidden"] for m in MODELS.values()} - {MAIN_HIDDEN} | {4608})
    SHAPES += [] if QUICK else [(MAIN_TOKENS, hidden) for hidden in OTHER_WIDTHS]
else:
    SHAPES = [(64, 96)]
# Every shape graph-timed; the main one (on CPU the tiny one) also host-included.
CASES = [(*shape, "cuda_graph") for shape in SHAPES] + [(*SHAPES[0], "host_included")]


PROVIDERS = ["ours", "eager", "torch.compile", "liger", "copy_floor"]
_COMPILED = {}


def _module(provider, tokens, hidden):
    """The provider's RMSNorm module, or a skip when it is missing or pointless on this machine."""
    if provider == "ours":
        return RMSNorm(hidden, eps=EPS)
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    if provider == "eager":
        return Qwen2RMSNorm(hidden, eps=EPS)
    if not ON_GPU:
        pytest.skip(f"{provider} is measured on GPU only")
    if provider == "liger":
        liger = pytest.importorskip("liger_kernel.transformers.rms_norm")
        return liger.LigerRMSNorm(hidden, eps=EPS)
    if (tokens, hidden) != (MAIN_TOKENS, MAIN_HIDDEN):
        pytest.skip("torch.compile is measured at the main shape only: compiling every shape would not fit the run")
    if hidden not in _COMPILED:
        _COMPILED[hidden] = torch.compile(Qwen2RMSNorm(hidden, eps=EPS))
    return _COMPILED[hidden]


def _fwd_bwd(module, x, dy, fresh_leaves):
    """fn() -> (dx, dweight). With fresh_leaves, x and the weight enter each call as new leaf tensors (same
    storage): a leaf's gradient node remembers the stream it was first used on, and one left over from the eager
    warm-up on the default stream would break the CUDA-graph capture that runs on a side stream."""
    if not fresh_leaves:
        params = (x, module.weight)
        return lambda: torch.autograd.grad(module(x), params, dy)
    (weight_name, weight), = module.named_parameters()  # "weight", or "_orig_mod.weight" under torch.compile

    def run():
        x_leaf, weight_leaf = x.detach().requires_grad_(), weight.detach().requires_grad_()
        y = torch.func.functional_call(module, {weight_name: weight_leaf}, (x_leaf,))
        return torch.autograd.grad(y, (x_leaf, weight_leaf), dy)

    return run


@pytest.mark.parametrize("op", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens,hidden,timing", CASES)
def test_rms_norm(measure, device, tokens, hidden, timing, provider, op):
    element, graph = DTYPE.itemsize, timing == "cuda_graph"
    op_bytes = (2 * tokens * hidden + hidden) * element if op == "fwd" else (5 * tokens * hidden + 3 * hidden) * element
    shape = {"tokens": tokens, "hidden": hidden}
    if provider == "copy_floor":
        return measure_copy_floor(measure, f"rms_norm.{op}", op_bytes, shape=shape, dtype=DTYPE, device=device,
                                  timing=timing)
    module = _module(provider, tokens, hidden).to(device=device, dtype=DTYPE)
    x = torch.randn(tokens, hidden, device=device, dtype=DTYPE, requires_grad=True)
    dy = torch.randn_like(x)
    with torch.no_grad():
        module.weight.copy_(torch.rand(hidden, device=device) + 0.5)
    # A provider that computes something else would make the comparison meaningless.
    xf = x.detach().float()
    expected = module.weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS))
    torch.testing.assert_close(module(x).float(), expected, atol=3e-2, rtol=2e-2)
    run = (lambda: module(x)) if op == "fwd" else _fwd_bwd(module, x, dy, fresh_leaves=graph)
    measure(f"rms_norm.{op}" if graph else f"rms_norm.{op}.host_included", provider, run, shape=shape, dtype=DTYPE,
            bytes=op_bytes, cuda_graph=graph)
