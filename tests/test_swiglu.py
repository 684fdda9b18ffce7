"""SwiGLU elementwise op and fused MLP against a float64 PyTorch reference: outputs and every gradient.

CPU runs the Triton kernels through the interpreter at small odd sizes; a GPU runs the same tests at sizes
where the kernels use many programs and cuBLAS its tensor cores. Tolerances are relative Frobenius errors
against float64, per dtype: bf16 carries 8 mantissa bits, fp16 11, fp32 24.
"""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from longvl.kernels.swiglu import SwiGLUMLP, _column_parts, swiglu, swiglu_mlp
from tests.distributed import run_distributed

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# The MLP rounds gate, up, h and dh to the dtype between GEMMs; the elementwise op rounds only its outputs.
MLP_TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 2e-5}
ELEMENTWISE_TOL = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-6}


def assert_near(actual, expected, dtype, what, tolerances=MLP_TOL):
    """Relative error in the Frobenius norm against the float64 reference; NaN / inf always fail."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)
    assert err < tolerances[dtype], f"{what}: relative error {err:.2e} >= {tolerances[dtype]:.0e} in {dtype}"


def reference_mlp(x, gate_w, up_w, down_w, gate_b, up_b, down_b):
    return F.linear(F.silu(F.linear(x, gate_w, gate_b)) * F.linear(x, up_w, up_b), down_w, down_b)


def leaf(t, dtype):
    return t.to(dtype).detach().requires_grad_()


# ---- elementwise ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_float64_forward_and_backward(device, dtype):
    shape = (3, 5, 131) if device.type == "cpu" else (7, 333, 4099)
    gate64 = torch.randn(shape, dtype=torch.float64, device=device) * 3
    up64 = torch.randn(shape, dtype=torch.float64, device=device)
    dh64 = torch.randn(shape, dtype=torch.float64, device=device)
    gate, up = leaf(gate64, dtype), leaf(up64, dtype)
    gate_before, up_before = gate.detach().clone(), up.detach().clone()
    h = swiglu(gate, up)
    h.backward(dh64.to(dtype))
    ref_gate, ref_up = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    ref = F.silu(ref_gate) * ref_up
    ref.backward(dh64)
    assert h.dtype == dtype and h.shape == shape
    assert_near(h, ref, dtype, "h", ELEMENTWISE_TOL)
    assert_near(gate.grad, ref_gate.grad, dtype, "d gate", ELEMENTWISE_TOL)
    assert_near(up.grad, ref_up.grad, dtype, "d up", ELEMENTWISE_TOL)
    assert torch.equal(gate.detach(), gate_before) and torch.equal(up.detach(), up_before), "inputs modified"


def test_swiglu_on_strided_halves_of_one_projection(device):
    """gate and up as the two halves of a fused [tokens, 2 * intermediate] projection (row stride 2I)."""
    proj64 = torch.randn(9, 2 * 77, dtype=torch.float64, device=device)
    proj = leaf(proj64, torch.float32)
    gate, up = proj.chunk(2, dim=-1)
    dh = torch.randn(9, 77, device=device)
    swiglu(gate, up).backward(dh)
    ref_proj = proj64.clone().requires_grad_()
    ref_gate, ref_up = ref_proj.chunk(2, dim=-1)
    (F.silu(ref_gate) * ref_up).backward(dh.double())
    assert_near(proj.grad, ref_proj.grad, torch.float32, "d proj", ELEMENTWISE_TOL)


def test_swiglu_overwrite_inputs_gives_same_gradients_and_refuses_second_backward(device):
    gate64, up64 = torch.randn(2, 4, 65, device=device).double(), torch.randn(2, 4, 65, device=device).double()
    dh = torch.randn(2, 4, 65, device=device)
    grads = []
    for overwrite in (False, True):
        gate, up = leaf(gate64, torch.float32).clone(), leaf(up64, torch.float32).clone()  # non-leaf temporaries
        h = swiglu(gate, up, overwrite_inputs_in_backward=overwrite)
        grads.append(torch.autograd.grad(h, (gate, up), dh, retain_graph=True))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="backward twice"):
        torch.autograd.grad(h, (gate, up), dh)


def test_swiglu_rejects_bad_input(device):
    good = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="same shape"):
        swiglu(good, torch.randn(4, 9, device=device))
    with pytest.raises(ValueError, match="share dtype"):
        swiglu(good, good.half())
    with pytest.raises(TypeError, match="dtype torch.int64"):
        swiglu(good.long(), good.long())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        swiglu(good, [1.0])


# ---- MLP --------------------------------------------------------------------------------------------------

def mlp_sizes(device):
    """(leading dims of x, hidden, intermediate): odd everywhere."""
    return ((3, 7), 37, 53) if device.type == "cpu" else ((3, 701), 1000, 2753)


def random_mlp_inputs(device, bias):
    lead, hidden, inter = mlp_sizes(device)
    x = torch.randn(*lead, hidden, dtype=torch.float64, device=device)
    weights = [torch.randn(inter, hidden, dtype=torch.float64, device=device) / hidden ** 0.5,
               torch.randn(inter, hidden, dtype=torch.float64, device=device) / hidden ** 0.5,
               torch.randn(hidden, inter, dtype=torch.float64, device=device) / inter ** 0.5]
    biases = ([torch.randn(inter, dtype=torch.float64, device=device) * 0.1,
               torch.randn(inter, dtype=torch.float64, device=device) * 0.1,
               torch.randn(hidden, dtype=torch.float64, device=device) * 0.1] if bias else [None] * 3)
    return x, weights + biases


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("recompute", [False, True])
def test_mlp_matches_float64_forward_and_every_gradient(device, dtype, bias, recompute):
    x64, params64 = random_mlp_inputs(device, bias)
    x = leaf(x64, dtype)
    params = [None if p is None else leaf(p, dtype) for p in params64]
    out = swiglu_mlp(x, *params, recompute=recompute)
    dout64 = torch.randn_like(out, dtype=torch.float64)
    out.backward(dout64.to(dtype))
    ref_x = x.detach().double().requires_grad_()
    ref_params = [None if p is None else p.detach().double().requires_grad_() for p in params]
    ref = reference_mlp(ref_x, *ref_params)
    ref.backward(dout64)
    assert out.dtype == dtype and out.shape == x.shape
    assert_near(out, ref, dtype, "out")
    assert_near(x.grad, ref_x.grad, dtype, "dx")
    names = ["gate_weight", "up_weight", "down_weight", "gate_bias", "up_bias", "down_bias"]
    for name, p, ref_p in zip(names, params, ref_params):
        if p is not None:
            assert_near(p.grad, ref_p.grad, dtype, f"d {name}")


def test_mlp_frozen_weights_and_frozen_input(device):
    """Only what requires grad gets a gradient, and the rest still matches the reference."""
    x64, params64 = random_mlp_inputs(device, bias=False)
    x = x64.float()  # no grad for x (first layer)
    gate_w, up_w, down_w = (p.float() for p in params64[:3])
    down_w.requires_grad_()
    swiglu_mlp(x, gate_w, up_w, down_w).sum().backward()
    ref_down = params64[2].clone().requires_grad_()
    reference_mlp(x64, params64[0], params64[1], ref_down, None, None, None).sum().backward()
    assert gate_w.grad is None and up_w.grad is None
    assert_near(down_w.grad, ref_down.grad, torch.float32, "d down_weight")


def test_mlp_recompute_saves_no_intermediate_sized_tensor(device):
    x64, params64 = random_mlp_inputs(device, bias=True)
    x, params = x64.float().requires_grad_(), [p.float().requires_grad_() for p in params64]
    tokens, intermediate = x.numel() // x.shape[-1], params[0].shape[0]
    for recompute, expected in ((False, 2), (True, 0)):
        out = swiglu_mlp(x, *params, recompute=recompute)  # kept alive: its graph node owns the saved tensors
        saved = out.grad_fn.saved_tensors
        intermediate_sized = [t for t in saved if t is not None and t.shape[0] == tokens and t.dim() == 2
                              and t.shape[1] % intermediate == 0]
        assert sum(t.numel() for t in intermediate_sized) == expected * tokens * intermediate


class _NewTensorSizes(TorchDispatchMode):
    """Records the shape of every tensor an aten op allocates (views, out= and in-place ops allocate none)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        if not func.is_view and "out" not in (kwargs or {}) and not name.endswith("_") and \
                func._schema.overload_name != "out":
            self.shapes += [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(result)
                            if isinstance(t, torch.Tensor)]
        return result


