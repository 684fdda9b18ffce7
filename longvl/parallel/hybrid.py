"""Two-level (USP) context parallelism: Ulysses over neighbouring ranks, ring or all-gather KV across them.

The Ulysses all-to-all turns each rank's sequence shard into its ring rank's whole zigzag-local sequence for
H/U heads (the layout in `sharding` makes the U shards of a ring rank contiguous), then the inner algorithm
runs over the ring group on those heads, and the output goes back by all-to-all. With U = 1 this is the
plain inner algorithm; with ring size 1 it is plain Ulysses.
"""
from longvl.parallel.allgather import allgather_attention
from longvl.parallel.local import local_attention
from longvl.parallel.ring import ring_attention
from longvl.parallel.sharding import LocalDocs
from longvl.parallel.ulysses import ulysses_attention

INNER = ("ring", "allgather")


def hybrid_attention(q, k, v, groups, *, inner="ring", causal=True, scale=None, cu_seqlens=None,
                     backend="auto"):
    """Context-parallel attention over `groups` (a `CPGroups`): Ulysses, then `inner` over the ring group."""
    if inner not in INNER:
        raise ValueError(f"inner algorithm must be one of {INNER}, got {inner!r}")

    def over_ring(q, k, v):
        docs = LocalDocs.build(q.shape[1], groups.ring_size, cu_seqlens, q.device)
        if groups.ring_size == 1:
            return local_attention(q, k, v, causal=causal, scale=scale, varlen=docs.varlen(2, 2), backend=backend)
        algorithm = ring_attention if inner == "ring" else allgather_attention
        return algorithm(q, k, v, groups.ring, docs, causal=causal, scale=scale, backend=backend)

    if groups.ulysses_size == 1:
        return over_ring(q, k, v)
    return ulysses_attention(q, k, v, groups.ulysses, groups.ulysses_size, over_ring)
