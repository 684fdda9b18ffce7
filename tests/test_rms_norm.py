"""RMSNorm against a float64 reference: outputs and every gradient, both casting conventions, the fused residual,
the in-place residual's safety, NaN propagation and bad input. CPU sizes are small (interpreter); on a GPU the
same tests run at real hidden sizes."""
import pytest
import torch

from longvl.kernels.rms_norm import RMSNorm, rms_norm

# (atol, rtol) per dtype: bf16 / fp16 outputs are rounded once (llama: twice) from fp32 math.
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}


def _sizes(device):
    """(rows, hidden) pairs: odd sizes on CPU; Qwen2.5-7B, SigLIP, Gemma-2-27B and an odd one on GPU."""
    if device.type == "cpu":
        return [(7, 37), (5, 300), (3, 56)]  # pieces 32 + 8, 256 + 64, and one padded block
    return [(4096, 3584), (2048, 1152), (2048, 4608), (1023, 4099)]


def _in_dtype(x, weight, eps, offset):
    """RMSNorm computed step by step in x's dtype (casting "none"): each step exact, then rounded, the mean summed
    in float64."""
    def rounded(value):
        return value.to(x.dtype).double()

    x64 = x.double()
    mean = rounded(rounded(x64 * x64).sum(-1, keepdim=True) / x.shape[-1])
    rstd = rounded(torch.rsqrt(rounded(mean + eps)))
    return rounded(rounded(x64 * rstd) * rounded(offset + weight.double()))


def _reference(x, weight, eps, offset, casting, residual=None):
    """Float64 RMSNorm with the same rounding points as the kernel: the sum and (llama) the normalised value, or
    (none) every step."""
    if residual is not None:
        x = (x.double() + residual.double()).to(x.dtype)
    summed = x
    if casting == "none":
        return _in_dtype(x, weight, eps, offset), summed
    x64 = x.double()
    normed = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "llama":
        normed = normed.to(x.dtype).double()
    return normed * (offset + weight.double()), summed


