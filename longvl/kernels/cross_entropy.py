"""Cross-entropy on given logits, and the row kernels it shares with the fused linear + cross-entropy.

Two row kernels do all the work, one program per row of logits, a block of columns per step:
* `logit_stats_kernel` folds a row (or a chunk of its columns) into running statistics in one pass: the
  online log-sum-exp (one exp per logit against the block's running max), the target's logit, the class-weighted
  logit sum (for label smoothing) and, when asked, the first column holding the row's maximum (the prediction).
* `logit_grad_kernel` writes d loss / d raw logit for a row, given its log-sum-exp and per-row scales.
The fused linear + cross-entropy feeds them logits a few rows or columns at a time (longvl/kernels/
linear_cross_entropy.py); `cross_entropy` here feeds them the whole given logits: a statistics pass in forward,
a gradient pass in backward (2 reads and 1 write of the logits in all, and the input is never overwritten).

Logit transform: z = softcap * tanh((logit + bias) / (temperature * softcap)), or logit / temperature without
softcap. With class weights c (1 when not given), label smoothing eps over V classes and target y, per token:
    ce_t = (1 - eps) * c_y * (lse_t - z_{t,y}) + (eps / V) * sum_v c_v * (lse_t - z_{t,v})
    zl_t = z_loss * lse_t ** 2
torch.nn.functional.cross_entropy's definition (weight=, label_smoothing=) plus the z-loss, which is not
class-weighted (as in Liger-Kernel). With per-token weights w_t (1 when not given; linear_cross_entropy only),
n the number of non-ignored tokens and D = sum over non-ignored tokens of c_{y_t} (= n without class weights):
    "none": w_t * (ce_t + zl_t) per token (0 where ignored);  "sum": the sum of those;
    "mean": sum_t w_t * ce_t / D + sum_t w_t * zl_t / n     (torch's weighted mean; the z-loss over n).
Unlike torch, whose mean over no tokens is NaN, an all-ignored batch gives loss 0 and zero gradients.

Token accuracy: the fraction of non-ignored tokens whose prediction, the argmax of the transformed logits,
equals the target. A tie for the maximum goes to the first column holding it, as torch.argmax does (softcap
saturation and bf16 logits make ties real), so a target that ties with an earlier column counts as wrong.
"""
import dataclasses

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from longvl.kernels._utils import check_kernel_tensor, next_power_of_2

REDUCTIONS = ("mean", "sum", "none")
STATS_BLOCK = 1024  # logits per step of the statistics kernel (4 warps): a max and a sum across lanes per step
# Launches of fewer rows (the fused loss's 512-row blocks) take steps twice as wide on 8 warps: with one program
# per row, a few hundred rows leave each SM too few loads in flight at 4 warps
# (bench/results/tuning/cross_entropy_stats_launch_*.json).
STATS_FEW_ROWS = 1024
GRAD_BLOCK = 4096  # logits per step of the gradient kernel


@triton.jit
def _as_fp32(scalar):
    """Float arguments arrive as fp64 when torch.compile launches the kernel; keep the math in fp32."""
    return tl.cast(scalar, tl.float32)


@triton.jit
def transform_logits(raw, inv_temperature, softcap, HAS_SOFTCAP: tl.constexpr):
    """Temperature, then optional tanh softcap. The math library's tanh keeps its few-ulp accuracy where
    |z| << softcap, which 2 sigmoid(2u) - 1 loses (its rounding near 1 is of the order of tanh(u) itself)."""
    z = raw * inv_temperature
    if HAS_SOFTCAP:
        z = softcap * libdevice.tanh(z / softcap)
    return z


@triton.jit
def softcap_slope(z, raw, inv_temperature, softcap):
    """d z / d (raw / temperature) = 1 - tanh(u)^2 for z = softcap tanh(u): as 1 - t^2 while |t| < 1/2 (within
    about an ulp), else as 4 e / (1 + e)^2 with e = exp(-2 |u|), which keeps its relative accuracy as tanh -> 1,
    where 1 - t^2 is all rounding error."""
    t = z / softcap
    e = tl.exp(-2.0 * tl.abs(raw * inv_temperature / softcap))
    return tl.where(tl.abs(t) < 0.5, 1.0 - t * t, 4.0 * e / ((1.0 + e) * (1.0 + e)))


