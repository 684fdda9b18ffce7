"""Fused linear + cross-entropy against a float64 PyTorch reference: loss, per-token loss, lse, dx, dW, db.

On CPU the kernels run through Triton's interpreter at tiny vocab / hidden sizes (odd ones included); the GPU
tests run the real Qwen2.5-7B head (V = 152064, H = 3584) in bf16, and a CUDA-graph capture that fails if
anything in the op synchronises with the host.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from longvl.kernels.linear_cross_entropy import LinearCrossEntropy, linear_cross_entropy
from tests.test_cross_entropy import OPTION_GRID, reference as logits_reference

# The names `longvl.kernels.linear_cross_entropy` / `.cross_entropy` are the functions; these are the modules.
lce_module = importlib.import_module("longvl.kernels.linear_cross_entropy")
ce_module = importlib.import_module("longvl.kernels.cross_entropy")

STRATEGIES = [dict(chunking="tokens", dw_dtype="float32", chunk_size=16),
              dict(chunking="tokens", dw_dtype="weight", chunk_size=16), dict(chunking="vocab", chunk_size=48)]
STRATEGY_ID = lambda s: f"{s['chunking']}-{s.get('dw_dtype', 'float32')}"  # noqa: E731


def reference(x, weight, target, bias=None, *, weights=None, class_weight=None, **options):
    """Float64 (loss, per-token loss, lse, token accuracy) of the logits x W^T (+ b): torch's cross_entropy plus
    the z-loss (tests/test_cross_entropy.py), differentiable with respect to x, weight and bias."""
    logits = x.double() @ weight.double().t()
    if bias is not None:
        logits = logits + bias.double()
    flat = logits_reference(logits.reshape(-1, weight.shape[0]), target.reshape(-1), class_weight,
                            None if weights is None else weights.reshape(-1), **options)
    return [t if t.dim() == 0 else t.view(target.shape) for t in flat]


def make_inputs(lead, hidden, vocab, device, dtype=torch.float32, ignore_fraction=0.25, logit_scale=4.0):
    """Hidden states RMS-normalised then scaled, weights giving logits with a realistic spread; some ignored."""
    x = torch.randn(*lead, hidden, device=device)
    x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) * 2.0).to(dtype)
    weight = (torch.randn(vocab, hidden, device=device) * logit_scale / (2.0 * hidden ** 0.5)).to(dtype)
    target = torch.randint(0, vocab, lead, device=device)
    target[torch.rand(lead, device=device) < ignore_fraction] = -100
    return x, weight, target


def run_both(x, weight, target, bias=None, grad_scale=None, **opts):
    """Loss, extras and every gradient from ours and from the float64 reference."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    strategy = {k: opts.pop(k) for k in ("chunking", "dw_dtype", "chunk_size") if k in opts}
    ours = linear_cross_entropy(*leaves[:2], target, *leaves[2:], return_per_token=True, return_lse=True,
                                return_token_accuracy=True, **opts, **strategy)
    ref = reference(*ref_leaves[:2], target, *ref_leaves[2:], **opts)
    seed = grad_scale if grad_scale is not None else torch.ones_like(ref[0])
    ours[0].backward(seed.to(ours[0].dtype))
    ref[0].backward(seed.double())
    return ours, ref, [t.grad for t in leaves], [t.grad for t in ref_leaves]


def assert_matches(ours, ref, grads, ref_grads, loss_tol, grad_tol):
    for got, want in zip(ours, ref):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=loss_tol, atol=loss_tol)
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        want = want.double()
        scale = want.abs().max().clamp(min=1e-30)
        torch.testing.assert_close(got.double() / scale, want / scale, rtol=grad_tol, atol=grad_tol)


