"""Context-parallel attention (Ulysses, zigzag ring, all-gather KV, hybrid) for dense and packed sequences.

    mesh, groups = init_cp_mesh("cuda", cp_size=4, ulysses_size=2)
    plan = plan_for(doc_lengths, groups, "hybrid_ring")
    q = shard(q_full, plan, groups.rank)                  # also k, v, position ids, labels (-100), weights (0)
    out = context_parallel_attention(q, k, v, groups=groups, plan=plan, algorithm="hybrid_ring")
Layout: (batch, sequence, heads, head_dim); packed batches have batch 1.
"""
from longvl.parallel.attention import ALGORITHMS, choose_algorithm, context_parallel_attention, plan_for
from longvl.parallel.block_attention import attention_backward, attention_forward
from longvl.parallel.mesh import CPGroups, init_cp_mesh
from longvl.parallel.sharding import LocalDocs, ShardPlan, gather, plan_sequence, shard, unshard

__all__ = ["ALGORITHMS", "CPGroups", "LocalDocs", "ShardPlan", "attention_backward", "attention_forward",
           "choose_algorithm", "context_parallel_attention", "gather", "init_cp_mesh", "plan_for",
           "plan_sequence", "shard", "unshard"]
