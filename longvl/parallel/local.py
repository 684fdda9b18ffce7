"""Single-rank attention as an autograd Function: what every rank runs after the Ulysses exchange."""
import torch

from longvl.parallel.local_attention import attention_backward, attention_forward


class LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, varlen, backend):
        out, lse, aux = attention_forward(q, k, v, causal=causal, scale=scale, backend=backend, **varlen)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (aux, causal, scale, varlen)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        aux, causal, scale, varlen = ctx.args
        dq, dk, dv = attention_backward(dout.contiguous(), q, k, v, out, lse, aux, causal=causal, scale=scale,
                                        **varlen)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def local_attention(q, k, v, *, causal=True, scale=None, varlen=None, backend="auto"):
    return LocalAttention.apply(q, k, v, causal, scale, varlen or {}, backend)
