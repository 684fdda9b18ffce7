"""The tiled MLP (sequence chunks, recomputed per chunk in backward) equals the untiled block, forward and backward."""
import pytest
import torch
from torch import nn
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from longvl.kernels.tiled_mlp import tile_mlp, tiled_tokenwise


def _mlp():
    torch.manual_seed(0)
    return Qwen2MLP(Qwen2Config(hidden_size=24, intermediate_size=56, hidden_act="silu")).double()


@pytest.mark.parametrize("chunk", [1, 7, 16, 100])
def test_tiled_mlp_is_exact_forward_and_backward(chunk):
    reference, tiled = _mlp(), tile_mlp(_mlp(), chunk)
    x = torch.randn(2, 37, 24, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    grad = torch.randn(2, 37, 24, dtype=torch.float64)
    out, out2 = reference(x), tiled(x2)
    torch.testing.assert_close(out2, out, rtol=1e-12, atol=1e-12)
    out.backward(grad)
    out2.backward(grad)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(reference.named_parameters(), tiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert [n for n, _ in reference.named_parameters()] == [n for n, _ in tiled.named_parameters()]


def test_tiling_keeps_only_one_chunk_of_intermediates():
    """Intermediate-wide (56) activations exist for one chunk (8 tokens) at a time, never for all 64 tokens."""
    mlp = tile_mlp(_mlp().float(), chunk_tokens=8)
    saved = []
    x = torch.randn(1, 64, 24, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        mlp(x).sum().backward()
    activations = [shape for shape in saved if len(shape) == 3 and shape[-1] == 56]   # (batch, tokens, 56)
    assert activations and all(shape[1] <= 8 for shape in activations), saved


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        tiled_tokenwise(nn.Identity(), [], torch.randn(2, 3), 0)
