"""Linear + cross-entropy forward + backward (dx, dW): ours against eager, Liger, Cut-Cross-Entropy and torch's.

Every provider runs the same closure: loss, then torch.autograd.grad for x and W, so the peak extra memory
counts each provider's gradients (bf16 dW + dx) plus its workspace the same way. Hidden states come in two
kinds: "trained" (RMS-normalised features times a learned-like gain, pulled towards the target's embedding so
the loss is about 2 nats and the softmax is peaked, as after training) and "randn" (N(0, 1), a flat softmax).
Cut-CE's default mode skips gradient blocks whose probabilities are all tiny, so its speed depends on the data;
`cce_exact` (filter_eps=None) and ours compute the exact gradient. LCE_SWEEP=1 adds our chunk-size variants;
CCE_AUTOTUNE=1 (read by Cut-CE at import) lets Cut-CE autotune its kernels, recorded as `cce*_autotuned`.
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
             "ours_weight_dtype": lambda x, w, y: linear_cross_entropy(x, w, y, dw_accumulation="weight_dtype"),
             "ours_per_vocab_chunk": lambda x, w, y: linear_cross_entropy(x, w, y,
                                                                          dw_accumulation="per_vocab_chunk")}
    if SWEEP:
        for chunk in (2048, 8192):
            table[f"ours_fp32_chunk{chunk}"] = (
                lambda x, w, y, c=chunk: linear_cross_entropy(x, w, y, chunk_size=c))
        for chunk in (2048, 8192):
            table[f"ours_per_vocab_chunk{chunk}"] = (
                lambda x, w, y, c=chunk: linear_cross_entropy(x, w, y, dw_accumulation="per_vocab_chunk",
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
CASES = [(tokens, "trained") for tokens in TOKENS] + [(TOKENS[0], "randn")]


@pytest.mark.parametrize("tokens, kind", CASES, ids=[f"{t}-{k}" for t, k in CASES])
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_linear_cross_entropy_fwd_bwd(measure, provider, tokens, kind):
    if provider == "eager" and tokens > 8192:
        pytest.skip("eager materialises 30 GB of logits and their gradient at this size")
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
        torch.autograd.grad(loss, (x, weight))

    with torch.no_grad():
        mean_loss = float(linear_cross_entropy(x, weight, target))
    measure("linear_cross_entropy.fwd_bwd", provider, fwd_bwd, dtype=torch.bfloat16,
            shape=dict(tokens=tokens, hidden=hidden, vocab=vocab, data=kind),
            flops=3 * 2 * tokens * hidden * vocab, note=f"mean loss {mean_loss:.2f} nats; flops = 3 GEMMs")


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