# fp32 on CPU: the kernels compute in fp32 throughout, so 1e-5 relative is the bar.
@pytest.mark.parametrize("strategy", STRATEGIES, ids=STRATEGY_ID)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_plain_and_reductions_match_float64(strategy, reduction, device):
    if device.type == "cuda":
        pytest.skip("CPU interpreter sizes; the GPU has its own tests below")
    x, weight, target = make_inputs((3, 7), 33, 101, device)
    seed = torch.randn(3, 7, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
    result = run_both(x, weight, target, grad_scale=seed, reduction=reduction, **strategy)
    assert_matches(*result, loss_tol=1e-5, grad_tol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=STRATEGY_ID)
@pytest.mark.parametrize("options", [
    dict(label_smoothing=0.1),
    dict(z_loss=1e-3),
    dict(softcap=5.0),
    dict(temperature=0.7),
    dict(ignore_index=3),
    dict(label_smoothing=0.2, z_loss=1e-2, softcap=3.0, temperature=1.3, reduction="sum"),
], ids=["smoothing", "z_loss", "softcap", "temperature", "ignore_index_3", "all"])
def test_options_match_float64(strategy, options, device):
    if device.type == "cuda":
        pytest.skip("CPU interpreter sizes")
    x, weight, target = make_inputs((29,), 16, 37, device)
    if options.get("ignore_index") == 3:
        target[target == -100] = 3
    bias = torch.randn(37) * 0.5
    weights = torch.rand(29) * 2
    assert_matches(*run_both(x, weight, target, bias, weights=weights, **options, **strategy),
                   loss_tol=1e-5, grad_tol=1e-5)


@pytest.mark.parametrize("reduction, ignore_index, label_smoothing, z_loss, softcap, class_weights", OPTION_GRID,
                         ids=["-".join(map(str, case)) for case in OPTION_GRID])
def test_every_option_combination_matches_torch(device, reduction, ignore_index, label_smoothing, z_loss, softcap,
                                                class_weights):
    """The default strategy under every combination of reduction, ignore_index, label smoothing, z-loss, softcap
    and class weights (with per-token weights on top), against torch's cross_entropy."""
    if device.type == "cuda":
        pytest.skip("CPU interpreter sizes; the GPU runs the options at full size below")
    x, weight, target = make_inputs((29,), 16, 37, device)
    if ignore_index == 3:
        target[target == -100] = 3
    options = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                   softcap=softcap, weights=torch.rand(29) * 2,
                   class_weight=torch.rand(37) * 2 if class_weights else None)
    seed = torch.randn(29, dtype=torch.float64) if reduction == "none" else None
    assert_matches(*run_both(x, weight, target, torch.randn(37) * 0.5, grad_scale=seed, dw_dtype="float32",
                             chunk_size=8, **options), loss_tol=1e-5, grad_tol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=STRATEGY_ID)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_class_weights_with_all_options_in_every_strategy(strategy, reduction, device):
    if device.type == "cuda":
        pytest.skip("CPU interpreter sizes")
    x, weight, target = make_inputs((31,), 16, 101, device)
    seed = torch.randn(31, dtype=torch.float64) if reduction == "none" else None
    assert_matches(*run_both(x, weight, target, grad_scale=seed, reduction=reduction, class_weight=torch.rand(101),
                             label_smoothing=0.1, z_loss=1e-3, softcap=5.0, temperature=0.8, **strategy),
                   loss_tol=1e-5, grad_tol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=STRATEGY_ID)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fp32_softcap_gradients_within_a_millionth(strategy, reduction, device):
    """fp32 with softcap, |z| << softcap: dx and dW within 2e-6 of their largest element against float64.
    Liger-Kernel's element-wise atol 1e-8, rtol 1e-6 is not meaningful for them: they are sums over the
    vocabulary or the tokens whose terms cancel, and torch's own fp32 eager missed it by up to 27x at these sizes
    (it is met on the logit gradients themselves: tests/test_cross_entropy.py)."""
    if device.type == "cuda":
        pytest.skip("CPU interpreter sizes")
    x, weight, target = make_inputs((63,), 32, 41, device, ignore_fraction=0.0)
    assert_matches(*run_both(x, weight, target, reduction=reduction, softcap=30.0, **strategy), loss_tol=1e-6,
                   grad_tol=2e-6)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=STRATEGY_ID)