@triton.jit
def logit_stats_kernel(
    logits_ptr, logits_row_stride, target_ptr, class_weight_ptr, max_ptr, sumexp_ptr, target_logit_ptr,
    logit_sum_ptr, argmax_ptr, first_col, n_cols, inv_temperature, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr, TRACK_ARGMAX: tl.constexpr, BLOCK: tl.constexpr,
):
    """Fold columns [first_col, first_col + n_cols) of a row into its running max, sum of exp, target logit,
    class-weighted logit sum and (TRACK_ARGMAX) first column of the maximum.

    Online log-sum-exp by blocks: one exp per logit against the block's running max (a per-lane running max
    needs two, which made this pass compute-bound at half the copy bandwidth on the H200). Chunks of a row must
    be folded in column order for the argmax to keep the first of tied columns.
    """
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    target = tl.load(target_ptr + row) - first_col
    inv_temperature, softcap = _as_fp32(inv_temperature), _as_fp32(softcap)
    running_max = tl.load(max_ptr + row)
    sumexp = tl.load(sumexp_ptr + row)
    if TRACK_ARGMAX:
        argmax = tl.load(argmax_ptr + row)
    lane_sum = tl.zeros((BLOCK,), tl.float32)
    lane_target = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < n_cols
        z = transform_logits(tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32),
                             inv_temperature, softcap, HAS_SOFTCAP)
        z_or_floor = tl.where(in_row, z, float("-inf"))
        block_max = tl.max(z_or_floor, axis=0)
        if TRACK_ARGMAX:  # an earlier block keeps the argmax on a tie
            first = tl.min(tl.where(z_or_floor == block_max, cols, n_cols), axis=0)
            argmax = tl.where(block_max > running_max, first + first_col, argmax)
        new_max = tl.maximum(running_max, block_max)
        pivot = tl.where(new_max == float("-inf"), 0.0, new_max)  # logits of -inf (masked tokens) stay NaN-free
        sumexp = sumexp * tl.exp(running_max - pivot) + tl.sum(tl.exp(z_or_floor - pivot), axis=0)
        running_max = new_max
        lane_target += tl.where(cols == target, z, 0.0)
        if HAS_CLASS_WEIGHT:
            z = z * tl.load(class_weight_ptr + first_col + cols, mask=in_row, other=0.0)
        lane_sum += tl.where(in_row, z, 0.0)
    tl.store(max_ptr + row, running_max)
    tl.store(sumexp_ptr + row, sumexp)
    tl.store(target_logit_ptr + row, tl.load(target_logit_ptr + row) + tl.sum(lane_target, axis=0))
    tl.store(logit_sum_ptr + row, tl.load(logit_sum_ptr + row) + tl.sum(lane_sum, axis=0))
    if TRACK_ARGMAX:
        tl.store(argmax_ptr + row, argmax)


@triton.jit
def logit_grad_kernel(
    logits_ptr, logits_row_stride, grad_ptr, grad_row_stride, target_ptr, lse_ptr, ce_scale_ptr, z_scale_ptr,
    class_weight_ptr, class_weight_sum_ptr, first_col, n_cols, vocab, inv_temperature, softcap, label_smoothing,
    z_loss, HAS_SOFTCAP: tl.constexpr, HAS_CLASS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):
    """d loss / d raw logit for columns [first_col, first_col + n_cols) of a row:
        ce_scale * ((1 - eps) c_y (p_v - [v = y]) + (eps / V) (p_v sum_u c_u - c_v)) + z_scale * 2 z_loss lse p_v
    times the transform's slope. The class weight of the target is read only for a target inside [0, vocab).

    The gradient row may alias the first half of an fp32 logit row (narrower dtype). Stores only reach addresses
    of this block or earlier ones, and a barrier holds every store of a block until all of the program's warps
    have loaded it: a thread's 2-byte gradient at column c lands on the logit of column c / 2, which another warp
    loads (without the barrier that warp sometimes reads an overwritten logit, a silent and sporadic error).
    """
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    out_ptr = grad_ptr + row * grad_row_stride
    label = tl.load(target_ptr + row)
    target = label - first_col
    inv_temperature, softcap = _as_fp32(inv_temperature), _as_fp32(softcap)
    label_smoothing, z_loss = _as_fp32(label_smoothing), _as_fp32(z_loss)
    lse = tl.load(lse_ptr + row)
    ce_scale = tl.load(ce_scale_ptr + row)
    if HAS_CLASS_WEIGHT:
        target_weight = tl.load(class_weight_ptr + label, mask=(label >= 0) & (label < vocab), other=0.0)
        weight_sum = tl.load(class_weight_sum_ptr)
    else:
        target_weight = 1.0
        weight_sum = vocab * 1.0
    target_coef = ce_scale * (1.0 - label_smoothing) * target_weight
    smooth_coef = ce_scale * label_smoothing / vocab
    prob_coef = target_coef + smooth_coef * weight_sum + tl.load(z_scale_ptr + row) * 2.0 * z_loss * lse
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        in_row = cols < n_cols
        raw = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        z = transform_logits(raw, inv_temperature, softcap, HAS_SOFTCAP)
        grad = tl.exp(z - lse) * prob_coef - tl.where(cols == target, target_coef, 0.0)
        if HAS_CLASS_WEIGHT:
            grad -= smooth_coef * tl.load(class_weight_ptr + first_col + cols, mask=in_row, other=0.0)
        else:
            grad -= smooth_coef
        if HAS_SOFTCAP:
            grad = grad * softcap_slope(z, raw, inv_temperature, softcap)
        tl.debug_barrier()
        tl.store(out_ptr + cols, (grad * inv_temperature).to(out_ptr.dtype.element_ty), mask=in_row)


