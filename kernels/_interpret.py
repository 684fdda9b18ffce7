"""Run Triton kernels through Triton's interpreter when no GPU is present.

`triton.jit` decides at decoration time whether a kernel is compiled or interpreted, so this must run before
any kernel module is imported. An explicit TRITON_INTERPRET in the environment always wins.
"""
import os


def enable_interpreter_without_gpu() -> bool:
    """Set TRITON_INTERPRET=1 on machines without CUDA; return whether kernels run interpreted."""
    if "TRITON_INTERPRET" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