def test_token_accuracy_gives_ties_to_the_first_column(strategy, device, monkeypatch):
    """Integer hidden states and weights make exact logits, so ties are exact: inside a statistics block, across
    blocks and (per_vocab_chunk) across vocabulary chunks, the first tied column is the prediction."""
    if device.type == "cuda":
        pytest.skip("CPU interpreter sizes")
    monkeypatch.setattr(ce_module, "STATS_BLOCK", 8)
    vocab = 60
    weight = torch.randint(-2, 3, (vocab, 4), device=device).float()
    weight[[2, 5, 9, 40, 50]] = torch.tensor([3.0, 3.0, 3.0, 3.0])  # the top logit of x = (1, 1, 1, 1)
    x = torch.ones(5, 4, device=device)
    target = torch.tensor([2, 5, 40, -100, 50], device=device)
    loss, accuracy = linear_cross_entropy(x, weight, target, return_token_accuracy=True, **strategy)
    assert accuracy.item() == pytest.approx(1 / 4)
    reference_accuracy = reference(x, weight, target)[3]
    assert accuracy.item() == pytest.approx(reference_accuracy.item())


def test_row_blocks_and_chunks_fold_like_one_pass(device, monkeypatch):
    """Rows longer than one kernel block, ragged last chunks of tokens and vocabulary, and chunks whose logits
    are computed a few rows at a time."""
    if device.type == "cuda":
        pytest.skip("CPU interpreter sizes")
    monkeypatch.setattr(ce_module, "GRAD_BLOCK", 16)
    monkeypatch.setattr(ce_module, "STATS_BLOCK", 8)
    monkeypatch.setattr(lce_module, "_LOGIT_ROWS", 2)
    x, weight, target = make_inputs((2, 11), 40, 131, device)
    for strategy in (dict(chunking="tokens", chunk_size=5), dict(chunking="vocab",
                                                                       chunk_size=50)):
        assert_matches(*run_both(x, weight, target, softcap=10.0, label_smoothing=0.05, **strategy),
                       loss_tol=1e-5, grad_tol=1e-5)


def test_minus_inf_logits_mask_vocabulary_entries(device, monkeypatch):
    """A bias of -inf masks vocabulary entries; whole blocks of -inf, first in the row, must not give NaN."""
    if device.type == "cuda":
        pytest.skip("CPU interpreter sizes")
    monkeypatch.setattr(ce_module, "STATS_BLOCK", 8)
    x, weight, target = make_inputs((13,), 24, 67, device)
    bias = torch.randn(67, device=device)
    bias[:20] = float("-inf")
    target = torch.where((target >= 0) & (target < 20), target + 20, target)
    for strategy in STRATEGIES:
        ours, ref, grads, ref_grads = run_both(x, weight, target, bias, **strategy)
        assert_matches(ours, ref, grads[:2], ref_grads[:2], loss_tol=1e-5, grad_tol=1e-5)
        assert torch.equal(grads[2][:20], torch.zeros(20, device=device))


# bf16 on CPU: logits and statistics stay fp32; the gradients are rounded to bf16 once (relative ~2^-8).
@pytest.mark.parametrize("strategy", STRATEGIES, ids=STRATEGY_ID)
def test_bf16_matches_float64(strategy, device, monkeypatch):
    """Also narrows the fp32 dW in place over several row blocks (the gradient aliases the fp32 buffer), and
    gathers bf16 gradients of several fp32 logit scratches per chunk."""
    if device.type == "cuda":
        pytest.skip("CPU interpreter sizes")
    monkeypatch.setattr(lce_module, "_NARROW_ROWS", 5)
    monkeypatch.setattr(lce_module, "_NARROW_BLOCK", 64)
    monkeypatch.setattr(lce_module, "_LOGIT_ROWS", 3)
    x, weight, target = make_inputs((31,), 40, 173, device, dtype=torch.bfloat16)
    bias = (torch.randn(173) * 0.3).to(torch.bfloat16)
    assert_matches(*run_both(x, weight, target, bias, z_loss=1e-4, **strategy), loss_tol=1e-4, grad_tol=1e-2)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=STRATEGY_ID)