@dataclasses.dataclass(frozen=True)
class LossOptions:
    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    softcap: float | None
    temperature: float


def _transform_args(opts):
    return dict(inv_temperature=1.0 / opts.temperature, softcap=opts.softcap or 1.0,
                HAS_SOFTCAP=opts.softcap is not None)


@dataclasses.dataclass(frozen=True)
class Targets:
    """The targets and the factors that turn each token's ce_t and zl_t into the reduced loss (fp32; 0 where
    ignored): loss = sum_t ce_scale_t * ce_t + z_scale_t * zl_t (per token for "none"). Built without a host
    synchronisation; `scaled` folds in the incoming gradient, `rows` slices a range of tokens."""
    target: torch.Tensor  # (N,) int64
    valid: torch.Tensor  # (N,) bool
    ce_scale: torch.Tensor  # (N,) fp32
    z_scale: torch.Tensor  # (N,) fp32
    class_weight: torch.Tensor | None  # (V,) fp32
    class_weight_sum: torch.Tensor | None  # (1,) fp32

    @classmethod
    def build(cls, target, opts, token_weight=None, class_weight=None):
        valid = target != opts.ignore_index
        weight = valid.float() if token_weight is None else torch.where(valid, token_weight.float(), 0.0)
        ce_scale = z_scale = weight
        weight_sum = None
        if class_weight is not None:
            class_weight = class_weight.float().contiguous()
            weight_sum = class_weight.sum().reshape(1)
        if opts.reduction == "mean":
            count = valid.sum()
            ce_scale = z_scale = weight / count.clamp(min=1)
            if class_weight is not None:
                target_weight = torch.where(valid, class_weight[torch.where(valid, target, 0)], 0.0)
                ce_scale = weight / torch.where(count > 0, target_weight.sum(), 1.0)
        return cls(target, valid, ce_scale, z_scale, class_weight, weight_sum)

    def rows(self, part):
        return dataclasses.replace(self, target=self.target[part], valid=self.valid[part],
                                   ce_scale=self.ce_scale[part], z_scale=self.z_scale[part])

    def scaled(self, grad_loss):
        grad_loss = grad_loss.float()
        return dataclasses.replace(self, ce_scale=self.ce_scale * grad_loss, z_scale=self.z_scale * grad_loss)

    def target_weight(self):
        """c_{y_t} per token (1 without class weights; an ignored token's value is never used)."""
        if self.class_weight is None:
            return 1.0
        return self.class_weight[torch.where(self.valid, self.target, 0)]

    def saved(self):
        """The tensors to keep for backward, in the order `from_saved` takes them."""
        return self.target, self.valid, self.ce_scale, self.z_scale, self.class_weight, self.class_weight_sum

    @classmethod
    def from_saved(cls, tensors):
        return cls(*tensors)


