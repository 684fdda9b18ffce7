"""Every context-parallel algorithm against single-process attention (fp32 reference path, gloo on CPU).

One spawn per world size; each worker runs all algorithms over dense and packed cases (causal and full,
GQA 28/4 and 4/1, two head dims, documents of random lengths not divisible by 2W and shorter than W) and
compares the gathered output and dq/dk/dv with float64 attention over the unsharded sequence.
"""
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from longvl.parallel import ALGORITHMS, context_parallel_attention, gather, init_cp_mesh, plan_for, shard
from tests.distributed import run_distributed

FP32_TOL = 2e-5  # max abs error of fp32 blocks merged in fp32, inputs ~N(0, 1), outputs O(1)

# (name, q heads, kv heads, head dim, document lengths, causal)
CASES = [
    ("dense_causal_gqa28/4", 28, 4, 8, [37], True),
    ("dense_full_gqa4/1", 4, 1, 16, [32], False),
    ("packed_causal_gqa28/4", 28, 4, 8, [5, 1, 19, 3, 11], True),
    ("packed_causal_gqa4/1_d16", 4, 1, 16, [2, 23, 7], True),
    ("packed_full_gqa4/1", 4, 1, 8, [8, 24, 16], False),
]


def reference(q, k, v, lengths, causal):
    """float64 attention over the whole sequence with a document (and causal) mask."""
    groups = q.shape[2] // k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)))
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = doc[:, None] == doc[None, :]
    if causal:
        mask &= torch.ones_like(mask).tril()
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)


def _check_all(rank, world_size):
    torch.manual_seed(0)
    _, groups = init_cp_mesh("cpu", cp_size=world_size, ulysses_size=2)
    errors = {}
    for name, q_heads, kv_heads, dim, lengths, causal in CASES:
        total = sum(lengths)
        q, dout = torch.randn(2, 1, total, q_heads, dim).unbind(0)
        k, v = torch.randn(2, 1, total, kv_heads, dim).unbind(0)
        full = [x.double().requires_grad_() for x in (q, k, v)]
        out_ref = reference(*full, lengths, causal)
        grads_ref = torch.autograd.grad(out_ref, full, dout.double())
        for algorithm in ALGORITHMS:
            plan = plan_for(lengths, groups, algorithm)
            local = [shard(x, plan, rank).requires_grad_() for x in (q, k, v)]
            out = context_parallel_attention(*local, groups=groups, plan=plan, algorithm=algorithm, causal=causal)
            grads = torch.autograd.grad(out, local, shard(dout, plan, rank))
            err = 0.0
            for got, want in zip((out,) + grads, (out_ref,) + grads_ref):
                got = gather(got.detach(), plan, groups.cp)
                assert torch.isfinite(got).all(), f"{algorithm} {name}: non-finite values"
                err = max(err, (got.double() - want).abs().max().item())
            errors[f"{algorithm}/{name}"] = err
    dist.barrier()
    return errors


def test_algorithms_match_single_process_and_error_does_not_grow_with_world_size():
    by_world = {w: run_distributed(_check_all, w, timeout=150)[0] for w in (2, 4)}
    for world_size, errors in by_world.items():
        print(f"\nW={world_size} max abs error per algorithm/case: " +
              ", ".join(f"{k}={v:.1e}" for k, v in errors.items()))
        bad = {k: v for k, v in errors.items() if not v <= FP32_TOL}
        assert not bad, f"W={world_size}: errors above {FP32_TOL}: {bad}"
    for algorithm in ALGORITHMS:  # worst case over all cases, per algorithm: at most 2x from W=2 to W=4
        worst = {w: max(v for k, v in errors.items() if k.startswith(algorithm + "/"))
                 for w, errors in by_world.items()}
        assert worst[4] <= 2 * worst[2], f"{algorithm}: error grows with W: {worst}"


def _one_rank_skips_the_ring(rank, world_size):
    _, groups = init_cp_mesh("cpu", cp_size=world_size)
    if rank == 1:  # rank 1 never joins (but stays alive): rank 0 waits on a receive that cannot complete
        time.sleep(60)
    else:
        q = torch.randn(1, 8, 2, 4)
        plan = plan_for(16, groups, "ring")
        context_parallel_attention(q, q[:, :, :1], q[:, :, :1], groups=groups, plan=plan, algorithm="ring")


def test_hung_collective_fails_within_timeout():
    with pytest.raises(TimeoutError):
        run_distributed(_one_rank_skips_the_ring, 2, timeout=5)


def test_automatic_choice():
    from longvl.parallel import CPGroups, choose_algorithm

    groups = lambda ring, ulysses: CPGroups(None, None, None, ring, ulysses)
    assert choose_algorithm(groups(1, 4), 28, 4) == "ulysses"
    assert choose_algorithm(groups(2, 1), 4, 1) == "ulysses"  # KV head replicated
    assert choose_algorithm(groups(2, 4), 28, 4) == "hybrid_ring"  # 28 heads do not split 8 ways
    assert choose_algorithm(groups(8, 1), 28, 4) == "ring"
    with pytest.raises(ValueError, match="q_heads"):
        choose_algorithm(groups(2, 1), None, None)


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("lengths", [[301, 7, 1029, 1], [1001]], ids=["packed", "dense"])
def test_full_attention_over_padded_documents_is_refused(world, algorithm, lengths):
    """Real queries would attend to the pad keys: the plan says so and attention refuses before any exchange
    (no process group is needed to get the error). Causal attention over the same plans is exact (above)."""
    from longvl.parallel import CPGroups

    ulysses = 2 if algorithm.startswith("hybrid") else (world if algorithm == "ulysses" else 1)
    groups = CPGroups(None, None, None, world // ulysses, ulysses)
    plan = plan_for(lengths, groups, algorithm)
    assert plan.padded
    q = torch.randn(1, plan.local_len, 8, 16)
    k = torch.randn(1, plan.local_len, 8, 16)
    with pytest.raises(ValueError, match="not exact: real tokens would attend to the padding"):
        context_parallel_attention(q, k, k, groups=groups, plan=plan, algorithm=algorithm, causal=False)


def test_a_plan_for_another_layout_or_length_is_refused():
    from longvl.parallel import CPGroups

    groups = CPGroups(None, None, None, 2, 2)
    ring_plan = plan_for([40, 24], groups, "ring")
    q = torch.randn(1, ring_plan.local_len, 8, 16)
    with pytest.raises(ValueError, match="make the plan with plan_for"):
        context_parallel_attention(q, q, q, groups=groups, plan=ring_plan, algorithm="hybrid_ring")
    with pytest.raises(ValueError, match="shard them with shard"):
        context_parallel_attention(q[:, :3], q[:, :3], q[:, :3], groups=groups, plan=ring_plan, algorithm="ring")
