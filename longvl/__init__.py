"""longvl: Triton kernels and context-parallel attention for long-context vision-language training.

Subpackages: `longvl.kernels` (fused Triton ops and Hugging Face patches), `longvl.parallel` (context-parallel
attention), `longvl.eagle` (the Eagle 2.5 model, processor, data pipeline and trainer). They live under one
namespace because top-level names such as `kernels` are taken by other libraries (transformers imports
Hugging Face's `kernels` package at start-up).
"""
__version__ = "0.2.0"
