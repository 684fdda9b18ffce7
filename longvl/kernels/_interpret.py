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
        interpret_imported_triton_language()
        fix_interpreter_scalar_index()
        interpret_libdevice_tanh()
        round_bf16_to_nearest()
    return interpreted


def interpret_imported_triton_language():
    """Make triton.language's own jit functions (tl.sum, tl.max, ...) interpretable when triton was imported first.

    They are decorated when triton.language is imported: imported before TRITON_INTERPRET was set (transformers
    >= 5.25 imports triton at start-up through Hugging Face's kernels package), they are compiled-kernel
    functions, which an interpreted kernel cannot call ("Cannot call @triton.jit'd outside of the scope of a
    kernel"). Each is replaced, in every triton.language module that holds it, by its interpreted form.
    """
    import sys

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    modules = [m for name, m in list(sys.modules.items()) if name.startswith("triton.language") and m is not None]
    converted = {}
    for module in modules:
        for name, value in list(vars(module).items()):
            if type(value) is JITFunction:
                if id(value) not in converted:
                    converted[id(value)] = InterpretedFunction(value.fn)
                setattr(module, name, converted[id(value)])


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


def interpret_libdevice_tanh():
    """Let interpreted kernels call `triton.language.extra.libdevice.tanh` (the GPU math library's tanh).

    Triton 3.6-3.9 interpret only triton.language's own math; the libdevice functions are stubs there and return
    None. NumPy's tanh stands in: correctly rounded in fp32, like libdevice's to within its 2 ulp.
    """
    import numpy as np
    import triton.language as tl
    from triton.language.extra import libdevice
    from triton.runtime.interpreter import TensorHandle

    if getattr(libdevice.tanh, "interpreted", False):
        return

    def tanh(arg0, _semantic=None):
        return tl.tensor(TensorHandle(np.tanh(arg0.handle.data), arg0.handle.dtype.scalar), arg0.type)

    tanh.interpreted = True
    libdevice.tanh = tanh


def round_bf16_to_nearest():
    """Make the interpreter round fp32 -> bf16 casts to nearest even, as the GPU's conversion does.

    Triton 3.6-3.9's interpreter truncates them (it drops the low 16 bits), which biases every bf16 result
    computed on CPU towards zero by up to one bf16 ulp and hides the accuracy a kernel has on the GPU.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    cast = interpreter.InterpreterBuilder.cast_impl
    if getattr(cast, "rounds_bf16", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return cast(self, src, dst_type)
        bits = src.data.astype(np.float32, copy=False).view(np.uint32)
        rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        quiet_nan = ((bits >> 16) | 0x0040).astype(np.uint16)
        return interpreter.TensorHandle(np.where(np.isnan(src.data), quiet_nan, rounded), tl.bfloat16)

    cast_impl.rounds_bf16 = True
    interpreter.InterpreterBuilder.cast_impl = cast_impl
