"""SwiGLU, bf16: the elementwise silu(gate) * up and the whole gate / up / down MLP, forward+backward.

Elementwise (T tokens, I intermediate, e = 2 bytes): the minimum traffic of forward+backward is reading gate
and up and writing h, then reading dh, gate, up and writing dgate, dup = 8 T I e. Providers: ours (inputs
kept), ours with overwrite_inputs_in_backward (Liger's memory behaviour), eager F.silu(g) * u, torch.compile
of it, Liger's LigerSiLUMulFunction.
MLP (H hidden): 9 GEMMs of 2 T H I flops each = 18 T H I model flops, whatever a provider recomputes.
Providers: ours (saves gate / up), ours.recompute, ours.triton_gemm (gate / up GEMM with the SwiGLU epilogue
in Triton), eager HF Qwen2MLP, torch.compile of it, Liger's LigerSwiGLUMLP. gate_up.fwd isolates the GEMM
choice: two cuBLAS GEMMs + our elementwise kernel vs the Triton GEMM with the epilogue.
Backward is timed through torch.autograd.grad (fresh gradients, no .grad accumulation kernels); peak extra
memory counts everything one forward+backward allocates, gradients included, the same way for every provider.
On CPU the same code runs at tiny shapes through Triton's interpreter (ours and eager only).
"""
import pytest
import torch
import torch.nn.functional as F

from bench.harness import ON_GPU
from kernels.swiglu import SwiGLUMLP, gate_up_swiglu_gemm, swiglu, swiglu_forward

DTYPE = torch.bfloat16
if ON_GPU:
    TOKENS, HIDDEN, INTERMEDIATE = 16384, 3584, 18944  # Qwen2.5-7B
else:
    TOKENS, HIDDEN, INTERMEDIATE = 8, 32, 96
_COMPILED = {}


def _skip_peer_on_cpu(provider):
    if not ON_GPU and provider in ("torch.compile", "liger"):
        pytest.skip(f"{provider} is measured on GPU only")


def _eager_silu_mul(gate, up):
    return F.silu(gate) * up


def _elementwise(provider):
    _skip_peer_on_cpu(provider)
    if provider == "ours":
        return swiglu
    if provider == "ours.overwrite_inputs":
        return lambda gate, up: swiglu(gate, up, overwrite_inputs_in_backward=True)
    if provider == "eager":
        return _eager_silu_mul
    if provider == "liger":
        ops = pytest.importorskip("liger_kernel.ops.swiglu")
        return ops.LigerSiLUMulFunction.apply
    return _COMPILED.setdefault("silu_mul", torch.compile(_eager_silu_mul))


@pytest.mark.parametrize("provider", ["eager", "torch.compile", "liger", "ours", "ours.overwrite_inputs"])
def test_silu_mul_fwd_bwd(measure, device, provider):
    fn = _elementwise(provider)
    gate = torch.randn(TOKENS, INTERMEDIATE, device=device, dtype=DTYPE, requires_grad=True)
    up = torch.randn_like(gate, requires_grad=True)
    dh = torch.randn_like(gate)
    # Check the provider computes the right thing before its inputs get overwritten by timing runs.
    expected = _eager_silu_mul(gate.detach().float(), up.detach().float())
    torch.testing.assert_close(fn(gate, up).float(), expected, atol=3e-2, rtol=2e-2)
    measure("swiglu.fwd_bwd", provider, lambda: torch.autograd.grad(fn(gate, up), (gate, up), dh),
            shape={"tokens": TOKENS, "intermediate": INTERMEDIATE}, dtype=DTYPE,
            bytes=8 * TOKENS * INTERMEDIATE * gate.element_size())


def _mlp(provider):
    _skip_peer_on_cpu(provider)
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    config = Qwen2Config(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, hidden_act="silu")
    if provider == "liger":
        swiglu_module = pytest.importorskip("liger_kernel.transformers.swiglu")
        return swiglu_module.LigerSwiGLUMLP(config)
    eager = Qwen2MLP(config)
    if provider == "eager":
        return eager
    if provider == "torch.compile":
        return torch.compile(eager)
    return SwiGLUMLP.from_hf_mlp(eager, recompute=provider == "ours.recompute",
                                 fused_gemm=provider == "ours.triton_gemm")


