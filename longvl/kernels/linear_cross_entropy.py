"""Fused linear + cross-entropy: loss = CE(x @ W^T [+ b], y) without materialising the (tokens x vocab) logits.

Logits are produced a few rows at a time by cuBLAS with fp32 output (`out_dtype=torch.float32`), reduced by two
row kernels (an online log-sum-exp pass and a gradient pass that writes d loss / d logits in the weight's
dtype) and fed straight to the gradient GEMMs, which also write fp32 and are rounded once. Two settings pick
one of three strategies: `chunking` ("tokens" or "vocab": which dimension the work is split along) and
`dw_dtype` ("float32" or "weight": the dtype dW is summed in across token chunks):

* chunking="tokens", dw_dtype="float32" (default, fastest): chunks of tokens with the whole vocabulary. Each token's full logit row is in
  memory at once, so the gradient is computed in the forward pass and costs 3 GEMMs in all. A chunk's logits
  are computed _LOGIT_ROWS tokens at a time into a small fp32 scratch; their gradients gather in a chunk-sized
  buffer of the weight's dtype, so the dX / dW GEMMs see a whole chunk (a long inner dimension for dW) while
  fp32 logits of only a few rows exist. dW is summed over chunks in an fp32 (vocab x hidden) buffer, narrowed
  in place at the end.
* chunking="tokens", dw_dtype="weight" (opt-in, Liger-Kernel's precision): as the default, but each chunk's dW GEMM adds straight into the
  gradient in the weight's dtype (fp32 inside the GEMM, one rounding per chunk), with 2048-token chunks: no fp32
  dW buffer (1.6 GiB less at Qwen2.5-7B's head) and somewhat slower than the default (bench/results). The rounding per
  chunk is the accuracy given up; use it where the head's memory decides the batch.
  With chunk_size <= _LOGIT_ROWS (512) the gradients are written over the fp32 logits themselves, so no chunk
  buffer exists beside the logit block: dw_dtype="weight" with chunk_size=512 holds dW and dx in the weight's
  dtype plus one 512 x V fp32 block (297 MiB at V = 152064), for a dW rounded once per 512 tokens. Measured on
  CPU (bf16, 8192 tokens, H = 128, V = 2048), the dW relative error against float64 is 4.9e-3 there, 3.0e-3
  with 2048-token chunks and 2.4e-3 for the default; dx is 2.9e-3 in every strategy.
* chunking="vocab" (least memory; dW is formed in fp32 inside one GEMM per slice, so dw_dtype must be "float32"): chunks of the vocabulary with all tokens. The forward pass keeps only the
  log-sum-exp; the backward pass recomputes each logit chunk and finishes that chunk's slice of dW in one
  GEMM over all tokens (fp32 accumulation inside cuBLAS, no dW buffer); dx is summed in fp32. 4 GEMMs instead
  of 3: slower than the default, at a fraction of its peak memory (bench/results/linear_cross_entropy_*.json).

By default dW is accumulated in fp32 (bf16 accumulation across chunks is a known cause of divergence); the
gradient is exact (no filtering of small probabilities), and nothing synchronises with the host, so forward
and backward can be captured in a CUDA graph.

The loss, its options (class weights, label smoothing, z-loss, softcap, temperature, reductions) and the token
accuracy are those of the row kernels it shares with `cross_entropy` (longvl/kernels/cross_entropy.py, whose
docstring has the formulas), with per-token weights w_t on top: "none" gives w_t * (ce_t + zl_t), "sum" their sum,
"mean" sum_t w_t ce_t / D + sum_t w_t zl_t / n. An all-ignored batch gives loss 0 and zero gradients.
"""
import dataclasses
import functools

import torch
import triton
import triton.language as tl

from longvl.kernels.cross_entropy import (LossOptions, RowStatistics, Targets, check_class_weight,
                                          check_loss_options, check_targets, reduce_loss, shape_outputs,
                                          write_logit_grad)

_DEFAULT_TOKEN_CHUNK = {"fp32": 4096, "weight_dtype": 2048}  # tokens per chunk of the token-chunk strategies
_TOKEN_CHUNK_STRATEGIES = ("fp32", "weight_dtype")
_LOGIT_ROWS = 512  # tokens whose fp32 logits exist at once in the token-chunk strategies
_VOCAB_CHUNK_BYTES = 128 * 2**20
_MIN_VOCAB_CHUNK = 1024
_NARROW_ROWS = 4096
_NARROW_BLOCK = 4096
_FALLBACK_ROWS = 16384