@pytest.mark.parametrize("tokens", [9, 0], ids=["all_ignored", "empty"])
def test_all_ignored_gives_zero_loss_and_zero_grads(strategy, tokens, device):
    x, weight, target = make_inputs((tokens,), 16, 37, device, ignore_fraction=1.0)
    x.requires_grad_()
    weight.requires_grad_()
    loss = linear_cross_entropy(x, weight, target, **strategy)
    loss.backward()
    assert loss.item() == 0.0
    assert (x.grad == 0).all() and (weight.grad == 0).all()


def test_tied_embedding_accumulates_both_gradients(device):
    """W shared with the input embedding: dW is the sum of the embedding's and the head's gradients."""
    vocab, hidden = 53, 24
    weight = (torch.randn(vocab, hidden, device=device) * 0.3).requires_grad_()
    ref_weight = weight.detach().clone().requires_grad_()
    tokens = torch.randint(0, vocab, (2, 9), device=device)
    target = torch.randint(0, vocab, (2, 9), device=device)
    loss = linear_cross_entropy(F.embedding(tokens, weight) * 1.5, weight, target, chunk_size=7)
    ref = reference(F.embedding(tokens, ref_weight) * 1.5, ref_weight, target)[0]
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, ref_weight.grad, rtol=1e-5, atol=1e-6)


def test_module_and_return_order(device):
    x, weight, target = make_inputs((13,), 16, 37, device)
    module = LinearCrossEntropy(reduction="sum", return_lse=True, label_smoothing=0.1)
    loss, lse = module(x, weight, target)
    ref_loss, _, ref_lse, _ = reference(x, weight, target, reduction="sum", label_smoothing=0.1)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    assert "reduction='sum'" in repr(module)
    per_token = linear_cross_entropy(x, weight, target, return_per_token=True)[1]
    assert per_token.shape == target.shape and (per_token[target == -100] == 0).all()


@pytest.mark.parametrize("bad, message", [
    (dict(target=torch.zeros(4, dtype=torch.int64)), "target must have shape"),
    (dict(target=torch.zeros(5)), "int64"),
    (dict(weight=torch.randn(37, 15)), "agree on H"),
    (dict(reduction="avg"), "reduction"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(temperature=0.0), "temperature"),
    (dict(softcap=-1.0), "softcap"),
    (dict(dw_dtype="bf16"), "dw_dtype"),
    (dict(chunking="rows"), "chunking"),
    (dict(chunking="vocab", dw_dtype="weight"), "dw_dtype must be 'float32'"),
    (dict(weights=torch.ones(4)), "weights"),
    (dict(bias=torch.zeros(36)), "bias"),
], ids=["target_shape", "target_dtype", "hidden", "reduction", "smoothing", "temperature", "softcap",
        "dw_dtype", "chunking", "vocab_needs_float32", "weights", "bias"])
def test_bad_input_raises_clear_error(bad, message):
    args = dict(x=torch.randn(5, 16), weight=torch.randn(37, 16), target=torch.zeros(5, dtype=torch.int64))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=message):
        linear_cross_entropy(args.pop("x"), args.pop("weight"), args.pop("target"), args.pop("bias", None), **args)


def test_second_backward_raises_instead_of_rescaling_consumed_gradients(device):
    x = torch.randn(6, 16, device=device, requires_grad=True)
    loss = linear_cross_entropy(x, torch.randn(37, 16, device=device), torch.randint(0, 37, (6,), device=device))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_target_out_of_range_raises():
    with pytest.raises(RuntimeError, match="outside"):
        linear_cross_entropy(torch.randn(3, 8), torch.randn(5, 8), torch.tensor([0, 5, 1]))


