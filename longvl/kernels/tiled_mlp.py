"""A token-wise function (an MLP block) run over sequence chunks, so its wide intermediates exist for one chunk only.

At a million tokens Qwen2.5-7B's MLP intermediates (18,944 wide) are 38 GB each in bf16. Every token's MLP output
depends on that token alone, so the block can run `chunk_tokens` at a time: the forward keeps only its input,
and the backward recomputes each chunk with autograd on and takes that chunk's gradients before moving on. The
result is exact: the same operations on the same rows, the parameter gradients summed over chunks in fp32 and
rounded once (the same sum an untiled backward's GEMM makes over all rows, in another order).
"""
import torch
from torch import nn


class _TiledTokenwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, chunk_tokens, x, *params):
        ctx.fn, ctx.chunk_tokens = fn, chunk_tokens
        ctx.params = params   # the leaves `fn` uses: gradients are taken with respect to these very tensors
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([fn(part) for part in x.split(chunk_tokens, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx, grad_out):
        (x,), params = ctx.saved_tensors, ctx.params
        wanted = [p for p in params if p.requires_grad]
        param_grads = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in wanted]
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[2] else None
        start = 0
        for part, grad_part in zip(x.split(ctx.chunk_tokens, dim=-2), grad_out.split(ctx.chunk_tokens, dim=-2)):
            rows = part.shape[-2]
            part = part.detach().requires_grad_(grad_x is not None)
            with torch.enable_grad():
                out = ctx.fn(part)
            inputs = ([part] if grad_x is not None else []) + wanted
            grads = torch.autograd.grad(out, inputs, grad_part)
            if grad_x is not None:
                grad_x.narrow(-2, start, rows).copy_(grads[0])
                grads = grads[1:]
            for acc, grad in zip(param_grads, grads):
                if grad is not None:
                    acc.add_(grad)
            start += rows
        by_param = iter(acc.to(p.dtype) for acc, p in zip(param_grads, wanted))
        return (None, None, grad_x, *(next(by_param) if p.requires_grad else None for p in params))


def tiled_tokenwise(fn, params, x: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """`fn(x)` computed `chunk_tokens` tokens (dim -2) at a time, forward and backward; exact.

    `fn` must treat tokens independently (an MLP, a norm) and use exactly the tensors `params` as its weights,
    which get their gradients as usual.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if x.dim() < 2:
        raise ValueError(f"expected (..., tokens, features), got shape {tuple(x.shape)}")
    if x.shape[-2] <= chunk_tokens or not torch.is_grad_enabled():
        return fn(x)
    return _TiledTokenwise.apply(fn, chunk_tokens, x, *params)


def tile_mlp(module: nn.Module, chunk_tokens: int) -> nn.Module:
    """Make `module` (an MLP block) run over sequence chunks of `chunk_tokens`, in place; parameter names, state-dict
    keys and the forward's result are unchanged. Apply after `apply_kernels` (which patches classes, not instances)."""
    inner = module.forward

    def forward(x):
        return tiled_tokenwise(inner, list(module.parameters()), x, chunk_tokens)

    module.forward = forward
    return module
