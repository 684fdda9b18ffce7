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
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpreted:
        fix_interpreter_scalar_index()
    return interpreted


def fix_interpreter_scalar_index():
    """Let interpreted loops take runtime bounds (`for i in range(n)`) under NumPy 2.4.

    Triton 3.6's interpreter turns a scalar into an int with `int(array)`, but it stores scalars as one-element
    1-D arrays, which NumPy 2.4 refuses to convert ("only 0-dimensional arrays"); `.item()` works for both.
    """
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor
    if getattr(patch_tensor, "fixes_scalar_index", False):
        return

    def patch_tensor_with_scalar_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_tensor_with_scalar_index.fixes_scalar_index = True
    interpreter._patch_lang_tensor = patch_tensor_with_scalar_index
