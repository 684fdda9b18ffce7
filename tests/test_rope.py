"""RoPE against a float64 reference: q and k outputs and gradients, both layouts, GQA and a single KV head,
partial rotary dims, head dims that are not a power of two (odd ones included), HF cos/sin or in-kernel angles
from position_ids (restarting, arbitrary, large), NaN propagation and bad input. CPU sizes are small
(interpreter); on a GPU the same tests run at real sizes."""
import pytest
import torch

from longvl.kernels.rope import apply_rope

# (atol, rtol) per dtype: the rotation runs in fp32 and rounds once.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}
THETA = 10000.0


def _seq_len(device):
    return 9 if device.type == "cpu" else 4096


def _inv_freq(rotary_dim):
    """HF's fp32 inverse frequencies."""
    return 1.0 / (THETA ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


def _tables(positions, rotary_dim):
    """HF-style cos/sin (..., S, rotary_dim) in float64 from the fp32 angle HF computes (the kernel's angle too)."""
    angles = (positions[..., None].float().cpu() * _inv_freq(rotary_dim)).double()
    emb = torch.cat((angles, angles), -1)
    return emb.cos().to(positions.device), emb.sin().to(positions.device)


def _reference(x, cos, sin, layout, rotary_dim):
    """HF's rotate-half formula in float64 on the first rotary_dim features; the rest passes through."""
    x = x.double()
    cos, sin = cos.double(), sin.double()
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = (cos[:, None], sin[:, None]) if layout == "bhsd" else (cos[:, :, None], sin[:, :, None])
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated_half = torch.cat((-rot[..., half:], rot[..., :half]), -1)
    return torch.cat((rot * cos + rotated_half * sin, rest), -1)


def _make_qk(batch, seq, q_heads, k_heads, head_dim, layout, dtype, device):
    def make(heads):
        shape = (batch, heads, seq, head_dim) if layout == "bhsd" else (batch, seq, heads, head_dim)
        return torch.randn(shape, device=device, dtype=dtype, requires_grad=True)

    return make(q_heads), make(k_heads)


def _check(q, k, q_rot, k_rot, cos, sin, layout, rotary_dim, dtype):
    """Outputs and both gradients against the float64 reference."""
    atol, rtol = TOLERANCES[dtype]
    dq, dk = torch.randn_like(q_rot), torch.randn_like(k_rot)
    got = torch.autograd.grad((q_rot, k_rot), (q, k), (dq, dk))
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    q_ref, k_ref = _reference(q64, cos, sin, layout, rotary_dim), _reference(k64, cos, sin, layout, rotary_dim)
    expected = torch.autograd.grad((q_ref, k_ref), (q64, k64), (dq.double(), dk.double()))
    for name, g, e in [("q", q_rot, q_ref), ("k", k_rot, k_ref), ("dq", got[0], expected[0]),
                       ("dk", got[1], expected[1])]:
        assert g.dtype == dtype and g.shape == e.shape, name
        torch.testing.assert_close(g.double(), e.detach(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout,heads,rotary_dim", [("bhsd", (28, 4), None), ("bshd", (6, 1), 16)])
@pytest.mark.parametrize("source", ["cos_sin", "shared_cos_sin", "positions"])
def test_matches_float64_reference(device, dtype, layout, heads, rotary_dim, source):
    batch, seq, head_dim = 2, _seq_len(device), 32 if device.type == "cpu" else 128
    rotary_dim = rotary_dim or head_dim
    q, k = _make_qk(batch, seq, *heads, head_dim, layout, dtype, device)
    positions = torch.randint(0, 4 * seq, (batch, seq), device=device)
    if source == "positions":
        cos, sin = _tables(positions, rotary_dim)
        q_rot, k_rot = apply_rope(q, k, position_ids=positions, theta=THETA, layout=layout, rotary_dim=rotary_dim)
    else:
        # (B, S, R) fp32 tables, or (S, R) shared by the batch in the activations' dtype as HF hands them.
        shared = source == "shared_cos_sin"
        table_dtype = dtype if shared else torch.float32
        cos, sin = (t.to(table_dtype) for t in _tables(positions[0] if shared else positions, rotary_dim))
        q_rot, k_rot = apply_rope(q, k, cos, sin, layout=layout, rotary_dim=rotary_dim)
    _check(q, k, q_rot, k_rot, cos, sin, layout, rotary_dim, dtype)


def _hf_tables(positions, head_dim):
    """cos/sin as HF's rotary embedding builds them for any head dim: fp32 angles pos * theta^(-2i / D) for
    i < ceil(D / 2), the two halves equal (width D + 1 for an odd D), in float64."""
    inv_freq = 1.0 / (THETA ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = (positions[..., None].float().cpu() * inv_freq).double()
    emb = torch.cat((angles, angles), -1)
    return emb.cos().to(positions.device), emb.sin().to(positions.device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim, source", [(92, "rotary_table"), (92, "positions"), (72, "positions")] + [
    (odd, source) for odd in (41, 15) for source in ("hf_table", "rotary_table", "positions")])
def test_head_dims_that_are_not_a_power_of_two(device, dtype, head_dim, source):
    """Masked lanes past the half (92 -> 46 of 64) and odd head dims, with uneven head counts: an odd D rotates
    its first D - 1 features with the first (D - 1) / 2 angles of HF's table for D, as Liger-Kernel does (its
    test shape 9 x 7 tokens, 41 heads of 41), and passes the last feature through."""
    batch, seq, heads = (9, 7, (41, 41)) if head_dim == 41 else (2, _seq_len(device), (73, 13))
    if device.type == "cpu" and head_dim == 41:
        batch, heads = 2, (5, 3)
    rotary_dim = head_dim - head_dim % 2
    q, k = _make_qk(batch, seq, *heads, head_dim, "bhsd", dtype, device)
    positions = torch.randint(0, 4 * seq, (batch, seq), device=device)
    hf_cos, hf_sin = _hf_tables(positions, head_dim)
    half = rotary_dim // 2
    cos, sin = (torch.cat((t[..., :half], t[..., :half]), -1) for t in (hf_cos, hf_sin))  # the angles used
    if source == "positions":
        q_rot, k_rot = apply_rope(q, k, position_ids=positions, theta=THETA)
    else:
        tables = (hf_cos, hf_sin) if source == "hf_table" else (cos, sin)
        q_rot, k_rot = apply_rope(q, k, *(t.float() for t in tables))
    _check(q, k, q_rot, k_rot, cos, sin, "bhsd", rotary_dim, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [72, 92, 41])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_head_dims_that_are_not_a_power_of_two_at_16k_tokens_on_gpu(head_dim, layout):
    """16K tokens of Qwen2.5-7B's 28 / 4 heads in bf16 with head dims that pad (72, 92) or are odd (41)."""
    seq = 16384
    rotary_dim = head_dim - head_dim % 2
    q, k = _make_qk(1, seq, 28, 4, head_dim, layout, torch.bfloat16, "cuda")
    positions = torch.arange(seq, device="cuda")[None]
    hf_cos, hf_sin = _hf_tables(positions, head_dim)
    half = rotary_dim // 2
    cos, sin = (torch.cat((t[..., :half], t[..., :half]), -1) for t in (hf_cos, hf_sin))
    for q_rot, k_rot in (apply_rope(q, k, position_ids=positions, theta=THETA, layout=layout),
                         apply_rope(q, k, hf_cos.float(), hf_sin.float(), layout=layout)):
        _check(q, k, q_rot, k_rot, cos, sin, layout, rotary_dim, torch.bfloat16)


def test_packed_documents_and_arbitrary_positions(device):
    """Positions restarting per packed document, a zigzag-like shuffle, and large positions (long context)."""
    seq, head_dim = _seq_len(device), 64
    restart = torch.cat([torch.arange(n) for n in (seq // 3, seq // 3, seq - 2 * (seq // 3))])
    shuffled = torch.randperm(seq) * 7
    large = torch.arange(seq) + 131_000
    positions = torch.stack([restart, shuffled, large]).to(device)
    q, k = _make_qk(3, seq, 4, 1, head_dim, "bshd", torch.float32, device)
    q_rot, k_rot = apply_rope(q, k, position_ids=positions, theta=THETA, layout="bshd")
    cos, sin = _tables(positions, head_dim)
    _check(q, k, q_rot, k_rot, cos, sin, "bshd", head_dim, torch.float32)
    # The same rotation from HF-style tables: one path, two ways of giving the angles.
    q_tab, k_tab = apply_rope(q, k, cos.float(), sin.float(), layout="bshd")
    torch.testing.assert_close(q_tab, q_rot, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_tab, k_rot, atol=1e-5, rtol=1e-5)


def test_hf_strided_views_and_inputs_untouched(device):
    """HF's q is a transposed view of the projection; the result matches HF's apply_rotary_pos_emb."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    seq, head_dim = _seq_len(device), 32
    q = torch.randn(2, seq, 6, head_dim, device=device).transpose(1, 2)
    k = torch.randn(2, seq, 2, head_dim, device=device).transpose(1, 2)
    q_before, k_before = q.clone(), k.clone()
    cos, sin = (t.float() for t in _tables(torch.arange(seq, device=device)[None].expand(2, seq), head_dim))
    q_rot, k_rot = apply_rope(q, k, cos, sin)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(q_rot, q_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_rot, k_hf, atol=1e-5, rtol=1e-5)
    assert torch.equal(q, q_before) and torch.equal(k, k_before)


def test_gradient_for_one_input_only(device):
    seq = _seq_len(device)
    q = torch.randn(1, 3, seq, 16, device=device, requires_grad=True)
    k = torch.randn(1, 1, seq, 16, device=device)
    q_rot, k_rot = apply_rope(q, k, position_ids=torch.arange(seq, device=device)[None], theta=THETA)
    (q_rot.sum() + k_rot.sum()).backward()
    cos, sin = _tables(torch.arange(seq, device=device)[None], 16)
    q64 = q.detach().double().requires_grad_()
    _reference(q64, cos, sin, "bhsd", 16).sum().backward()
    torch.testing.assert_close(q.grad.double(), q64.grad, atol=1e-5, rtol=1e-5)


def test_nan_propagates(device):
    seq = _seq_len(device)
    q = torch.randn(1, 2, seq, 8, device=device)
    k = torch.randn(1, 1, seq, 8, device=device)
    q[0, 1, 2, 3] = float("nan")
    q_rot, k_rot = apply_rope(q, k, position_ids=torch.arange(seq, device=device)[None], theta=THETA)
    assert torch.isnan(q_rot[0, 1, 2, 3]) and torch.isnan(q_rot[0, 1, 2, 7])  # the pair (3, 3 + 4) mixes
    assert torch.isfinite(k_rot).all() and torch.isfinite(q_rot[0, 0]).all()


def test_bad_input_raises_clear_errors(device):
    q = torch.randn(1, 4, 5, 16, device=device)
    k = torch.randn(1, 2, 5, 16, device=device)
    cos = torch.randn(1, 5, 16, device=device)
    positions = torch.arange(5, device=device)[None]
    with pytest.raises(ValueError, match=r"rotary_dim must be even and in \(0, head_dim=1\], got 0"):
        apply_rope(q[..., :1], k[..., :1], position_ids=positions, theta=THETA)
    with pytest.raises(ValueError, match=r"expected \(1 or 1, 5, 14 or 16\)"):
        apply_rope(q[..., :15], k[..., :15], cos[..., :15], cos[..., :15])
    with pytest.raises(ValueError, match="must agree on batch, sequence and head_dim"):
        apply_rope(q, k[:, :, :4], position_ids=positions, theta=THETA)
    with pytest.raises(TypeError, match="q has dtype torch.float64"):
        apply_rope(q.double(), k, position_ids=positions, theta=THETA)
    with pytest.raises(ValueError, match="must share dtype"):
        apply_rope(q, k.half(), position_ids=positions, theta=THETA)
    with pytest.raises(ValueError, match="q is on meta"):
        apply_rope(torch.empty(1, 4, 5, 16, device="meta"), k, position_ids=positions, theta=THETA)
    with pytest.raises(ValueError, match="cos has shape"):
        apply_rope(q, k, cos[:, :4], cos[:, :4])
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        apply_rope(q, k, position_ids=positions, theta=THETA, rotary_dim=7)
    with pytest.raises(ValueError, match="position_ids has shape"):
        apply_rope(q, k, position_ids=positions[:, :4], theta=THETA)
    with pytest.raises(ValueError, match="both position_ids and theta"):
        apply_rope(q, k, position_ids=positions)
    with pytest.raises(ValueError, match="both cos and sin"):
        apply_rope(q, k, cos)
    with pytest.raises(ValueError, match="not both"):
        apply_rope(q, k, cos, cos, position_ids=positions, theta=THETA)
    with pytest.raises(ValueError, match="requires grad"):
        apply_rope(q, k, cos.requires_grad_(), cos)
    with pytest.raises(ValueError, match="layout"):
        apply_rope(q, k, position_ids=positions, theta=THETA, layout="sbhd")
    with pytest.raises(ValueError, match="4-D"):
        apply_rope(q[0], k[0], position_ids=positions, theta=THETA)