def _reference_grads(x, weight, residual, eps, offset, dy, dsum):
    """Float64 gradients of y (and the residual sum) with respect to x, weight and residual (no rounding)."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    inputs = [x64, w64]
    summed = x64
    if residual is not None:
        r64 = residual.detach().double().requires_grad_()
        inputs.append(r64)
        summed = x64 + r64
    y = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + eps) * (offset + w64)
    outputs, grads = [y], [dy.double()]
    if residual is not None:
        outputs.append(summed)
        grads.append(dsum.double())
    return torch.autograd.grad(outputs, inputs, grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("casting,offset", [("llama", 0.0), ("gemma", 1.0), ("none", 0.0)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_float64_reference(device, dtype, casting, offset, with_residual):
    atol, rtol = TOLERANCES[dtype]
    eps = 1e-5
    for rows, hidden in _sizes(device):
        x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=True)
        weight = (torch.randn(hidden, device=device) * 0.5 + (1 - offset)).to(dtype).requires_grad_()
        residual = torch.randn_like(x, requires_grad=True) if with_residual else None
        out = rms_norm(x, weight, eps, offset=offset, casting=casting, residual=residual)
        y, summed = out if with_residual else (out, None)
        y_ref, summed_ref = _reference(x.detach(), weight.detach(), eps, offset, casting,
                                       residual.detach() if with_residual else None)
        assert y.dtype == dtype
        torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
        dy = torch.randn_like(y)
        inputs, outputs, grads = [x, weight], [y], [dy]
        if with_residual:
            torch.testing.assert_close(summed, summed_ref, atol=0, rtol=0)  # one rounding, as torch's add
            dsum = torch.randn_like(summed)
            inputs.append(residual)
            outputs.append(summed)
            grads.append(dsum)
        got = torch.autograd.grad(outputs, inputs, grads)
        expected = _reference_grads(x, weight, residual, eps, offset, dy, dsum if with_residual else None)
        for name, g, e in zip(["dx", "dweight", "dresidual"], got, expected):
            scale = e.abs().max().item()  # dW sums `rows` terms: compare relative to its magnitude
            torch.testing.assert_close(g.double(), e, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_no_casting_rounds_every_step_like_plain_torch(device, dtype):
    """casting="none" against the same steps in float64, each rounded to the dtype (bitwise on CPU; on a GPU the
    kernel's approximate rsqrt and the order of its sum of squares may move a rounding by one ulp), and against a
    module written in plain torch in the input's dtype (whose CPU rsqrt is itself off by an ulp in a few cases of
    10^4)."""
    rows, hidden = (7, 300) if device.type == "cpu" else (16384, 3584)
    x = torch.randn(rows, hidden, device=device, dtype=dtype) * 3
    weight = (torch.randn(hidden, device=device) * 0.5 + 1).to(dtype)
    y = rms_norm(x, weight, 1e-6, casting="none")
    ulp = 2.0 ** (-10 if dtype == torch.float16 else -7)
    rtol = 0 if device.type == "cpu" else 2 * ulp
    torch.testing.assert_close(y.double(), _in_dtype(x, weight, 1e-6, 0.0), atol=0, rtol=rtol)
    plain = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(y, plain, atol=0, rtol=2 * ulp)


def test_backward_row_blocks_spread_unevenly_over_programs(device):
    """The persistent backward walks several row blocks per program and loads the next block early: programs with
    unequal work, a partly filled last block and fewer rows than programs must still count every row once."""
    if device.type == "cpu":
        sizes = [(1, 1100), (3, 1100), (37, 1100), (9, 2100)]  # up to 4 programs, 2-row blocks
    else:
        sizes = [(1, 3584), (300, 3584), (5001, 4608), (777, 1152)]
    for rows, hidden in sizes:
        x = torch.randn(rows, hidden, device=device, requires_grad=True)
        residual = torch.randn_like(x, requires_grad=True)
        weight = torch.randn(hidden, device=device, requires_grad=True)
        y, summed = rms_norm(x, weight, 1e-5, residual=residual)
        dy, dsum = torch.randn_like(y), torch.randn_like(summed)
        got = torch.autograd.grad((y, summed), (x, weight, residual), (dy, dsum))
        expected = _reference_grads(x, weight, residual, 1e-5, 0.0, dy, dsum)
        for name, g, e in zip(["dx", "dweight", "dresidual"], got, expected):
            torch.testing.assert_close(g.double(), e, atol=2e-5 * e.abs().max().item(), rtol=2e-5,
                                       msg=lambda m: f"{name} at {rows} x {hidden}: {m}")


def test_deterministic_mode_sums_dw_in_a_fixed_order(device):
    """By default dW partials meet through fp32 atomics (one launch); under torch.use_deterministic_algorithms
    they are summed by a second kernel in a fixed order: bitwise repeatable, and equal to the atomic sum up to
    fp32 reassociation."""
    rows, hidden = (37, 1100) if device.type == "cpu" else (8192, 1152)
    x = torch.randn(rows, hidden, device=device, requires_grad=True)
    weight = torch.randn(hidden, device=device, requires_grad=True)
    dy = torch.randn(rows, hidden, device=device)

    def grads():
        return torch.autograd.grad(rms_norm(x, weight, 1e-6), (x, weight), dy)

    atomic_dx, atomic_dw = grads()
    for _ in range(1 if device.type == "cpu" else 50):  # a lost add or an early read would show as a jump
        torch.testing.assert_close(grads()[1], atomic_dw, atol=1e-5 * atomic_dw.abs().max().item(), rtol=1e-5)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = grads(), grads()
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    torch.testing.assert_close(first[0], atomic_dx, atol=0, rtol=0)  # dx never goes through the atomics
    torch.testing.assert_close(first[1], atomic_dw, atol=1e-5 * atomic_dw.abs().max().item(), rtol=1e-5)
    expected = _reference_grads(x, weight, None, 1e-6, 0.0, dy, None)
    torch.testing.assert_close(atomic_dw.double(), expected[1], atol=2e-5 * expected[1].abs().max().item(),
                               rtol=2e-5)


def test_mixed_precision_weight_and_broadcast_shapes(device):
    """fp32 weight with bf16 activations (autocast training) and a 3-D input: output keeps x's dtype and shape."""
    x = torch.randn(2, 3, 40, device=device, dtype=torch.bfloat16)
    weight = torch.randn(40, device=device, dtype=torch.float32)
    y = rms_norm(x, weight, 1e-6)
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    y_ref, _ = _reference(x, weight, 1e-6, 0.0, "llama")
    torch.testing.assert_close(y.double(), y_ref, atol=3e-2, rtol=2e-2)