@pytest.mark.parametrize("recompute", [False, True])
def test_mlp_backward_allocates_one_intermediate_slice_at_a_time(device, recompute):
    """Backward's only new [tokens, intermediate]-sized buffer is dh for one slice of the columns (and, with
    recompute, the two recomputed pre-activations): eager would allocate four full ones."""
    x64, params64 = random_mlp_inputs(device, bias=False)
    x, params = leaf(x64, torch.float32), [leaf(p, torch.float32) for p in params64[:3]]
    tokens, intermediate = x.numel() // x.shape[-1], params[0].shape[0]
    out = swiglu_mlp(x, *params, recompute=recompute)
    with _NewTensorSizes() as allocated:
        torch.autograd.grad(out.sum(), [x, *params])
    half = -(-intermediate // 2)
    widths = sorted(shape[1] for shape in allocated.shapes if len(shape) == 2 and shape[0] == tokens
                    and shape[1] != x.shape[-1])  # token-major buffers other than dx
    assert [w for w in widths if w > half] == ([intermediate] * 2 if recompute else []), widths
    assert [s.stop - s.start for s in _column_parts(intermediate)] == [w for w in widths if w <= half], widths


def test_mlp_gradients_accumulate_over_steps_with_each_parameter_layout(device):
    """.grad after two backward passes is twice one pass's gradient, with the parameter's own strides."""
    lead, hidden, inter = mlp_sizes(device)
    mlp = SwiGLUMLP(hidden, inter, bias=True, device=device)
    x = torch.randn(*lead, hidden, device=device)
    once = torch.autograd.grad(mlp(x).pow(2).sum(), list(mlp.parameters()))
    for _ in range(2):
        mlp(x).pow(2).sum().backward()
    for p, g in zip(mlp.parameters(), once):
        assert p.grad.shape == p.shape and p.grad.stride() == p.stride()
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-5, atol=1e-6)