def _chunked_reference(x, weight, target, rows=1024, **opts):
    """Float32-logit reference for full-size shapes, in row chunks so it fits next to the op."""
    parts = [reference(x[i:i + rows].float(), weight.float(), target[i:i + rows], reduction="none", **opts)[:3]
             for i in range(0, x.shape[0], rows)]
    return [torch.cat(p) for p in zip(*parts)]


@pytest.mark.gpu
@pytest.mark.parametrize("setting", [dict(dw_dtype="float32"), dict(dw_dtype="weight"), dict(chunking="vocab")],
                         ids=["tokens-float32", "tokens-weight", "vocab"])
@pytest.mark.parametrize("vocab", [152064, 151937])
def test_full_size_bf16_on_gpu(setting, vocab):
    """Qwen2.5-7B head at full vocab (and an odd one), bf16: loss, lse, dx and dW against fp32-logit autograd."""
    torch.manual_seed(0)
    hidden, tokens = 3584, 1024
    x, weight, target = make_inputs((tokens,), hidden, vocab, "cuda", dtype=torch.bfloat16)
    x.requires_grad_()
    weight.requires_grad_()
    loss, token_loss, lse = linear_cross_entropy(x, weight, target, return_per_token=True, return_lse=True,
                                                 softcap=30.0, **setting)
    dx, dw = torch.autograd.grad(loss, (x, weight))
    xf, wf = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref_tokens, _, ref_lse = _chunked_reference(xf, wf, target, softcap=30.0)
    ref_loss = ref_tokens.sum() / (target != -100).sum()
    ref_dx, ref_dw = torch.autograd.grad(ref_loss, (xf, wf))
    torch.testing.assert_close(loss.float(), ref_loss.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse, ref_lse.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(token_loss, ref_tokens.float(), rtol=1e-3, atol=1e-3)
    for got, want in ((dx, ref_dx), (dw, ref_dw)):
        assert_bf16_gradient_close(got, want)
    assert weight.grad is None and dw.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("setting", [dict(dw_dtype="float32"), dict(dw_dtype="weight"), dict(chunking="vocab")],
                         ids=["tokens-float32", "tokens-weight", "vocab"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_full_size_all_options_on_gpu(setting, reduction):
    """Qwen2.5-7B head in bf16 with class weights, per-token weights, label smoothing, z-loss and softcap: loss,
    per-token loss, lse, token accuracy, dx and dW against float64."""
    torch.manual_seed(0)
    hidden, vocab, tokens = 3584, 152064, 1024
    x, weight, target = make_inputs((tokens,), hidden, vocab, "cuda", dtype=torch.bfloat16)
    options = dict(reduction=reduction, weights=torch.rand(tokens, device="cuda") + 0.5,
                   class_weight=torch.rand(vocab, device="cuda") + 0.5, label_smoothing=0.1, z_loss=1e-4,
                   softcap=30.0)
    x.requires_grad_()
    weight.requires_grad_()
    loss, token_loss, lse, accuracy = linear_cross_entropy(
        x, weight, target, return_per_token=True, return_lse=True, return_token_accuracy=True,
        **setting, **options)
    seed = torch.rand_like(loss)
    dx, dw = torch.autograd.grad(loss, (x, weight), seed)
    x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref_loss, ref_tokens, ref_lse, ref_accuracy = reference(x64, w64, target, **options)
    ref_dx, ref_dw = torch.autograd.grad(ref_loss, (x64, w64), seed.double())
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(token_loss.double(), ref_tokens.detach(), rtol=1e-3, atol=1e-3)
    assert accuracy.item() == pytest.approx(ref_accuracy.item(), abs=2 / tokens)  # a near-tie may flip in fp32
    for got, want in ((dx, ref_dx), (dw, ref_dw)):
        assert_bf16_gradient_close(got, want)


@pytest.mark.gpu
def test_lean_setting_keeps_only_the_gradients_and_one_logit_block_on_gpu():
    """weight_dtype with 512-token chunks writes the gradients over the fp32 logits: the peak beyond the inputs is
    dW and dx (bf16) and one 512 x V fp32 block, plus per-token statistics and cuBLAS workspace (64 MiB slack)."""
    hidden, vocab, tokens = 3584, 152064, 8192
    x, weight, target = make_inputs((tokens,), hidden, vocab, "cuda", dtype=torch.bfloat16)
    x.requires_grad_()
    weight.requires_grad_()

    def step():
        loss = linear_cross_entropy(x, weight, target, dw_dtype="weight", chunk_size=512)
        return torch.autograd.grad(loss, (x, weight))

    step()  # compile the kernels and allocate cuBLAS's workspace first
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    dx, dw = step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    bound = dw.numel() * 2 + dx.numel() * 2 + 512 * vocab * 4 + 64 * 2**20
    assert extra <= bound, f"{extra / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB"


def assert_bf16_gradient_close(got, want):
    """bf16 gradients of the logits feed the GEMMs: each element within 3 % of the largest, 1 % overall."""
    assert torch.isfinite(got).all()
    want = want.float()
    torch.testing.assert_close(got.float() / want.abs().max(), want / want.abs().max(), rtol=0, atol=3e-2)
    assert (got.float() - want).norm() <= 1e-2 * want.norm()


@pytest.mark.gpu
@pytest.mark.parametrize("setting", [dict(), dict(chunking="vocab")], ids=["tokens", "vocab"])
@pytest.mark.parametrize("vocab", [301, 32000])
def test_gradients_written_over_their_logits_are_repeatable(vocab, setting):
    """bf16 gradients overwrite the fp32 logits they come from (512 tokens or fewer in token chunks, always in
    vocabulary chunks), and a warp's stores land on logits another warp loads: the same call, repeated, must give
    bitwise the same gradients (a missing barrier made about one pack in ten differ on an H100)."""
    x, weight, target = make_inputs((512,), 512, vocab, "cuda", dtype=torch.bfloat16)
    x.requires_grad_()
    weight.requires_grad_()
    first = None
    for _ in range(30):
        grads = torch.autograd.grad(linear_cross_entropy(x, weight, target, **setting), (x, weight))
        if first is None:
            first = grads
        assert torch.equal(grads[0], first[0]) and torch.equal(grads[1], first[1])


@pytest.mark.gpu
@pytest.mark.parametrize("setting", [dict(dw_dtype="float32"), dict(dw_dtype="weight"), dict(chunking="vocab")],
                         ids=["tokens-float32", "tokens-weight", "vocab"])
def test_cuda_graph_capture_has_no_host_sync(setting):
    """Capturing forward + backward in a CUDA graph fails on any host synchronisation; replays are right.

    cuBLAS may pick other algorithms inside a capture, which flips the rounding of some bf16 logit gradients,
    so the replay is held to the same float32 reference and tolerance as eager bf16, not to eager bitwise.
    """
    x, weight, target = make_inputs((4096,), 512, 32000, "cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    x.requires_grad_()
    weight.requires_grad_()

    def step():
        loss = linear_cross_entropy(x, weight, target, label_smoothing=0.1, **setting)
        return (loss, *torch.autograd.grad(loss, (x, weight)))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compiles, capability probe) off the default stream
        eager = [t.detach() for t in step()]
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    xf, wf = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref_tokens = _chunked_reference(xf, wf, target, label_smoothing=0.1)[0]
    ref_loss = ref_tokens.sum() / (target != -100).sum()
    ref_dx, ref_dw = torch.autograd.grad(ref_loss, (xf, wf))
    for result in (eager, captured):
        torch.testing.assert_close(result[0].float(), ref_loss.float(), rtol=1e-4, atol=1e-4)
        assert_bf16_gradient_close(result[1], ref_dx)
        assert_bf16_gradient_close(result[2], ref_dw)
