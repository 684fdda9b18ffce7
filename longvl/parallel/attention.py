"""Public entry: context-parallel attention by algorithm name, and the automatic choice.

Algorithms: "ring" (zigzag ring over all CP ranks), "allgather" (Llama3 all-gather KV over all CP ranks),
"ulysses" (all-to-all over all CP ranks), "hybrid_ring" / "hybrid_allgather" (Ulysses over the mesh's
ulysses dim, then ring / all-gather over its ring dim). The algorithm fixes how tokens are laid out over
ranks, so shard inputs with `plan_for(...)` using the same algorithm.

Automatic choice ("auto", `choose_algorithm`): Ulysses wherever it applies, because after its all-to-all one
long attention call per document does all the work (the most efficient shape a kernel has), while ring /
all-gather split it into W smaller blocks with fp32 merges whose per-step work is too small to hide at short
lengths. It needs the query heads divisible by the CP size (and KV heads dividing or divisible by it);
otherwise the hybrid (Ulysses over the mesh's Ulysses dim, zigzag ring across) when that dim is > 1, else the
zigzag ring. The measurements behind this order are in bench/results/cp_attention_w*.json (python -m bench.report).
"""
import dataclasses

from longvl.parallel.allgather import allgather_attention
from longvl.parallel.block_attention import block_attention
from longvl.parallel.mesh import CPGroups
from longvl.parallel.ring import ring_attention
from longvl.parallel.sharding import LocalDocs, plan_sequence
from longvl.parallel.ulysses import ulysses_attention

ALGORITHMS = ("ring", "allgather", "ulysses", "hybrid_ring", "hybrid_allgather")


def _ulysses_fits(size, q_heads, kv_heads):
    return q_heads % size == 0 and (kv_heads % size == 0 or size % kv_heads == 0)


def choose_algorithm(groups: CPGroups, q_heads, kv_heads):
    """The default algorithm for these heads on this CP group (measurements in the module docstring)."""
    if q_heads is None or kv_heads is None:
        raise ValueError("algorithm='auto' needs q_heads and kv_heads to choose")
    if groups.size > 1 and _ulysses_fits(groups.size, q_heads, kv_heads):
        return "ulysses"
    if groups.ulysses_size > 1 and _ulysses_fits(groups.ulysses_size, q_heads, kv_heads):
        return "hybrid_ring"
    return "ring"


def _layout(algorithm, groups: CPGroups) -> CPGroups:
    """The (ring, ulysses) split an algorithm uses on the CP group."""
    if algorithm in ("ring", "allgather"):
        return dataclasses.replace(groups, ring=groups.cp, ulysses=None, ring_size=groups.size, ulysses_size=1)
    if algorithm == "ulysses":
        return dataclasses.replace(groups, ring=None, ulysses=groups.cp, ring_size=1, ulysses_size=groups.size)
    return groups


def resolve(algorithm, groups, q_heads, kv_heads):
    if algorithm == "auto":
        algorithm = choose_algorithm(groups, q_heads, kv_heads)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown context-parallel algorithm {algorithm!r}; choose from {ALGORITHMS} or 'auto'")
    return algorithm


def plan_for(lengths, groups: CPGroups, algorithm, q_heads=None, kv_heads=None):
    """Sharding plan matching `algorithm` on `groups` (lengths: an int, document lengths or cu_seqlens;
    the heads are needed for "auto")."""
    algorithm = resolve(algorithm, groups, q_heads, kv_heads)
    return plan_sequence(lengths, groups.size, _layout(algorithm, groups).ulysses_size)


def context_parallel_attention(q, k, v, *, groups: CPGroups, plan, algorithm="auto", causal=True, scale=None,
                               backend="auto"):
    """Attention of this rank's queries over the whole (packed) sequence spread over the CP group.

    q (B, S_local, Hq, D), k and v (B, S_local, Hkv, D), sharded with `plan` (from `plan_for(..., algorithm)`;
    packed batches have B == 1). Full attention (`causal=False`) needs every document length to be a multiple
    of 2 x the CP size: padding would be attended to, so a padded plan is refused. Returns (B, S_local, Hq, D).
    Differentiable in q, k and v.
    """
    algorithm = resolve(algorithm, groups, q.shape[2], k.shape[2])
    layout = _layout(algorithm, groups)
    if (plan.ring_size, plan.ulysses_size) != (layout.ring_size, layout.ulysses_size):
        raise ValueError(f"the plan splits the sequence over ring {plan.ring_size} x ulysses {plan.ulysses_size} "
                         f"ranks, but {algorithm} on this group uses ring {layout.ring_size} x ulysses "
                         f"{layout.ulysses_size}: make the plan with plan_for(lengths, groups, {algorithm!r})")
    if q.shape[1] != plan.local_len or k.shape[1] != plan.local_len:
        raise ValueError(f"q and k hold {q.shape[1]} / {k.shape[1]} tokens per rank, the plan {plan.local_len}: "
                         f"shard them with shard(x, plan, rank)")
    if not causal:
        plan.check_full_attention()
    cu_seqlens = plan.cu_seqlens(q.device)
    across_ring = allgather_attention if algorithm.endswith("allgather") else ring_attention

    # Two levels (USP): Ulysses over the mesh's neighbouring ranks turns each rank's shard into its ring rank's
    # whole zigzag-local sequence for H/U heads (`sharding` makes a ring rank's U shards contiguous), then the
    # ring or all-gather algorithm runs across ring ranks on those heads. Either level may be of size 1.
    def over_ring(q, k, v):
        docs = LocalDocs.build(q.shape[1], layout.ring_size, cu_seqlens, q.device)
        if layout.ring_size == 1:
            return block_attention(q, k, v, causal=causal, scale=scale, varlen=docs.varlen(2, 2), backend=backend)
        return across_ring(q, k, v, layout.ring, docs, causal=causal, scale=scale, backend=backend)

    if layout.ulysses_size == 1:
        return over_ring(q, k, v)
    return ulysses_attention(q, k, v, layout.ulysses, layout.ulysses_size, over_ring)
