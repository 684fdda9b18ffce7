"""Cross-entropy on given logits against torch's cross_entropy in float64: loss, per-token loss, lse, token
accuracy and the logit gradient, for every combination of reduction, ignore_index, label smoothing, z-loss,
softcap and class weights; fp32 softcap at Liger-Kernel's tolerances (atol 1e-8, rtol 1e-6), ties of the argmax,
bf16 logits, bad input.

On CPU the kernels run through Triton's interpreter at small sizes; the GPU tests run Qwen2.5-7B's vocabulary
(V = 152064) in bf16.
"""
import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F

from longvl.kernels.cross_entropy import CrossEntropy, cross_entropy

ce_module = importlib.import_module("longvl.kernels.cross_entropy")  # `longvl.kernels.cross_entropy` is the function


def reference(logits, target, class_weight=None, token_weight=None, *, ignore_index=-100, reduction="mean",
              label_smoothing=0.0, z_loss=0.0, softcap=None, temperature=1.0):
    """Float64 (loss, per-token loss, lse, token accuracy): torch's cross_entropy on the transformed logits (its
    own weighted mean when there are no token weights) plus the z-loss, mean over the non-ignored tokens.
    Differentiable with respect to `logits`. An all-ignored batch gives 0 (torch's mean would be NaN)."""
    z = logits.double() / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    weight = None if class_weight is None else class_weight.double()
    valid = target != ignore_index
    torch_options = dict(weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing)
    ce = F.cross_entropy(z, target, reduction="none", **torch_options)
    lse = z.logsumexp(-1)
    zl = torch.where(valid, z_loss * lse * lse, 0.0)
    token_weight = torch.ones_like(lse) if token_weight is None else token_weight.double()
    if reduction == "none":
        loss = token_weight * (ce + zl)
    elif reduction == "sum":
        loss = (token_weight * (ce + zl)).sum()
    elif not valid.any():
        loss = (z * 0).sum()
    else:
        if (token_weight == 1).all():
            ce_mean = F.cross_entropy(z, target, reduction="mean", **torch_options)
        else:
            denominator = valid.sum() if weight is None else weight[target[valid]].sum()
            ce_mean = (token_weight * ce).sum() / denominator
        loss = ce_mean + (token_weight * zl).sum() / valid.sum()
    accuracy = ((z.argmax(-1) == target) & valid).sum().double() / valid.sum().clamp(min=1)
    return loss, ce + zl, lse, accuracy


def make_logits(rows, vocab, device, dtype=torch.float32, scale=3.0, ignore_index=-100, ignore_fraction=0.25,
                argmax_fraction=0.33):
    """Random logits and targets, some ignored, some set to the row's argmax (so the token accuracy is far
    from 0)."""
    logits = (torch.randn(rows, vocab, device=device) * scale).to(dtype)
    target = torch.randint(0, vocab, (rows,), device=device)
    hit = torch.rand(rows, device=device) < argmax_fraction
    target = torch.where(hit, logits.float().argmax(-1), target)
    target[torch.rand(rows, device=device) < ignore_fraction] = ignore_index
    return logits, target


def run_both(logits, target, class_weight=None, grad_seed=None, **options):
    """Ours and the reference: (loss, per-token loss, lse, accuracy) and the logit gradients."""
    leaf = logits.detach().clone().requires_grad_()
    ref_leaf = logits.detach().clone().requires_grad_()
    ours = cross_entropy(leaf, target, class_weight, return_per_token=True, return_lse=True,
                         return_token_accuracy=True, **options)
    ref = reference(ref_leaf, target, class_weight, **options)
    seed = torch.randn_like(ref[0]) if grad_seed is None else grad_seed
    grad, = torch.autograd.grad(ours[0], leaf, seed.to(ours[0].dtype))
    ref_grad, = torch.autograd.grad(ref[0], ref_leaf, seed.double())
    return ours, ref, grad, ref_grad