class RowStatistics:
    """Per-token running statistics of the transformed logits (fp32), folded chunk by chunk."""

    def __init__(self, n_rows, device, track_argmax=False):
        self.max = torch.full((n_rows,), float("-inf"), device=device)
        self.sumexp = torch.zeros(n_rows, device=device)
        self.target_logit = torch.zeros(n_rows, device=device)
        self.logit_sum = torch.zeros(n_rows, device=device)
        self.argmax = torch.zeros(n_rows, device=device, dtype=torch.int64) if track_argmax else None

    def fold(self, logits, rows, targets, first_col, opts):
        """Fold `logits` (rows `rows` of the token range, columns from `first_col`) into the statistics."""
        if logits.shape[0] == 0:
            return
        class_weight = targets.class_weight
        few_rows = logits.shape[0] < STATS_FEW_ROWS
        block = 2 * STATS_BLOCK if few_rows else STATS_BLOCK
        logit_stats_kernel[(logits.shape[0],)](
            logits, logits.stride(0), targets.target[rows], self.max if class_weight is None else class_weight,
            self.max[rows], self.sumexp[rows], self.target_logit[rows], self.logit_sum[rows],
            self.max[rows] if self.argmax is None else self.argmax[rows], first_col, logits.shape[1],
            HAS_CLASS_WEIGHT=class_weight is not None, TRACK_ARGMAX=self.argmax is not None,
            BLOCK=min(block, next_power_of_2(logits.shape[1])), num_warps=8 if few_rows else 4,
            **_transform_args(opts))

    def lse(self, start=0, stop=None):
        return self.max[start:stop] + self.sumexp[start:stop].log()

    def token_terms(self, targets, vocab, opts):
        """(lse, ce, zl) per token, fp32, ce and zl 0 where ignored."""
        lse = self.lse()
        eps = opts.label_smoothing
        ce = (1.0 - eps) * targets.target_weight() * (lse - self.target_logit)
        if eps:  # skipped otherwise: logits of -inf (masked entries) make the sum -inf, and 0 * -inf is NaN
            weight_sum = vocab if targets.class_weight is None else targets.class_weight_sum
            ce = ce + (eps / vocab) * (weight_sum * lse - self.logit_sum)
        zl = opts.z_loss * lse * lse
        return lse, torch.where(targets.valid, ce, 0.0), torch.where(targets.valid, zl, 0.0)

    def token_accuracy(self, targets):
        """Fraction of non-ignored tokens whose argmax (first of tied columns) is the target; 0 for none."""
        correct = (self.argmax == targets.target) & targets.valid
        return correct.sum() / targets.valid.sum().clamp(min=1)


def reduce_loss(ce, zl, targets, reduction):
    """(loss, per-token loss ce + zl without token weights) under `reduction`."""
    weighted = targets.ce_scale * ce + targets.z_scale * zl
    return (weighted if reduction == "none" else weighted.sum()), ce + zl


def write_logit_grad(logits, grad, targets, lse, first_col, vocab, opts):
    """d loss / d logits into `grad` (the shape of `logits`; may lie over it, see logit_grad_kernel); `targets`
    and `lse` hold the rows of `logits`."""
    if logits.shape[0] == 0:
        return grad
    class_weight = targets.class_weight
    logit_grad_kernel[(logits.shape[0],)](
        logits, logits.stride(0), grad, grad.stride(0), targets.target, lse, targets.ce_scale, targets.z_scale,
        lse if class_weight is None else class_weight, lse if class_weight is None else targets.class_weight_sum,
        first_col, logits.shape[1], vocab, label_smoothing=opts.label_smoothing, z_loss=opts.z_loss,
        HAS_CLASS_WEIGHT=class_weight is not None, BLOCK=min(GRAD_BLOCK, next_power_of_2(logits.shape[1])),
        num_warps=8, **_transform_args(opts))
    return grad


def check_loss_options(op, reduction, label_smoothing, z_loss, softcap, temperature):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1), got {label_smoothing}")
    if z_loss < 0.0:
        raise ValueError(f"{op}: z_loss must be >= 0, got {z_loss}")
    if softcap is not None and softcap <= 0.0:
        raise ValueError(f"{op}: softcap must be positive or None, got {softcap}")
    if temperature <= 0.0:
        raise ValueError(f"{op}: temperature must be positive, got {temperature}")


def check_class_weight(op, class_weight, vocab, device):
    if class_weight is None:
        return
    if not isinstance(class_weight, torch.Tensor) or not class_weight.dtype.is_floating_point or \
            class_weight.shape != (vocab,):
        raise ValueError(f"{op}: class weights must be a floating tensor of shape ({vocab},) (one per class), got "
                         f"{getattr(class_weight, 'shape', type(class_weight).__name__)}")
    if class_weight.device != device:
        raise ValueError(f"{op}: class weights are on {class_weight.device}, the logits on {device}")


def check_targets(op, target, vocab, opts):
    """int64 targets; one outside [0, vocab) that is not ignore_index fails on the device (no host sync)."""
    target = target.reshape(-1).long()
    valid = target != opts.ignore_index
    torch._assert_async(((target >= 0) & (target < vocab) | ~valid).all(),
                        f"{op}: a target is outside [0, vocab) and is not ignore_index")
    return target


