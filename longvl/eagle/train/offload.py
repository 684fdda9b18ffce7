"""Activation checkpointing of decoder layers, with the checkpointed hidden states offloaded to CPU.

Non-reentrant `torch.utils.checkpoint` keeps a layer's inputs as autograd saved tensors (saved before its
own recompute hooks take over), so a `saved_tensors_hooks` context around the checkpointed call sees exactly
what full checkpointing keeps alive: the layer inputs (the hidden state, plus shared tensors such as RoPE
cos/sin). `CPUOffloadHooks` copies each to pinned CPU memory on a side stream as soon as it is saved, so the
copy overlaps the layer's compute and the GPU block is released (`record_stream` stops the allocator from
reusing it before the copy ends); in backward, unpacking layer i's input also starts the copy back of layer
i-1's (the next one backward needs), again on the side stream. Tensors shared between layers are offloaded
once. Small tensors stay where they are: the copy would cost more than the memory saved.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


class CPUOffloadHooks(torch.autograd.graph.saved_tensors_hooks):
    """saved_tensors_hooks moving saved CUDA tensors to pinned CPU memory and back, asynchronously.

    With `device_copy=True` on a CPU-only machine it clones instead, so tests exercise the same path.
    """

    def __init__(self, min_bytes: int = 1 << 20, device_copy: bool = False):
        self.min_bytes = min_bytes
        self.device_copy = device_copy
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self.handles: list[dict] = []   # in pack order; backward walks them in reverse
        self.by_storage: dict = {}
        self.offloaded_bytes = 0
        super().__init__(self._pack, self._unpack)

    def reset(self) -> None:
        """Forget the previous step's handles (call at the start of every forward)."""
        self.handles.clear()
        self.by_storage.clear()

    def _pack(self, tensor: torch.Tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes < self.min_bytes or (tensor.device.type != "cuda" and not self.device_copy):
            return tensor
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tuple(tensor.stride()), tensor.dtype, tensor._version)
        if key in self.by_storage:
            return self.by_storage[key]
        handle = {"device": tensor.device, "index": len(self.handles), "gpu": None, "event": None}
        if tensor.device.type == "cuda":
            src = tensor.contiguous()
            cpu = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                cpu.copy_(src, non_blocking=True)
            src.record_stream(self.stream)
            handle["cpu"] = cpu
        else:
            handle["cpu"] = tensor.detach().clone()
        self.offloaded_bytes += nbytes
        self.handles.append(handle)
        self.by_storage[key] = handle
        return handle

    def _prefetch(self, handle: dict) -> None:
        if handle["gpu"] is not None or handle["device"].type != "cuda":
            return
        with torch.cuda.stream(self.stream):
            handle["gpu"] = handle["cpu"].to(handle["device"], non_blocking=True)
            handle["event"] = torch.cuda.Event()
            handle["event"].record(self.stream)

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        handle = packed
        if handle["device"].type != "cuda":
            return handle["cpu"]
        self._prefetch(handle)
        if handle["index"] > 0:
            self._prefetch(self.handles[handle["index"] - 1])
        torch.cuda.current_stream().wait_event(handle["event"])
        gpu, handle["gpu"] = handle["gpu"], None   # the GPU copy lives only as long as autograd needs it
        gpu.record_stream(torch.cuda.current_stream())
        return gpu


def wrap_checkpointed(layer: torch.nn.Module, offload: CPUOffloadHooks | None) -> None:
    """Make `layer` recompute its forward in backward (non-reentrant), keeping only its inputs, optionally on CPU.

    The forward is replaced on the instance, so parameter names (and checkpoints) are unchanged and FSDP2's
    hooks, which run around `__call__`, stay outside the checkpointed region as in torchtitan.
    """
    inner = layer.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        if offload is None:
            return checkpoint(inner, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
        with offload:
            return checkpoint(inner, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

    layer.forward = forward


def apply_activation_checkpointing(layers, mode: str, every: int = 2,
                                   offload: CPUOffloadHooks | None = None) -> int:
    """Checkpoint every layer (`full`), every `every`-th layer (`selective`) or none; return how many."""
    if mode == "none":
        return 0
    chosen = [layer for i, layer in enumerate(layers) if mode == "full" or i % every == 0]
    for layer in chosen:
        wrap_checkpointed(layer, offload)
    return len(chosen)
