"""RoPE on q and k, bf16: ours vs eager HF apply_rotary_pos_emb, torch.compile of it and Liger.

q and k come as HF makes them: (B, S, H, D) projections viewed as (B, H, S, D), batch 1. Bytes count q and k
only (e = 2 bytes, N tokens, D head dim):
  forward:          read q, k and write both rotated         = 2 (Hq + Hk) N D e
  forward+backward: the same again for the gradients          = 4 (Hq + Hk) N D e
cos/sin (2 N D e, under 4 % of that here) are not counted. "rope.fwd" uses HF's cos/sin for every provider;
"rope_positions.fwd" is ours computing the angles in the kernel from position_ids and theta (no table at all).
Liger writes its result into q and k (in place), so the timing loop keeps rotating the same tensors.
Every provider is timed by replaying a captured CUDA graph (the GPU's time); at the main shape the same calls
are also timed with CUDA events around each eager call ("...host_included"), which is the host's time whenever
a call's Python and launches outlast its kernels.
"copy_floor" is a device copy of the same bytes, graph-timed like the others: the reference at sizes too small
to reach the 1 GiB copy ceiling.
On CPU the same code runs at a tiny shape through Triton's interpreter (ours and eager only).
"""
import pytest
import torch

from bench.harness import ON_GPU, measure_copy_floor
from bench.shapes import MODELS, QUICK, token_counts
from longvl.kernels.rope import apply_rope

DTYPE = torch.bfloat16
THETA = 1e6  # Qwen2.5's rope_theta
MAIN_TOKENS, MAIN_MODEL = 16384, "qwen2.5-7b"
if ON_GPU:
    SHAPES = [(t, MAIN_MODEL) for t in token_counts(MAIN_TOKENS, 4096, 65536)]
    # The other models with rotary attention (SigLIP has none); Qwen2.5-0.5B has head_dim 64.
    SHAPES += [] if QUICK else [(MAIN_TOKENS, name) for name in ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-32b",
                                                                  "llama-3-8b")]
else:
    SHAPES = [(16, "qwen2.5-0.5b")]
# Every shape graph-timed; the main one (on CPU the tiny one) also host-included.
CASES = [(*shape, "cuda_graph") for shape in SHAPES] + [(*SHAPES[0], "host_included")]
PROVIDERS = ["ours", "ours.positions", "eager", "torch.compile", "liger", "copy_floor"]
_COMPILED = []


def _hf_rope():
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    return apply_rotary_pos_emb


def _rope_fn(provider, tokens, model):
    """fn(q, k, cos, sin, positions) -> (q_rot, k_rot) for the provider, or a skip."""
    if provider == "ours":
        return lambda q, k, cos, sin, positions: apply_rope(q, k, cos, sin)
    if provider == "ours.positions":
        return lambda q, k, cos, sin, positions: apply_rope(q, k, position_ids=positions, theta=THETA)
    if provider == "eager":
        hf = _hf_rope()
        return lambda q, k, cos, sin, positions: hf(q, k, cos, sin)
    if not ON_GPU:
        pytest.skip(f"{provider} is measured on GPU only")
    if provider == "liger":
        liger = pytest.importorskip("liger_kernel.transformers.rope")
        return lambda q, k, cos, sin, positions: liger.liger_rotary_pos_emb(q, k, cos, sin)
    if (tokens, model) != (MAIN_TOKENS, MAIN_MODEL):
        pytest.skip("torch.compile is measured at the main shape only: compiling every shape would not fit the run")
    if not _COMPILED:
        _COMPILED.append(torch.compile(_hf_rope()))
    compiled = _COMPILED[0]
    return lambda q, k, cos, sin, positions: compiled(q, k, cos, sin)


def _fwd_bwd(rope, q, k, dq, dk, tables, fresh_leaves):
    """fn() -> (dq, dk). With fresh_leaves, q and k enter each call as new leaf tensors (same storage): a leaf's
    gradient node remembers the stream it was first used on, and one left over from the eager warm-up on the
    default stream would break the CUDA-graph capture that runs on a side stream."""
    if not fresh_leaves:
        return lambda: torch.autograd.grad(rope(q, k, *tables), (q, k), (dq, dk))

    def run():
        q_leaf, k_leaf = q.detach().requires_grad_(), k.detach().requires_grad_()
        return torch.autograd.grad(rope(q_leaf, k_leaf, *tables), (q_leaf, k_leaf), (dq, dk))

    return run


@pytest.mark.parametrize("op", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens,model,timing", CASES)
def test_rope(measure, device, tokens, model, timing, provider, op):
    cfg = MODELS[model]
    heads, kv_heads, head_dim = cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    shape = {"tokens": tokens, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}
    qk_bytes = 2 * (heads + kv_heads) * tokens * head_dim * DTYPE.itemsize
    op_bytes = qk_bytes if op == "fwd" else 2 * qk_bytes
    graph = timing == "cuda_graph"
    if provider == "copy_floor":
        return measure_copy_floor(measure, f"rope.{op}", op_bytes, shape=shape, dtype=DTYPE, device=device,
                                  timing=timing)
    rope = _rope_fn(provider, tokens, model)
    q = torch.randn(1, tokens, heads, head_dim, device=device, dtype=DTYPE).transpose(1, 2).requires_grad_()
    k = torch.randn(1, tokens, kv_heads, head_dim, device=device, dtype=DTYPE).transpose(1, 2).requires_grad_()
    positions = torch.arange(tokens, device=device)[None]
    inv_freq = 1.0 / THETA ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = positions[..., None].float() * inv_freq
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    cos, sin = cos.to(DTYPE), sin.to(DTYPE)  # HF hands the attention its cos/sin in the activations' dtype
    # A provider that computes something else would make the comparison meaningless. Expected first: Liger
    # rotates q and k in place.
    expected_q = q.float() * cos.float()[:, None] + torch.cat((-q[..., head_dim // 2:], q[..., :head_dim // 2]),
                                                              -1).float() * sin.float()[:, None]
    q_rot, k_rot = rope(q, k, cos, sin, positions)
    torch.testing.assert_close(q_rot.float(), expected_q, atol=3e-2, rtol=2e-2)
    assert k_rot.shape == k.shape
    name = "rope_positions" if provider == "ours.positions" else "rope"
    provider = "ours" if provider == "ours.positions" else provider
    if op == "fwd":
        run = lambda: rope(q, k, cos, sin, positions)  # noqa: E731
    else:
        dq, dk = torch.randn_like(q_rot), torch.randn_like(k_rot)
        run = _fwd_bwd(rope, q, k, dq, dk, (cos, sin, positions), fresh_leaves=graph)
    measure(f"{name}.{op}" if graph else f"{name}.{op}.host_included", provider, run, shape=shape, dtype=DTYPE,
            bytes=op_bytes, cuda_graph=graph)
