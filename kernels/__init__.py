"""Fused Triton kernels with autograd: RMSNorm, RoPE, SwiGLU MLP, linear + cross-entropy, and HF patches.

On a machine without CUDA the kernels run through Triton's interpreter (slow, but exact), so everything here
also works on CPU tensors.
"""
import importlib

from kernels._interpret import enable_interpreter_without_gpu

INTERPRETED = enable_interpreter_without_gpu()

_EXPORTS = {
    "rms_norm": "kernels.rms_norm",
    "RMSNorm": "kernels.rms_norm",
    "apply_rope": "kernels.rope",
    "swiglu": "kernels.swiglu",
    "SwiGLUMLP": "kernels.swiglu",
    "swiglu_mlp": "kernels.swiglu",
    "linear_cross_entropy": "kernels.linear_cross_entropy",
    "LinearCrossEntropy": "kernels.linear_cross_entropy",
    "apply_kernels": "kernels.hf_patch",
    "patch_model_class": "kernels.hf_patch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    """Import submodules lazily: `import kernels` stays cheap and pulls in only what is used."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
