"""Host-side launch helpers shared by the kernels, written to cost well under a microsecond per call.

Eager training calls every op thousands of times per step with kernels of tens of microseconds, so the Python
around a launch matters: Triton's own `cdiv` / `next_power_of_2` are ConstexprFunctions whose host calls cost
microseconds each, and `torch.cuda.get_device_properties` is far slower than a cached integer.
"""
import functools

import torch

from longvl import kernels

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cdiv(a, b):
    return -(-a // b)


def next_power_of_2(n):
    return 1 << (int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def check_kernel_tensor(name, tensor, dtypes=FLOAT_DTYPES):
    """Reject what the kernels cannot run on, naming the argument: non-tensors, dtypes, the wrong device."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if dtypes is not None and tensor.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {tensor.dtype}; supported: {', '.join(map(str, dtypes))}")
    wanted = "cpu" if kernels.INTERPRETED else "cuda"
    if tensor.device.type != wanted:
        where = "Triton's CPU interpreter is active" if kernels.INTERPRETED else "the Triton kernels run on CUDA"
        raise ValueError(f"{name} is on {tensor.device}, but {where}: move it to a {wanted} device")
