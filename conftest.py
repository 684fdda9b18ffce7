"""Shared pytest setup for tests/ and bench/.

Triton kernels run through the interpreter on CPU-only machines: TRITON_INTERPRET must be set before any
kernel module is imported, which `import kernels` does. The `gpu` and `multigpu(n)` markers skip tests
that need hardware this machine lacks.
"""
from longvl import kernels  # noqa: F401  (sets TRITON_INTERPRET=1 without CUDA, before any kernel is defined)
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    multi = item.get_closest_marker("multigpu")
    if multi:
        need = multi.args[0] if multi.args else 2
        have = torch.cuda.device_count() if HAS_CUDA else 0
        if have < need:
            pytest.skip(f"needs {need} CUDA GPUs, found {have}")


@pytest.fixture
def device():
    """The device kernel tests run on: the GPU when there is one, else the CPU (Triton interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