class CrossEntropyFunction(torch.autograd.Function):
    """Autograd for cross-entropy on flattened logits (N, V) with unit column stride and targets (N,)."""

    @staticmethod
    def forward(ctx, logits, target, class_weight, opts, track_argmax):
        n_rows, vocab = logits.shape
        targets = Targets.build(target, opts, class_weight=class_weight)
        stats = RowStatistics(n_rows, logits.device, track_argmax)
        stats.fold(logits, slice(None), targets, 0, opts)
        lse, ce, zl = stats.token_terms(targets, vocab, opts)
        loss, token_loss = reduce_loss(ce, zl, targets, opts.reduction)
        accuracy = stats.token_accuracy(targets) if track_argmax else torch.zeros((), device=logits.device)
        ctx.opts = opts
        ctx.save_for_backward(logits, lse, *targets.saved())
        ctx.mark_non_differentiable(token_loss, lse, accuracy)
        return loss, token_loss, lse, accuracy

    @staticmethod
    def backward(ctx, grad_loss, _grad_token_loss, _grad_lse, _grad_accuracy):
        logits, lse, *saved = ctx.saved_tensors
        targets = Targets.from_saved(saved).scaled(grad_loss)
        grad = write_logit_grad(logits, torch.empty_like(logits), targets, lse, 0, logits.shape[1], ctx.opts)
        return grad, None, None, None, None


def cross_entropy(logits, target, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  z_loss=0.0, softcap=None, temperature=1.0, return_per_token=False, return_lse=False,
                  return_token_accuracy=False):
    """Cross-entropy of `logits` (..., V) against class indices `target` (...), as
    torch.nn.functional.cross_entropy with the classes in the last dimension, plus z-loss, softcap and
    temperature (formulas in the module docstring).

    `weight` (V,): per-class weights with torch's semantics. Returns the loss, or (loss, per_token_loss, lse,
    token_accuracy) keeping only the requested extras in that order: per_token_loss (...) fp32, 0 where ignored;
    lse (...) fp32 of the transformed logits; token_accuracy a 0-d fp32 tensor. The extras carry no gradient.
    The gradient has the logits' dtype and is computed in fp32 from the logits in backward.
    """
    op = "cross_entropy"
    check_kernel_tensor("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{op}: logits must have a non-empty class dimension (last), got {tuple(logits.shape)}")
    if not isinstance(target, torch.Tensor) or target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: target must be an int64 (or int32) tensor, got "
                        f"{getattr(target, 'dtype', type(target).__name__)}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"{op}: target must have shape {tuple(logits.shape[:-1])} (logits without the class "
                         f"dimension), got {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"{op}: target is on {target.device}, logits on {logits.device}")
    vocab = logits.shape[-1]
    check_class_weight(op, weight, vocab, logits.device)
    check_loss_options(op, reduction, label_smoothing, z_loss, softcap, temperature)
    opts = LossOptions(int(ignore_index), reduction, float(label_smoothing), float(z_loss),
                       None if softcap is None else float(softcap), float(temperature))
    rows = logits.reshape(-1, vocab)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    outputs = CrossEntropyFunction.apply(rows, check_targets(op, target, vocab, opts), weight, opts,
                                         bool(return_token_accuracy))
    return shape_outputs(outputs, target.shape, reduction, return_per_token, return_lse, return_token_accuracy)


def shape_outputs(outputs, target_shape, reduction, return_per_token, return_lse, return_token_accuracy):
    """(loss, token_loss, lse, accuracy) of flat rows -> the loss in the targets' shape, then the extras asked for."""
    loss, token_loss, lse, accuracy = outputs
    if reduction == "none":
        loss = loss.view(target_shape)
    extras = [t for t, wanted in ((token_loss.view(target_shape), return_per_token),
                                  (lse.view(target_shape), return_lse), (accuracy, return_token_accuracy)) if wanted]
    return (loss, *extras) if extras else loss


class CrossEntropy(torch.nn.Module):
    """nn.Module form of `cross_entropy`: options (and class weights, a buffer) fixed at construction."""

    def __init__(self, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                 softcap=None, temperature=1.0, return_per_token=False, return_lse=False,
                 return_token_accuracy=False):
        super().__init__()
        self.register_buffer("weight", weight)
        self.options = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                            z_loss=z_loss, softcap=softcap, temperature=temperature,
                            return_per_token=return_per_token, return_lse=return_lse,
                            return_token_accuracy=return_token_accuracy)

    def forward(self, logits, target):
        return cross_entropy(logits, target, self.weight, **self.options)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