# Peers first: if the GPU heats up and clocks down over the run, that handicaps us, not them.
MLP_PROVIDERS = ["eager", "torch.compile", "liger", "ours", "ours.recompute", "ours.triton_gemm"]
MLP_SHAPE = {"tokens": TOKENS, "hidden": HIDDEN, "intermediate": INTERMEDIATE}


def _checked_mlp(provider, device):
    """The provider's MLP in bf16 and an input, after checking it computes down(silu(gate x) * up x)."""
    torch.manual_seed(0)
    mlp = _mlp(provider).to(device=device, dtype=DTYPE)
    x = torch.randn(TOKENS, HIDDEN, device=device, dtype=DTYPE, requires_grad=True)
    with torch.no_grad():
        gate_w, up_w, down_w = (p.float() for p in mlp.parameters())  # registration order
        expected = F.linear(F.silu(F.linear(x.float(), gate_w)) * F.linear(x.float(), up_w), down_w)
        error = (mlp(x).float() - expected).norm() / expected.norm()
    assert error < 2e-2, f"{provider} computes something else (relative error {error:.2e})"
    return mlp, x


@pytest.mark.parametrize("provider", MLP_PROVIDERS)
def test_mlp_fwd_bwd(measure, device, provider):
    mlp, x = _checked_mlp(provider, device)
    dout = torch.randn_like(x)
    inputs = (x, *mlp.parameters())
    measure("swiglu_mlp.fwd_bwd", provider, lambda: torch.autograd.grad(mlp(x), inputs, dout), shape=MLP_SHAPE,
            dtype=DTYPE, flops=18 * TOKENS * HIDDEN * INTERMEDIATE)


@pytest.mark.parametrize("provider", MLP_PROVIDERS)
def test_mlp_fwd(measure, device, provider):
    """Forward alone, noting what a forward keeps alive until backward (what activation checkpointing saves)."""
    mlp, x = _checked_mlp(provider, device)
    before = torch.cuda.memory_allocated() if ON_GPU else 0
    out = mlp(x)
    held = (torch.cuda.memory_allocated() - before) / 2**20 if ON_GPU else 0.0
    del out
    measure("swiglu_mlp.fwd", provider, lambda: mlp(x), shape=MLP_SHAPE, dtype=DTYPE,
            flops=6 * TOKENS * HIDDEN * INTERMEDIATE,
            note=f"held from forward to backward (output + saved tensors): {held:.0f} MiB")


@pytest.mark.parametrize("variant", ["cublas+elementwise", "triton_gemm_epilogue", "triton_gemm_epilogue.h_only"])
def test_gate_up_fwd(measure, device, variant):
    x = torch.randn(TOKENS, HIDDEN, device=device, dtype=DTYPE)
    gate_weight = torch.randn(INTERMEDIATE, HIDDEN, device=device, dtype=DTYPE) / HIDDEN ** 0.5
    up_weight = torch.randn_like(gate_weight) / HIDDEN ** 0.5
    if variant == "cublas+elementwise":
        def fn():
            return swiglu_forward(F.linear(x, gate_weight), F.linear(x, up_weight))
    else:
        keep = variant == "triton_gemm_epilogue"  # what recompute=False needs saved for backward

        def fn():
            return gate_up_swiglu_gemm(x, gate_weight, up_weight, None, None, store_preactivations=keep)[0]
    expected = F.silu(F.linear(x.float(), gate_weight.float())) * F.linear(x.float(), up_weight.float())
    assert (fn().float() - expected).norm() / expected.norm() < 2e-2
    measure("swiglu_mlp.gate_up_fwd", variant, fn, dtype=DTYPE, flops=4 * TOKENS * HIDDEN * INTERMEDIATE,
            shape=MLP_SHAPE)

