"""RMSNorm, bf16: ours vs eager HF Qwen2RMSNorm, torch.compile of it and Liger, forward and forward+backward.

Bytes are the minimum any implementation must move (e = 2 bytes for bf16, N tokens, H hidden):
  forward:          read x, read w, write y                          = (2 N H + H) e
  forward+backward: forward, then read x, dy and w, write dx and dW  = (5 N H + 3 H) e
Our saved fp32 rstd (4 bytes a row) and the fp32 dW partials are not counted: they are costs of our method.
Backward is timed through torch.autograd.grad so that no .grad accumulation kernel is included.
On CPU the same code runs at a tiny shape through Triton's interpreter (ours and eager only).
"""
import pytest
import torch

from bench.harness import ON_GPU
from bench.shapes import QUICK, token_counts
from kernels.rms_norm import RMSNorm

DTYPE = torch.bfloat16
EPS = 1e-6
MAIN_TOKENS, MAIN_HIDDEN = 16384, 3584  # Qwen2.5-7B
if ON_GPU:
    SHAPES = [(t, MAIN_HIDDEN) for t in token_counts(MAIN_TOKENS, 4096, 65536)]
    SHAPES += [] if QUICK else [(MAIN_TOKENS, 1152), (MAIN_TOKENS, 4608)]  # SigLIP-so400m, Gemma-2-27B
else:
    SHAPES = [(64, 96)]


PROVIDERS = ["ours", "eager", "torch.compile", "liger"]
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


@pytest.mark.parametrize("op", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens,hidden", SHAPES)
def test_rms_norm(measure, device, tokens, hidden, provider, op):
    module = _module(provider, tokens, hidden).to(device=device, dtype=DTYPE)
    x = torch.randn(tokens, hidden, device=device, dtype=DTYPE, requires_grad=True)
    dy = torch.randn_like(x)
    with torch.no_grad():
        module.weight.copy_(torch.rand(hidden, device=device) + 0.5)
    # A provider that computes something else would make the comparison meaningless.
    xf = x.detach().float()
    expected = module.weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS))
    torch.testing.assert_close(module(x).float(), expected, atol=3e-2, rtol=2e-2)
    shape = {"tokens": tokens, "hidden": hidden}
    element = x.element_size()
    if op == "fwd":
        measure("rms_norm.fwd", provider, lambda: module(x), shape=shape, dtype=DTYPE,
                bytes=(2 * tokens * hidden + hidden) * element)
    else:
        params = (x, module.weight)
        measure("rms_norm.fwd_bwd", provider, lambda: torch.autograd.grad(module(x), params, dy), shape=shape,
                dtype=DTYPE, bytes=(5 * tokens * hidden + 3 * hidden) * element)
