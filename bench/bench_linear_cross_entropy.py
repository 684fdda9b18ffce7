"""Linear + cross-entropy forward + backward (dx, dW): ours against eager, Liger, Cut-Cross-Entropy and torch's.

Every provider runs the same closure: loss, then torch.autograd.grad for x and W, so the peak extra memory
counts each provider's gradients (bf16 dW + dx) plus its workspace the same way. Hidden states come in two
kinds: "trained" (RMS-normalised features times a learned-like gain, pulled towards the target's embedding so
the loss is about 2 nats and the softmax is peaked, as after training) and "randn" (N(0, 1), a flat softmax).
Cut-CE's default mode skips gradient blocks whose probabilities are all tiny, so its speed depends on the data;
`cce_exact` (filter_eps=None) and ours compute the exact gradient. LCE_SWEEP=1 adds our chunk-size variants;
CCE_AUTOTUNE=1 (read by Cut-CE at import) lets Cut-CE autotune its kernels, recorded as `cce*_autotuned`.
On the trained-like data each provider's dx and dW are also checked against float64 (the mean loss's exact
gradient, computed a block of tokens at a time): `rel_error` holds |got - ref|_F / |ref|_F for each. The GEMM
floor (test_three_gemm_floor) is the three cuBLAS GEMMs alone, measured in the same run. Eager at 32K tokens
needs about 70 GB for its logits and their gradients: where the card has less it is skipped with the reason.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from bench.harness import ON_GPU
from bench.shapes import MODELS, token_counts
from longvl.kernels.linear_cross_entropy import linear_cross_entropy

SHAPE = MODELS["qwen2.5-7b"] if ON_GPU else dict(hidden=32, vocab=101)
TOKENS = token_counts(8192, 32768) if ON_GPU else [24]
SWEEP = os.environ.get("LCE_SWEEP", "0") == "1"
CCE_TAG = "_autotuned" if os.environ.get("CCE_AUTOTUNE", "0") != "0" else ""


def hidden_states(kind, tokens, hidden, vocab, device):
    """Hidden states, lm-head weight (N(0, 0.02)) and targets of the given kind."""
    weight = torch.randn(vocab, hidden, device=device) * 0.02
    target = torch.randint(0, vocab, (tokens,), device=device)
    if kind == "randn":
        x = torch.randn(tokens, hidden, device=device)
    else:
        gain = 1.0 + 0.5 * torch.randn(hidden, device=device).abs()
        features = torch.randn(tokens, hidden, device=device)
        features = features * torch.rsqrt(features.pow(2).mean(-1, keepdim=True)) * gain
        pull = weight[target] / weight[target].norm(dim=-1, keepdim=True)
        strength = 10.0 + 3.0 * torch.randn(tokens, 1, device=device)
        x = features + strength * pull
    target[torch.rand(tokens, device=device) < 0.05] = -100
    return x.bfloat16(), weight.bfloat16(), target


def providers():
    """name -> loss(x, weight, target), for every provider installed here."""
    table = {"ours": lambda x, w, y: linear_cross_entropy(x, w, y),
             "ours_weight_dtype": lambda x, w, y: linear_cross_entropy(x, w, y, dw_dtype="weight"),
             "ours_weight_dtype_chunk512": lambda x, w, y: linear_cross_entropy(x, w, y, dw_dtype="weight",
                                                                                chunk_size=512),
             "ours_per_vocab_chunk": lambda x, w, y: linear_cross_entropy(x, w, y,
                                                                          chunking="vocab")}
    if SWEEP:
        for chunk in (2048, 8192):
            table[f"ours_fp32_chunk{chunk}"] = (
                lambda x, w, y, c=chunk: linear_cross_entropy(x, w, y, chunk_size=c))
        for chunk in (2048, 8192):
            table[f"ours_per_vocab_chunk{chunk}"] = (
                lambda x, w, y, c=chunk: linear_cross_entropy(x, w, y, chunking="vocab",
                                                              chunk_size=c))
    table["eager"] = lambda x, w, y: F.cross_entropy(F.linear(x, w).float(), y)
    if hasattr(F, "linear_cross_entropy"):
        table["torch"] = lambda x, w, y: F.linear_cross_entropy(x, w, y)
    if ON_GPU:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            liger, liger_fp32 = LigerFusedLinearCrossEntropyLoss(), LigerFusedLinearCrossEntropyLoss(
                accum_dtype=torch.float32)
            table["liger"] = lambda x, w, y: liger(w, x, y)
            table["liger_fp32_accum"] = lambda x, w, y: liger_fp32(w, x, y)
        except ImportError:
            pass
        try:
            from cut_cross_entropy import linear_cross_entropy as cce_lce

            table[f"cce{CCE_TAG}"] = lambda x, w, y: cce_lce(x, w, y)
            table[f"cce_exact{CCE_TAG}"] = lambda x, w, y: cce_lce(x, w, y, filter_eps=None)
        except ImportError:
            pass
    return table


PROVIDERS = providers()
_REFERENCE_ROWS = 1024  # tokens per block of the float64 reference
_REFERENCES = {}


def fp64_gradients(x, weight, target):
    """dx and dW of the mean cross-entropy (ignore_index -100) in float64, kept on the CPU."""
    w64 = weight.detach().double()
    valid = target != -100
    count = valid.sum().clamp(min=1)
    dx = torch.empty(x.shape, dtype=torch.float64, device=x.device)
    dw = torch.zeros_like(w64)
    for start in range(0, x.shape[0], _REFERENCE_ROWS):
        part = slice(start, start + _REFERENCE_ROWS)
        x64 = x[part].detach().double()
        grad = torch.softmax(x64 @ w64.t(), dim=-1)
        rows = valid[part].nonzero().squeeze(1)
        grad[rows, target[part][rows]] -= 1.0
        grad *= (valid[part].double() / count)[:, None]
        dx[part] = grad @ w64
        dw.addmm_(grad.t(), x64)
        del grad
    return dx.cpu(), dw.cpu()


def relative_error(got, want, rows=8192):
    """|got - want|_F / |want|_F, a block of rows at a time (want is float64 on the CPU)."""
    diff = norm = 0.0
    for start in range(0, want.shape[0], rows):
        ref = want[start:start + rows].to(got.device)
        diff += float((got[start:start + rows].double() - ref).pow(2).sum())
        norm += float(ref.pow(2).sum())
    return (diff / norm) ** 0.5


def gradient_errors(fwd_bwd, case, x, weight, target):
    """The provider's dx and dW against the float64 reference of `case` (computed once per case)."""
    if case not in _REFERENCES:
        _REFERENCES[case] = fp64_gradients(x, weight, target)
    dx, dw = fwd_bwd()
    errors = {"dx": relative_error(dx, _REFERENCES[case][0]), "dw": relative_error(dw, _REFERENCES[case][1])}
    del dx, dw
    if ON_GPU:
        torch.cuda.empty_cache()
    return errors


