"""SwiGLU, bf16: the elementwise silu(gate) * up and the whole gate / up / down MLP, forward+backward.

Elementwise (T tokens, I intermediate, e = 2 bytes): the minimum traffic of forward+backward is reading gate
and up and writing h, then reading dh, gate, up and writing dgate, dup = 8 T I e. Providers: ours (inputs
kept), ours with overwrite_inputs_in_backward (Liger's memory behaviour), eager F.silu(g) * u, torch.compile
of it, Liger's LigerSiLUMulFunction.
MLP (H hidden): 9 GEMMs of 2 T H I flops each = 18 T H I model flops, whatever a provider recomputes.
Providers: ours (saves gate / up), ours.recompute, eager HF Qwen2MLP, torch.compile of it, Liger's
LigerSwiGLUMLP.
Where the MLP's time goes: gemms times the nine GEMMs alone (no elementwise pass: the floor of any
cuBLAS-based MLP) under torch's default library choice and with cuBLAS or cuBLASLt forced, in the order of a
variant that packs [gate | up] into one [T, 2 I] buffer and gets both weight grads from one GEMM; gemm_choice compares
each merge of the gate and up GEMMs with the separate GEMMs that swiglu_mlp runs (on the H200 the merges
measured no faster, so swiglu_mlp keeps them separate); overlap runs the backward elementwise kernel on a
second stream beside the dh GEMM to see whether the GPU hides it.
Backward is timed through torch.autograd.grad (fresh gradients, no .grad accumulation kernels); peak extra
memory counts everything one forward+backward allocates, gradients included, the same way for every provider.
On CPU the same code runs at tiny shapes through Triton's interpreter (ours and eager only).
"""
import pytest
import torch
import torch.nn.functional as F

from bench.harness import ON_GPU
from longvl.kernels.swiglu import SwiGLUMLP, swiglu, swiglu_backward

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
    return SwiGLUMLP.from_hf_mlp(eager, recompute=provider == "ours.recompute")


# Peers first: if the GPU heats up and clocks down over the run, that handicaps us, not them.
MLP_PROVIDERS = ["eager", "torch.compile", "liger", "ours", "ours.recompute"]
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


def _mlp_operands(device):
    """Random operands of every GEMM in the MLP, [gate | up] packed as the MLP packs them."""
    g = torch.Generator(device=device).manual_seed(0)
    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=DTYPE, generator=g) / shape[-1] ** 0.25
    return dict(x=rand(TOKENS, HIDDEN), gate_w=rand(INTERMEDIATE, HIDDEN), up_w=rand(INTERMEDIATE, HIDDEN),
                down_w=rand(HIDDEN, INTERMEDIATE), gate_up=rand(TOKENS, 2 * INTERMEDIATE),
                h=rand(TOKENS, INTERMEDIATE), dout=rand(TOKENS, HIDDEN))


def _gate_up_into_halves(x, gate_w, up_w):
    """[x Wg^T | x Wu^T]: two cuBLAS GEMMs writing the halves of one [T, 2 I] buffer (leading dimension 2 I)."""
    gate_up = torch.empty(x.shape[0], 2 * INTERMEDIATE, dtype=x.dtype, device=x.device)
    torch.mm(x, gate_w.t(), out=gate_up[:, :INTERMEDIATE])
    torch.mm(x, up_w.t(), out=gate_up[:, INTERMEDIATE:])
    return gate_up


def _nine_gemms(x, gate_w, up_w, down_w, gate_up, h, dout):
    """The GEMMs of a forward+backward with [gate | up] packed, in swiglu_mlp's order, nothing else."""
    _gate_up_into_halves(x, gate_w, up_w)
    F.linear(h, down_w)
    dh = dout @ down_w
    dout.t() @ h
    grad_x = gate_up[:, :INTERMEDIATE] @ gate_w
    grad_x.addmm_(gate_up[:, INTERMEDIATE:], up_w)
    gate_up.t() @ x
    return dh


