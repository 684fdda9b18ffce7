"""Fused Triton kernels with autograd: RMSNorm, RoPE, SwiGLU MLP, cross-entropy (on logits, or fused with the
linear layer that makes them), and HF patches.

On a machine without CUDA the kernels run through Triton's interpreter (slow, but exact), so everything here
also works on CPU tensors.

The ops are imported eagerly because four of them share their module's name (`longvl.kernels.rms_norm` is the
function, not the module); reach a module itself through `importlib.import_module("longvl.kernels.rms_norm")`.
The HF patches import transformers, so they load on first use.
"""
import importlib

from longvl.kernels._interpret import enable_interpreter_without_gpu

INTERPRETED = enable_interpreter_without_gpu()

from longvl.kernels.cross_entropy import CrossEntropy, cross_entropy  # noqa: E402
from longvl.kernels.linear_cross_entropy import LinearCrossEntropy, linear_cross_entropy  # noqa: E402
from longvl.kernels.rms_norm import RMSNorm, rms_norm  # noqa: E402
from longvl.kernels.rope import apply_rope  # noqa: E402
from longvl.kernels.swiglu import SwiGLUMLP, swiglu, swiglu_mlp  # noqa: E402

_LAZY = {"apply_kernels": "longvl.kernels.hf_patch", "patch_model_class": "longvl.kernels.hf_patch"}

__all__ = ["INTERPRETED", "CrossEntropy", "LinearCrossEntropy", "RMSNorm", "SwiGLUMLP", "apply_kernels", "apply_rope",
           "cross_entropy", "linear_cross_entropy", "patch_model_class", "rms_norm", "swiglu", "swiglu_mlp"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