def assert_close(got, want, atol, rtol, what):
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    torch.testing.assert_close(got.double(), want.detach().double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


OPTION_GRID = list(itertools.product(["mean", "sum", "none"], [-100, 3], [0.0, 0.1], [0.0, 1e-3], [None, 5.0],
                                     [False, True]))


@pytest.mark.parametrize("reduction, ignore_index, label_smoothing, z_loss, softcap, class_weights", OPTION_GRID,
                         ids=["-".join(map(str, case)) for case in OPTION_GRID])
def test_every_option_combination_matches_torch(device, reduction, ignore_index, label_smoothing, z_loss, softcap,
                                                class_weights):
    rows, vocab = (29, 37) if device.type == "cpu" else (1024, 32000)
    logits, target = make_logits(rows, vocab, device, ignore_index=ignore_index)
    class_weight = torch.rand(vocab, device=device) * 2 if class_weights else None
    ours, ref, grad, ref_grad = run_both(logits, target, class_weight, reduction=reduction,
                                         ignore_index=ignore_index, label_smoothing=label_smoothing,
                                         z_loss=z_loss, softcap=softcap)
    for what, got, want in zip(("loss", "per-token loss", "lse"), ours, ref):
        assert_close(got, want, 1e-5, 1e-5, what)
    assert ours[3].item() == pytest.approx(ref[3].item())
    assert_close(grad / ref_grad.abs().max(), ref_grad / ref_grad.abs().max(), 1e-6, 0, "d logits")


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("rows, vocab, scale, softcap", [(63, 41, 1.0, 30.0), (64, 1000, 1.0, 30.0),
                                                         (63, 41, 4.0, 5.0)])
def test_fp32_softcap_at_liger_tolerances(device, reduction, rows, vocab, scale, softcap):
    """atol 1e-8, rtol 1e-6 against float64 on the loss and every logit gradient (random logits and targets, as
    in Liger-Kernel's tests) with |z| << softcap and with a saturating softcap: tanh as 2 sigmoid(2u) - 1 and its
    slope as 1 - tanh^2 missed it by 2-4.5x (rounding of the order of tanh(u) itself, and of 1 - tanh^2 as
    tanh -> 1); plain torch fp32 meets it, and so do the math library's tanh and the slope of softcap_slope."""
    logits, target = make_logits(rows, vocab, device, scale=scale, ignore_fraction=0.0, argmax_fraction=0.0)
    seed = torch.ones(rows if reduction == "none" else (), device=device)
    ours, ref, grad, ref_grad = run_both(logits, target, grad_seed=seed, reduction=reduction, softcap=softcap)
    assert_close(ours[0], ref[0], 1e-8, 1e-6, "loss")
    assert_close(grad, ref_grad, 1e-8, 1e-6, "d logits")


def test_temperature_and_all_options_with_long_rows(device, monkeypatch):
    """Rows longer than a kernel block (statistics and gradient fold several blocks), temperature on top."""
    monkeypatch.setattr(ce_module, "STATS_BLOCK", 16)
    monkeypatch.setattr(ce_module, "GRAD_BLOCK", 32)
    logits, target = make_logits(17, 131, device)
    class_weight = torch.rand(131, device=device) + 0.5
    ours, ref, grad, ref_grad = run_both(logits, target, class_weight, label_smoothing=0.2, z_loss=1e-2,
                                         softcap=4.0, temperature=1.7)
    for what, got, want in zip(("loss", "per-token loss", "lse", "accuracy"), ours, ref):
        assert_close(got, want, 1e-5, 1e-5, what)
    assert_close(grad / ref_grad.abs().max(), ref_grad / ref_grad.abs().max(), 1e-6, 0, "d logits")


def test_token_accuracy_gives_ties_to_the_first_column(device, monkeypatch):
    """Tied maxima inside one block and across blocks: the prediction is the first tied column (torch.argmax),
    so a target tied with an earlier column counts as wrong, and an all -inf row predicts column 0."""
    monkeypatch.setattr(ce_module, "STATS_BLOCK", 8)
    monkeypatch.setattr(ce_module, "STATS_FEW_ROWS", 0)  # blocks of exactly 8 columns, as the rows below assume
    logits = torch.randn(6, 20, device=device)
    logits[0, [2, 5]] = 9.0  # tie inside the first block
    logits[1, [3, 13]] = 9.0  # tie across blocks
    logits[2, [4, 17]] = 9.0
    logits[3, 11] = 9.0  # a single maximum in a later block
    logits[4] = float("-inf")
    logits[5, [0, 19]] = 9.0
    target = torch.tensor([2, 13, 4, 11, 0, 19], device=device)
    expected = torch.tensor([True, False, True, True, True, False], device=device)
    assert torch.equal(logits.argmax(-1) == target, expected)
    accuracy = cross_entropy(logits, target, reduction="sum", return_token_accuracy=True)[1]
    assert accuracy.item() == pytest.approx(expected.float().mean().item())
    target[0] = -100
    accuracy = cross_entropy(logits, target, reduction="sum", return_token_accuracy=True)[1]
    assert accuracy.item() == pytest.approx(expected[1:].float().mean().item())


def test_bf16_logits(device):
    """bf16 logits: fp32 statistics, the gradient rounded to bf16 once (relative 2^-8 of the largest)."""
    logits, target = make_logits(*((19, 300) if device.type == "cpu" else (2048, 152064)), device,
                                 dtype=torch.bfloat16)
    class_weight = torch.rand(logits.shape[1], device=device) + 0.5
    ours, ref, grad, ref_grad = run_both(logits, target, class_weight, label_smoothing=0.1, z_loss=1e-4,
                                         softcap=30.0)
    assert grad.dtype == torch.bfloat16
    for what, got, want in zip(("loss", "per-token loss", "lse"), ours, ref):
        assert_close(got, want, 1e-4, 1e-4, what)
    assert_close(grad / ref_grad.abs().max(), ref_grad / ref_grad.abs().max(), 8e-3, 0, "d logits")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_and_empty_give_zero_loss_and_zero_grads(device, reduction):
    for rows in (5, 0):
        logits = torch.randn(rows, 11, device=device, requires_grad=True)
        target = torch.full((rows,), -100, device=device)
        loss, accuracy = cross_entropy(logits, target, torch.rand(11, device=device), reduction=reduction,
                                       z_loss=1e-3, label_smoothing=0.1, return_token_accuracy=True)
        loss.sum().backward()
        assert (loss == 0).all() and accuracy.item() == 0.0
        assert logits.grad.shape == logits.shape and (logits.grad == 0).all()


def test_module_shapes_strided_logits_and_inputs_untouched(device):
    """(B, S, V) logits viewed with a row stride (passed as they are), logits whose class dimension is strided
    (copied), the module form; the logits are never overwritten (Liger-Kernel stores the gradient in them)."""
    wide = torch.randn(2, 5, 23, device=device)
    transposed = torch.randn(19, 10, device=device).t()
    for logits in (wide[:, :, :19], transposed):
        before = logits.clone()
        target = torch.randint(0, 19, logits.shape[:-1], device=device)
        weight = torch.rand(19, device=device)
        module = CrossEntropy(weight, reduction="none", return_lse=True)
        leaf = logits.detach().requires_grad_()
        loss, lse = module(leaf, target)
        loss.sum().backward()
        ref_leaf = logits.detach().reshape(-1, 19).double().requires_grad_()
        ref = reference(ref_leaf, target.reshape(-1), weight, reduction="none")
        ref[0].sum().backward()
        assert loss.shape == lse.shape == target.shape and leaf.grad.shape == logits.shape
        assert_close(loss.reshape(-1), ref[0], 1e-5, 1e-5, "loss")
        assert_close(lse.reshape(-1), ref[2], 1e-5, 1e-5, "lse")
        assert_close(leaf.grad.reshape(-1, 19), ref_leaf.grad, 1e-6, 1e-5, "d logits")
        assert torch.equal(logits, before)
    assert "reduction='none'" in repr(module)


@pytest.mark.parametrize("bad, message", [
    (dict(target=torch.zeros(4, dtype=torch.int64)), "target must have shape"),
    (dict(target=torch.zeros(5)), "int64"),
    (dict(weight=torch.ones(36)), r"shape \(37,\)"),
    (dict(weight=torch.ones(37, dtype=torch.int64)), "floating"),
    (dict(reduction="avg"), "reduction"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(z_loss=-1.0), "z_loss"),
    (dict(softcap=0.0), "softcap"),
    (dict(temperature=0.0), "temperature"),
    (dict(logits=torch.zeros(5, 37, dtype=torch.float64)), "logits has dtype"),
], ids=["target_shape", "target_dtype", "weight_shape", "weight_dtype", "reduction", "smoothing", "z_loss",
        "softcap", "temperature", "logits_dtype"])
def test_bad_input_raises_clear_error(bad, message, device):
    args = dict(logits=torch.randn(5, 37), target=torch.zeros(5, dtype=torch.int64))
    args.update(bad)
    args = {k: v.to(device) if torch.is_tensor(v) else v for k, v in args.items()}
    with pytest.raises((ValueError, TypeError), match=message):
        cross_entropy(args.pop("logits"), args.pop("target"), **args)


def test_target_out_of_range_raises():
    """On CPU a clear error; on a GPU the check is a device-side assert (no host sync), which ends the process's
    CUDA context, so it is not tried in the test process there."""
    if torch.cuda.is_available():
        pytest.skip("a device-side assert would poison every later test in this process")
    with pytest.raises(RuntimeError, match="outside"):
        cross_entropy(torch.randn(3, 5), torch.tensor([0, 5, 1]))


def _reference_grad(logits, target, class_weight, ce_scale, z_scale, label_smoothing, z_loss, softcap):
    """Float64 d loss / d logits for loss = sum_t ce_scale_t ce_t + z_scale_t zl_t (the module docstring's
    reductions), ce_t by torch's cross_entropy."""
    leaf = logits.detach().double().requires_grad_()
    z = softcap * torch.tanh(leaf / softcap)
    ce = F.cross_entropy(z, target, weight=class_weight.double(), reduction="none", label_smoothing=label_smoothing)
    lse = z.logsumexp(-1)
    zl = torch.where(target != -100, z_loss * lse * lse, 0.0)
    grad, = torch.autograd.grad((ce_scale.double() * ce + z_scale.double() * zl).sum(), leaf)
    return grad


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_full_vocab_bf16_all_options_on_gpu(reduction):
    """Qwen2.5-7B's vocabulary, 4096 tokens of bf16 logits, class weights with every option: per-token loss,
    lse, accuracy and the gradient against float64, a row block at a time."""
    torch.manual_seed(0)
    rows, vocab, block = 4096, 152064, 256
    options = dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0)
    logits, target = make_logits(rows, vocab, "cuda", dtype=torch.bfloat16)
    class_weight = torch.rand(vocab, device="cuda") + 0.5
    leaf = logits.detach().clone().requires_grad_()
    loss, token_loss, lse, accuracy = cross_entropy(leaf, target, class_weight, reduction=reduction,
                                                    return_per_token=True, return_lse=True,
                                                    return_token_accuracy=True, **options)
    seed = torch.rand_like(loss)
    grad, = torch.autograd.grad(loss, leaf, seed)
    valid = target != -100
    ce_scale = z_scale = seed.expand(rows)
    if reduction == "mean":
        ce_scale, z_scale = ce_scale / class_weight[target[valid]].sum(), z_scale / valid.sum()
    worst = 0.0
    for i in range(0, rows, block):
        part = slice(i, i + block)
        ref = reference(logits[part], target[part], class_weight, reduction="none", **options)
        torch.testing.assert_close(token_loss[part].double(), ref[1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lse[part].double(), ref[2], rtol=1e-5, atol=1e-5)
        ref_grad = _reference_grad(logits[part], target[part], class_weight, ce_scale[part], z_scale[part],
                                   **options)
        worst = max(worst, ((grad[part].double() - ref_grad).abs().max() / ref_grad.abs().max()).item())
    assert worst < 8e-3
    ref_accuracy = ((logits.float().argmax(-1) == target) & valid).sum() / valid.sum()
    assert accuracy.item() == pytest.approx(ref_accuracy.item())