@pytest.mark.parametrize("library", ["default", "cublas", "cublaslt"])
def test_mlp_gemms(measure, device, library):
    """`default` is torch's own choice, which every provider runs under; the others force one library."""
    if not ON_GPU and library != "default":
        pytest.skip("a BLAS library choice exists on GPU only")
    operands = _mlp_operands(device)
    previous = torch.backends.cuda.preferred_blas_library() if ON_GPU else None
    if library != "default":
        torch.backends.cuda.preferred_blas_library(library)
    try:
        measure("swiglu_mlp.gemms", library, lambda: _nine_gemms(**operands), shape=MLP_SHAPE, dtype=DTYPE,
                flops=18 * TOKENS * HIDDEN * INTERMEDIATE, memory=False)
    finally:
        if previous is not None:
            torch.backends.cuda.preferred_blas_library(previous)


def _gemm_choice(op, variant, x, gate_w, up_w, gate_up, **_):
    """One way to run the two GEMMs of `op` that involve gate and up: separate, or merged into one."""
    gate, up = gate_up[:, :INTERMEDIATE], gate_up[:, INTERMEDIATE:]
    both_w = torch.cat([gate_w, up_w])
    return {
        ("gate_up", "two_gemms_into_halves"): lambda: _gate_up_into_halves(x, gate_w, up_w),
        ("gate_up", "weight_concat+one_gemm"): lambda: x @ torch.cat([gate_w, up_w]).t(),
        ("gate_up", "one_gemm_weights_already_concat"): lambda: x @ both_w.t(),
        ("weight_grads", "two_gemms"): lambda: (gate.t() @ x, up.t() @ x),
        ("weight_grads", "one_gemm_2I_rows"): lambda: gate_up.t() @ x,
        ("input_grad", "mm+addmm"): lambda: (gate @ gate_w).addmm_(up, up_w),
        ("input_grad", "one_gemm_K_2I"): lambda: gate_up @ both_w,
    }[op, variant]


@pytest.mark.parametrize("op,variant", [
    ("gate_up", "two_gemms_into_halves"), ("gate_up", "weight_concat+one_gemm"),
    ("gate_up", "one_gemm_weights_already_concat"), ("weight_grads", "two_gemms"),
    ("weight_grads", "one_gemm_2I_rows"), ("input_grad", "mm+addmm"), ("input_grad", "one_gemm_K_2I")])
def test_gemm_choice(measure, device, op, variant):
    fn = _gemm_choice(op, variant, **_mlp_operands(device))
    measure(f"swiglu_mlp.gemm_choice.{op}", variant, fn, shape=MLP_SHAPE, dtype=DTYPE,
            flops=4 * TOKENS * HIDDEN * INTERMEDIATE, memory=False)


@pytest.mark.parametrize("schedule", ["one_stream", "two_streams"])
def test_backward_elementwise_overlap(measure, device, schedule):
    """The dh GEMM and the backward kernel on independent buffers: in turn on one stream, or at once with the
    kernel on a second stream, which only helps if the GPU runs it on SM resources the GEMM leaves idle."""
    ops = _mlp_operands(device)
    dout, down_w, gate_up, h = ops["dout"], ops["down_w"], ops["gate_up"], ops["h"]
    gate, up = gate_up[:, :INTERMEDIATE], gate_up[:, INTERMEDIATE:]
    side = torch.cuda.Stream(device) if ON_GPU and schedule == "two_streams" else None
    main = torch.cuda.current_stream(device) if side is not None else None

    def fn():
        if side is not None:
            side.wait_stream(main)
            with torch.cuda.stream(side):
                swiglu_backward(h, gate, up, gate, up)
        else:
            swiglu_backward(h, gate, up, gate, up)
        dh = dout @ down_w
        if side is not None:
            main.wait_stream(side)
        return dh

    measure("swiglu_mlp.bwd_elementwise_overlap", schedule, fn, shape=MLP_SHAPE, dtype=DTYPE,
            flops=2 * TOKENS * HIDDEN * INTERMEDIATE, memory=False,
            note="dh GEMM + the backward kernel (bytes 5 T I e) on independent buffers")