def test_mlp_second_backward_needs_recompute(device):
    x64, params64 = random_mlp_inputs(device, bias=False)
    x, params = leaf(x64, torch.float32), [leaf(p, torch.float32) for p in params64[:3]]
    grads = {}
    for recompute in (True, False):
        out = swiglu_mlp(x, *params, recompute=recompute)
        grads[recompute] = torch.autograd.grad(out.sum(), [x, *params], retain_graph=True)
        if recompute:
            again = torch.autograd.grad(out.sum(), [x, *params])
            for a, b in zip(grads[True], again):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        else:
            with pytest.raises(RuntimeError, match="use recompute=True"):
                torch.autograd.grad(out.sum(), [x, *params])
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("recompute", [False, True])
def test_mlp_under_activation_checkpointing(device, recompute):
    from torch.utils.checkpoint import checkpoint

    lead, hidden, inter = mlp_sizes(device)
    mlp = SwiGLUMLP(hidden, inter, bias=True, recompute=recompute, device=device)
    x = torch.randn(*lead, hidden, device=device, requires_grad=True)
    grads = []
    for use_checkpoint in (False, True):
        out = checkpoint(mlp, x, use_reentrant=False) if use_checkpoint else mlp(x)
        grads.append(torch.autograd.grad((out * out).sum(), [x, *mlp.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_mlp_module_wraps_hf_qwen2_mlp_without_copying(device):
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    _, hidden, inter = mlp_sizes(device)
    hf = Qwen2MLP(Qwen2Config(hidden_size=hidden, intermediate_size=inter, hidden_act="silu")).to(device)
    ours = SwiGLUMLP.from_hf_mlp(hf)
    assert ours.gate_proj is hf.gate_proj and ours.down_proj.weight is hf.down_proj.weight
    assert ours.state_dict().keys() == SwiGLUMLP(hidden, inter).state_dict().keys() == {
        f"{n}_proj.weight" for n in ("gate", "up", "down")}
    x = torch.randn(2, 5, hidden, device=device)
    torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-5)
    gelu = Qwen2MLP(Qwen2Config(hidden_size=8, intermediate_size=16, hidden_act="gelu"))
    with pytest.raises(ValueError, match="not SiLU"):
        SwiGLUMLP.from_hf_mlp(gelu)


def test_mlp_under_autocast_runs_in_the_autocast_dtype(device):
    mlp = SwiGLUMLP(*mlp_sizes(device)[1:], device=device)
    x = torch.randn(4, mlp_sizes(device)[1], device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = mlp(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert mlp.gate_proj.weight.grad.dtype == torch.float32
    with torch.no_grad():
        ref = reference_mlp(x.double(), *(p.double() for p in (mlp.gate_proj.weight, mlp.up_proj.weight,
                                                               mlp.down_proj.weight)), None, None, None)
    assert_near(out, ref, torch.bfloat16, "out under autocast")


def test_mlp_rejects_bad_input(device):
    x = torch.randn(3, 8, device=device)
    gate_w, up_w, down_w = torch.randn(12, 8, device=device), torch.randn(12, 8, device=device), \
        torch.randn(8, 12, device=device)
    with pytest.raises(ValueError, match=r"up_weight has shape \(12, 7\)"):
        swiglu_mlp(x, gate_w, up_w[:, :7], down_w)
    with pytest.raises(ValueError, match=r"down_weight has shape \(12, 8\)"):
        swiglu_mlp(x, gate_w, up_w, down_w.t())
    with pytest.raises(ValueError, match="down_bias has shape"):
        swiglu_mlp(x, gate_w, up_w, down_w, down_bias=torch.zeros(12, device=device))
    with pytest.raises(ValueError, match="all inputs must share dtype"):
        swiglu_mlp(x, gate_w.half(), up_w, down_w)
    with pytest.raises(TypeError, match="gate_weight must be a torch.Tensor"):
        swiglu_mlp(x, None, up_w, down_w)


# ---- FSDP2 ------------------------------------------------------------------------------------------------

def _fsdp2_matches_single_process(rank, world_size):
    """Each rank: a fully_shard-ed model on its slice of the batch vs an unsharded copy on the whole batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))  # CPU even on a GPU machine: the test is about gloo
    errors = []
    for bias, recompute in [(False, False), (True, True)]:
        torch.manual_seed(0)  # same weights and data on every rank
        ref = torch.nn.Sequential(SwiGLUMLP(16, 40, bias=bias, recompute=recompute),
                                  SwiGLUMLP(16, 24, bias=bias, recompute=recompute))
        x = torch.randn(world_size * 6, 16)
        sharded = copy.deepcopy(ref)
        for block in sharded:
            fully_shard(block, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        loss = sharded(x.chunk(world_size)[rank]).pow(2).mean()
        loss.backward()
        ref_loss = ref(x).pow(2).mean()
        ref_loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        errors.append((mean_loss / world_size - ref_loss).abs().item())
        for (name, p), ref_p in zip(sharded.named_parameters(), ref.parameters()):
            full = p.grad.full_tensor()
            errors.append(((full - ref_p.grad).norm() / ref_p.grad.norm()).item())
    return errors


def test_mlp_under_fsdp2_fully_shard_matches_single_process(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the ranks hold CPU tensors, also on a GPU machine
    for rank_errors in run_distributed(_fsdp2_matches_single_process, 2, timeout=120):
        assert len(rank_errors) == (1 + 2 * 3) + (1 + 2 * 6)
        assert max(rank_errors) < 1e-5, rank_errors