CASES = [(tokens, "trained") for tokens in TOKENS] + [(TOKENS[0], "randn")]


@pytest.mark.parametrize("tokens, kind", CASES, ids=[f"{t}-{k}" for t, k in CASES])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_linear_cross_entropy_fwd_bwd(measure, provider, tokens, kind):
    if kind == "randn" and provider not in ("ours", "ours_per_vocab_chunk", "cce", "cce_exact", "liger"):
        pytest.skip("the data-dependence check covers ours and the fused peers")
    device = "cuda" if ON_GPU else "cpu"
    hidden, vocab = SHAPE["hidden"], SHAPE["vocab"]
    torch.manual_seed(0)
    x, weight, target = hidden_states(kind, tokens, hidden, vocab, device)
    x.requires_grad_()
    weight.requires_grad_()
    loss_fn = PROVIDERS[provider]

    def fwd_bwd():
        loss = loss_fn(x, weight, target)
        return torch.autograd.grad(loss, (x, weight))

    with torch.no_grad():
        mean_loss = float(linear_cross_entropy(x, weight, target))
    try:
        errors = gradient_errors(fwd_bwd, (tokens, kind), x, weight, target) if kind == "trained" else None
        measure("linear_cross_entropy.fwd_bwd", provider, fwd_bwd, dtype=torch.bfloat16,
                shape=dict(tokens=tokens, hidden=hidden, vocab=vocab, data=kind),
                flops=3 * 2 * tokens * hidden * vocab, note=f"mean loss {mean_loss:.2f} nats; flops = 3 GEMMs",
                rel_error=errors)
    except torch.OutOfMemoryError:
        if provider != "eager":
            raise
        pytest.skip(f"eager ran out of memory at {tokens} tokens (logits and their gradient in fp32)")


@pytest.mark.parametrize("tokens", TOKENS)
def test_three_gemm_floor(measure, tokens):
    """cuBLAS alone on the three GEMMs an exact fused op cannot avoid (logits, dx, dW): the speed floor."""
    device = "cuda" if ON_GPU else "cpu"
    hidden, vocab = SHAPE["hidden"], SHAPE["vocab"]
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    weight = torch.randn(vocab, hidden, device=device, dtype=torch.bfloat16)
    grad = torch.randn(tokens, vocab, device=device, dtype=torch.bfloat16)

    def three_gemms():
        x @ weight.t()
        grad @ weight
        grad.t() @ x

    measure("linear_cross_entropy.gemm_floor", "cublas_3_gemms", three_gemms, dtype=torch.bfloat16,
            shape=dict(tokens=tokens, hidden=hidden, vocab=vocab, data="trained"),
            flops=3 * 2 * tokens * hidden * vocab, memory=False, note="no softmax; inputs preallocated")