def test_matches_hf_modules(device):
    """Same state-dict key and results as HF's Qwen2RMSNorm (llama casting) and GemmaRMSNorm (1 + w, fp32)."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    hidden = 96
    assert RMSNorm(hidden, eps=1e-5).variance_epsilon == Qwen2RMSNorm(hidden, eps=1e-5).variance_epsilon
    x = torch.randn(6, hidden, device=device, dtype=torch.bfloat16)
    for hf, ours in [(Qwen2RMSNorm(hidden, eps=1e-6), RMSNorm(hidden, eps=1e-6)),
                     (GemmaRMSNorm(hidden, eps=1e-6), RMSNorm(hidden, eps=1e-6, offset=1.0, casting="gemma"))]:
        ours = ours.to(device)
        xf = x.float()
        torch.testing.assert_close(ours(xf), xf * torch.rsqrt(xf.pow(2).mean(-1, True) + 1e-6))  # starts at scale 1
        with torch.no_grad():
            hf.weight.normal_()
        hf = hf.to(device=device, dtype=torch.bfloat16)
        ours = ours.to(dtype=torch.bfloat16)
        ours.load_state_dict(hf.state_dict())
        torch.testing.assert_close(ours(x), hf(x), atol=1.6e-2, rtol=1.6e-2)


def test_nan_propagates_and_stays_in_its_row(device):
    x = torch.randn(4, 50, device=device, requires_grad=True)
    residual = torch.randn(4, 50, device=device)
    weight = torch.randn(50, device=device, requires_grad=True)
    with torch.no_grad():
        x[1, 7] = float("nan")
    y, summed = rms_norm(x, weight, residual=residual)
    assert torch.isnan(y[1]).all() and torch.isnan(summed[1, 7])
    assert torch.isfinite(y[[0, 2, 3]]).all()
    dx, dweight = torch.autograd.grad(y, (x, weight), torch.randn_like(y))
    assert torch.isnan(dx[1]).all() and torch.isfinite(dx[[0, 2, 3]]).all()
    assert torch.isnan(dweight).all()


def test_gradient_output_is_never_overwritten(device):
    """dy may be shared with other branches of the graph (a known source of corrupted gradients elsewhere)."""
    x = torch.randn(5, 64, device=device, requires_grad=True)
    residual = torch.randn(5, 64, device=device, requires_grad=True)
    weight = torch.randn(64, device=device, requires_grad=True)
    y, summed = rms_norm(x, weight, residual=residual)
    dy, dsum = torch.randn_like(y), torch.randn_like(summed)
    dy_copy, dsum_copy = dy.clone(), dsum.clone()
    dx, dres = torch.autograd.grad((y, summed), (x, residual), (dy, dsum))
    assert torch.equal(dy, dy_copy) and torch.equal(dsum, dsum_copy)
    torch.testing.assert_close(dx, dres, atol=0, rtol=0)
    # Shared gradient through a second consumer of y: each path must see the untouched upstream gradient.
    x.grad = None
    y = rms_norm(x, weight)
    (y * 2 + y).sum().backward()
    expected = _reference_grads(x, weight, None, 1e-6, 0.0, torch.full_like(y, 3.0), None)[0]
    torch.testing.assert_close(x.grad.double(), expected, atol=2e-5, rtol=2e-5)


def test_in_place_residual(device):
    x = torch.randn(3, 45, device=device, requires_grad=True)
    weight = torch.randn(45, device=device, requires_grad=True)
    base = torch.randn(3, 45, device=device, requires_grad=True)
    dy, dsum = torch.randn(3, 45, device=device), torch.randn(3, 45, device=device)
    y_ref, sum_ref = rms_norm(x, weight, residual=base * 1.0)
    grads_ref = torch.autograd.grad((y_ref, sum_ref), (x, weight, base), (dy, dsum))
    residual = base * 1.0  # a non-leaf stream tensor, as in a decoder
    y, summed = rms_norm(x, weight, residual=residual, in_place=True)
    assert summed is residual and summed.data_ptr() == residual.data_ptr()
    torch.testing.assert_close(summed, sum_ref, atol=0, rtol=0)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    for got, expected in zip(torch.autograd.grad((y, summed), (x, weight, base), (dy, dsum)), grads_ref):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    # Unsafe case: another op saved the old residual for its backward; autograd must refuse, not corrupt.
    residual = base * 1.0
    squared = residual * residual
    rms_norm(x, weight, residual=residual, in_place=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        squared.sum().backward()
    with pytest.raises(RuntimeError, match="leaf Variable"):
        rms_norm(x, weight, residual=base, in_place=True)


def test_bad_input_raises_clear_errors(device):
    x = torch.randn(4, 32, device=device)
    weight = torch.ones(32, device=device)
    with pytest.raises(TypeError, match="x has dtype torch.float64"):
        rms_norm(x.double(), weight)
    with pytest.raises(TypeError, match="weight has dtype torch.int64"):
        rms_norm(x, weight.long())
    with pytest.raises(ValueError, match="does not match the last dimension"):
        rms_norm(x, torch.ones(31, device=device))
    with pytest.raises(ValueError, match="hidden size 0 is outside the supported range"):
        rms_norm(x[:, :0], weight[:0])
    with pytest.raises(ValueError, match="residual"):
        rms_norm(x, weight, residual=torch.randn(4, 31, device=device))
    with pytest.raises(TypeError, match="residual has dtype"):
        rms_norm(x, weight, residual=x.half())
    with pytest.raises(ValueError, match="casting"):
        rms_norm(x, weight, casting="t5")
    with pytest.raises(ValueError, match="in_place=True needs a residual"):
        rms_norm(x, weight, in_place=True)
    with pytest.raises(ValueError, match="x is on meta"):
        rms_norm(torch.empty(4, 32, device="meta"), weight)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        rms_norm([1.0, 2.0], weight)
    with pytest.raises(ValueError, match="casting"):
        RMSNorm(32, casting="other")