@dataclasses.dataclass(frozen=True)
class _Options(LossOptions):
    strategy: str   # "fp32", "weight_dtype" or "per_vocab_chunk" (from chunking and dw_dtype)
    chunk_size: int | None


@functools.cache
def _cuda_addmm_accumulates_in_fp32(device_index: int) -> bool:
    """Whether this torch's cuBLAS addmm takes an fp32 accumulator with bf16 factors (newer torch only)."""
    acc = torch.zeros(1, 1, device=f"cuda:{device_index}")
    factor = torch.ones(1, 1, device=acc.device, dtype=torch.bfloat16)
    try:
        torch.addmm(acc, factor, factor, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return True


def _logits_fp32(out, x, weight, bias):
    """out (fp32) = x @ weight^T (+ bias), accumulated and stored in fp32 whatever the input dtype."""
    _accumulate_fp32(out, x, weight.t(), overwrite=True)
    if bias is not None:
        out.add_(bias)


def _accumulate_fp32(acc, a, b, overwrite):
    """acc (fp32) += a @ b (or = a @ b when `overwrite`) with fp32 accumulation, in place where cuBLAS allows
    it, else in row blocks."""
    if not a.is_cuda or a.dtype == torch.float32:
        acc.addmm_(a.float(), b.float(), beta=0.0 if overwrite else 1.0)
    elif overwrite:
        torch.mm(a, b, out_dtype=torch.float32, out=acc)
    elif _cuda_addmm_accumulates_in_fp32(a.device.index or 0):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        for start in range(0, a.shape[0], _FALLBACK_ROWS):
            rows = slice(start, start + _FALLBACK_ROWS)
            acc[rows] += torch.mm(a[rows], b, out_dtype=torch.float32)


def _matmul_rounded_once(out, a, b):
    """out = a @ b, accumulated and reduced in fp32, rounded once to out's dtype.

    cuBLAS may reduce split-K partial sums in bf16 when a GEMM writes bf16 (torch allows it by default); an
    fp32 result rules that out.
    """
    if out.dtype == torch.float32:
        _accumulate_fp32(out, a, b, overwrite=True)
        return
    result = torch.empty(out.shape, device=out.device)
    _accumulate_fp32(result, a, b, overwrite=True)
    out.copy_(result)


def _grad_view(logits, dtype):
    """The gradient chunk, in `dtype`, laid over the first half (or all) of each fp32 logit row."""
    if dtype == torch.float32:
        return logits
    return logits.view(dtype)[:, : logits.shape[1]]


def _token_chunk_pass(x, weight, bias, targets, opts, want_grad, track_argmax=False):
    """Chunks of tokens x the whole vocabulary: the statistics and, when `want_grad`, every gradient (scaled by
    `targets`' row factors).

    Returns (statistics, dx, dW, db in fp32); dW is fp32 unless "weight_dtype" asks for the weight's dtype; the
    gradients are None without `want_grad`.
    """
    n_tokens, vocab = x.shape[0], weight.shape[0]
    chunk = (opts.chunk_size or _DEFAULT_TOKEN_CHUNK[opts.strategy]) if want_grad else _LOGIT_ROWS
    chunk = max(1, min(n_tokens, chunk))
    logit_rows = max(1, min(chunk, n_tokens, _LOGIT_ROWS))
    stats = RowStatistics(n_tokens, x.device, track_argmax)
    # Each gradient row is written over its own logits when the whole chunk's logits fit the scratch (or are fp32):
    # the fp32 logit buffer is then the gradient buffer too (bf16 gradients in the first half of each row).
    in_place = want_grad and (x.dtype == torch.float32 or chunk <= logit_rows)
    if in_place:
        scratch = torch.empty(chunk, vocab, device=x.device)
        grads = _grad_view(scratch, x.dtype)
    else:
        scratch = torch.empty(logit_rows, vocab, device=x.device)
        grads = torch.empty(chunk, vocab, device=x.device, dtype=x.dtype) if want_grad else None
    dx = torch.empty_like(x) if want_grad else None
    in_weight_dtype = opts.strategy == "weight_dtype"
    dw_dtype = weight.dtype if in_weight_dtype else torch.float32
    dw = torch.empty(weight.shape, device=x.device, dtype=dw_dtype) if want_grad else None
    if want_grad and n_tokens == 0:  # no chunk will overwrite it
        dw.zero_()
    db = torch.zeros(vocab, device=x.device) if want_grad and bias is not None else None
    for start in range(0, n_tokens, chunk):
        rows = slice(start, min(start + chunk, n_tokens))
        for first in range(rows.start, rows.stop, logit_rows):
            part = slice(first, min(first + logit_rows, rows.stop))
            in_chunk = slice(part.start - start, part.stop - start)
            logits = scratch[in_chunk] if in_place else scratch[: part.stop - part.start]
            _logits_fp32(logits, x[part], weight, bias)
            stats.fold(logits, part, targets, 0, opts)
            if want_grad:
                write_logit_grad(logits, grads[in_chunk], targets.rows(part), stats.lse(part.start, part.stop), 0,
                                 vocab, opts)
        if want_grad:
            grad = grads[: rows.stop - start]
            _matmul_rounded_once(dx[rows], grad, weight)
            if in_weight_dtype:
                dw.addmm_(grad.t(), x[rows], beta=0.0 if start == 0 else 1.0)
            else:
                _accumulate_fp32(dw, grad.t(), x[rows], overwrite=start == 0)
            if db is not None:
                db += grad.sum(0, dtype=torch.float32)
    return stats, dx, dw, db


def _vocab_chunk_width(n_tokens, vocab, opts):
    """Vocabulary rows per chunk: the given size, else the largest power of two keeping the fp32 logit chunk
    within _VOCAB_CHUNK_BYTES (at least _MIN_VOCAB_CHUNK columns, so the GEMMs stay efficient)."""
    if opts.chunk_size:
        return min(vocab, opts.chunk_size)
    fit = max(_MIN_VOCAB_CHUNK, _VOCAB_CHUNK_BYTES // (4 * max(n_tokens, 1)))
    return min(vocab, 1 << (fit.bit_length() - 1))


def _vocab_chunk_stats(x, weight, bias, targets, opts, track_argmax=False):
    """Chunks of the vocabulary x all tokens (in column order): the per-token statistics only."""
    n_tokens, vocab = x.shape[0], weight.shape[0]
    width = _vocab_chunk_width(n_tokens, vocab, opts)
    stats = RowStatistics(n_tokens, x.device, track_argmax)
    buffer = torch.empty(n_tokens * width, device=x.device)
    for first in range(0, vocab, width):
        cols = slice(first, min(first + width, vocab))
        logits = buffer[: n_tokens * (cols.stop - first)].view(n_tokens, cols.stop - first)
        _logits_fp32(logits, x, weight[cols], None if bias is None else bias[cols])
        stats.fold(logits, slice(None), targets, first, opts)
    return stats


def _vocab_chunk_grads(x, weight, bias, targets, lse, opts):
    """Recompute each vocabulary chunk's logits; finish its slice of dW (and db) in one GEMM over all tokens."""
    n_tokens, vocab = x.shape[0], weight.shape[0]
    width = _vocab_chunk_width(n_tokens, vocab, opts)
    buffer = torch.empty(n_tokens * width, device=x.device)
    dx = torch.empty(x.shape, device=x.device)
    dw = torch.empty_like(weight)
    db = torch.empty_like(bias) if bias is not None else None
    for first in range(0, vocab, width):
        cols = slice(first, min(first + width, vocab))
        logits = buffer[: n_tokens * (cols.stop - first)].view(n_tokens, cols.stop - first)
        _logits_fp32(logits, x, weight[cols], None if bias is None else bias[cols])
        grad = write_logit_grad(logits, _grad_view(logits, x.dtype), targets, lse, first, vocab, opts)
        _matmul_rounded_once(dw[cols], grad.t(), x)
        _accumulate_fp32(dx, grad, weight[cols], overwrite=first == 0)
        if db is not None:
            db[cols] = grad.sum(0, dtype=torch.float32)
    return _scale_into_own_storage(dx, None, x.dtype), dw, db


@triton.jit
def _scale_cast_kernel(src_ptr, dst_ptr, scale_ptr, n, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """dst = src * scale in dst's dtype, flat; a program reads its block before writing it."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < n
    value = tl.load(src_ptr + offsets, mask=in_range)
    if HAS_SCALE:
        value = value * tl.load(scale_ptr)
    tl.store(dst_ptr + offsets, value.to(dst_ptr.dtype.element_ty), mask=in_range)


def _scale_into_own_storage(acc, scale, dtype):
    """acc * scale (a 0-d fp32 tensor, or None for 1) as `dtype`, written over the front of acc's own fp32
    storage (no second buffer of its size); in place when acc already has `dtype`.

    Narrowed rows [a, b) land on the bytes of fp32 rows [a/2, b/2). The first block goes through a small
    staging copy; after it, blocks double in size (b <= 2a), so each one's destination holds only rows already
    read and never overlaps its own source. (torch's mixed-dtype mul does the same 2.5x slower on the H200.)
    """
    if acc.dtype == dtype:
        return acc if scale is None else acc.mul_(scale)
    rows, cols = acc.shape
    out = acc.view(-1).view(dtype)[: rows * cols].view(rows, cols)
    stop = min(rows, _NARROW_ROWS)
    out[:stop].copy_(acc[:stop].clone() if scale is None else acc[:stop] * scale)
    while stop < rows:
        start, stop = stop, min(2 * stop, rows)
        n = (stop - start) * cols
        _scale_cast_kernel[(triton.cdiv(n, _NARROW_BLOCK),)](
            acc[start:stop], out[start:stop], acc if scale is None else scale, n, HAS_SCALE=scale is not None,
            BLOCK=_NARROW_BLOCK, num_warps=8)
    return out


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd for the fused op on flattened inputs: x (N, H), weight (V, H), target (N,), token_weight (N,),
    class_weight (V,)."""

    @staticmethod
    def forward(ctx, x, weight, target, bias, token_weight, class_weight, opts, track_argmax):
        targets = Targets.build(target, opts, token_weight, class_weight)
        needs_grad = any(ctx.needs_input_grad[i] for i in (0, 1, 3))
        token_chunks = opts.strategy in _TOKEN_CHUNK_STRATEGIES
        grads_now = needs_grad and token_chunks and opts.reduction != "none"
        if token_chunks:
            stats, dx, dw, db = _token_chunk_pass(x, weight, bias, targets, opts, grads_now, track_argmax)
        else:
            stats, dx, dw, db = _vocab_chunk_stats(x, weight, bias, targets, opts, track_argmax), None, None, None
        lse, ce, zl = stats.token_terms(targets, weight.shape[0], opts)
        loss, token_loss = reduce_loss(ce, zl, targets, opts.reduction)
        accuracy = stats.token_accuracy(targets) if track_argmax else torch.zeros((), device=x.device)
        ctx.opts, ctx.grads_now, ctx.used = opts, grads_now, False
        ctx.save_for_backward(x, weight, bias, lse, dx, dw, db, *targets.saved())
        ctx.mark_non_differentiable(token_loss, lse, accuracy)
        return loss, token_loss, lse, accuracy

    @staticmethod
    def backward(ctx, grad_loss, _grad_token_loss, _grad_lse, _grad_accuracy):
        if ctx.used:
            raise RuntimeError("linear_cross_entropy: backward ran twice; its gradients are consumed in place")
        ctx.used = True
        x, weight, bias, lse, dx, dw, db, *saved = ctx.saved_tensors
        opts = ctx.opts
        if ctx.grads_now:
            scale = grad_loss.float()
            dx = dx.mul_(scale.to(dx.dtype))
        else:
            targets = Targets.from_saved(saved).scaled(grad_loss)
            if opts.strategy in _TOKEN_CHUNK_STRATEGIES:
                _, dx, dw, db = _token_chunk_pass(x, weight, bias, targets, opts, want_grad=True)
                scale = None  # the row factors already hold grad_loss
            else:
                dx, dw, db = _vocab_chunk_grads(x, weight, bias, targets, lse, opts)
        if opts.strategy in _TOKEN_CHUNK_STRATEGIES:
            dw = _scale_into_own_storage(dw, scale, weight.dtype)
            db = None if db is None else (db if scale is None else db * scale).to(bias.dtype)
        return dx, dw, None, db, None, None, None, None


def _check_inputs(x, weight, target, bias, weights, class_weight, reduction, label_smoothing, z_loss, softcap,
                  temperature, chunking, dw_dtype, chunk_size):
    op = "linear_cross_entropy"
    if x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: x (..., H) and weight (V, H) must agree on H, got x {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)}")
    if target.shape != x.shape[:-1]:
        raise ValueError(f"{op}: target must have shape {tuple(x.shape[:-1])} (x without its last dim), got "
                         f"{tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: target must be int64 (or int32), got {target.dtype}")
    if not x.dtype.is_floating_point or x.dtype != weight.dtype:
        raise TypeError(f"{op}: x and weight must share one floating dtype, got {x.dtype} and {weight.dtype}")
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != weight.dtype):
        raise ValueError(f"{op}: bias must be ({weight.shape[0]},) {weight.dtype}, got {tuple(bias.shape)} "
                         f"{bias.dtype}")
    if weights is not None and (weights.shape != target.shape or not weights.dtype.is_floating_point):
        raise ValueError(f"{op}: weights must be floating with shape {tuple(target.shape)}, got "
                         f"{tuple(weights.shape)} {weights.dtype}")
    tensors = [t for t in (x, weight, target, bias, weights) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"{op}: all tensors must be on one device, got {[str(t.device) for t in tensors]}")
    check_class_weight(op, class_weight, weight.shape[0], x.device)
    check_loss_options(op, reduction, label_smoothing, z_loss, softcap, temperature)
    if chunking not in ("tokens", "vocab"):
        raise ValueError(f"{op}: chunking must be 'tokens' or 'vocab', got {chunking!r}")
    if dw_dtype not in ("float32", "weight"):
        raise ValueError(f"{op}: dw_dtype must be 'float32' or 'weight', got {dw_dtype!r}")
    if chunking == "vocab" and dw_dtype != "float32":
        raise ValueError(f"{op}: chunking='vocab' forms each dW slice in one float32 GEMM; dw_dtype must be "
                         f"'float32' (or use chunking='tokens')")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int or None, got {chunk_size}")


def linear_cross_entropy(x, weight, target, bias=None, *, ignore_index=-100, reduction="mean", weights=None,
                         class_weight=None, label_smoothing=0.0, z_loss=0.0, softcap=None, temperature=1.0,
                         return_lse=False, return_per_token=False, return_token_accuracy=False,
                         chunking="tokens", dw_dtype="float32", chunk_size=None):
    """Cross-entropy of the logits x @ weight^T (+ bias) against `target`, never materialising the logits.

    x (..., H); weight (V, H), may be the tied input embedding; target (...) int64; `weights` (...) float
    per-token weights; `class_weight` (V,) float per-class weights with the semantics of torch's
    cross_entropy(weight=...) (formulas in longvl/kernels/cross_entropy.py). Returns the loss, or (loss,
    per_token_loss, lse, token_accuracy) keeping only the requested extras in that order: per_token_loss (...)
    fp32 without the token weights, 0 where ignored; lse (...) fp32 of the transformed logits; token_accuracy a
    0-d fp32 tensor, the fraction of non-ignored tokens whose argmax (first of tied columns) is the target. The
    extras carry no gradient (use reduction="none" to differentiate per-token losses).
    `chunking` and `dw_dtype` pick the memory / speed / accuracy trade-off (module docstring); `chunk_size` is
    tokens per chunk for chunking="tokens" (default 4096 with dw_dtype="float32", 2048 with dw_dtype="weight";
    bench/results/tuning has the sweep), vocabulary rows per chunk for
    chunking="vocab" (default: a power of two keeping the fp32 logit chunk within 128 MiB, at least 1024).
    """
    _check_inputs(x, weight, target, bias, weights, class_weight, reduction, label_smoothing, z_loss, softcap,
                  temperature, chunking, dw_dtype, chunk_size)
    strategy = "per_vocab_chunk" if chunking == "vocab" else ("fp32" if dw_dtype == "float32" else "weight_dtype")
    opts = _Options(int(ignore_index), reduction, float(label_smoothing), float(z_loss),
                    None if softcap is None else float(softcap), float(temperature), strategy, chunk_size)
    outputs = LinearCrossEntropyFunction.apply(
        x.reshape(-1, x.shape[-1]), weight, check_targets("linear_cross_entropy", target, weight.shape[0], opts),
        bias, None if weights is None else weights.reshape(-1), class_weight, opts, bool(return_token_accuracy))
    return shape_outputs(outputs, target.shape, reduction, return_per_token, return_lse, return_token_accuracy)


class LinearCrossEntropy(torch.nn.Module):
    """nn.Module form of `linear_cross_entropy`: options fixed at construction, tensors per call."""

    def __init__(self, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
                 temperature=1.0, return_lse=False, return_per_token=False, return_token_accuracy=False,
                 chunking="tokens", dw_dtype="float32", chunk_size=None):
        super().__init__()
        self.options = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                            z_loss=z_loss, softcap=softcap, temperature=temperature, return_lse=return_lse,
                            return_per_token=return_per_token, return_token_accuracy=return_token_accuracy,
                            chunking=chunking, dw_dtype=dw_dtype, chunk_size=chunk_size)

    def forward(self, x, weight, target, bias=None, weights=None, class_weight=None):
        return linear_cross_entropy(x, weight, target, bias, weights=weights, class_weight=class_weight,
                                    **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
