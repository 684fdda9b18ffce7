"""Context-parallel attention inside Hugging Face models, without touching their modelling code.

Importing this module registers `ATTENTION_NAME` in transformers' `AttentionInterface`; a model whose
(text) config has `_attn_implementation = ATTENTION_NAME` then sends every attention call here. transformers
hands the keyword arguments of the model's forward down to its attention functions, so the sequence
structure travels with the call that needs it, and activation checkpointing replays it in backward:

    sequence = CPSequence(groups, plan, algorithm="ring")
    loss = model(input_ids=shard(ids, plan, rank), position_ids=shard(pos, plan, rank), ...,
                 context_parallel=sequence).loss
    loss.backward()

Inputs, position ids and shifted labels must be sharded with the same plan (`longvl.parallel.plan_for`); the
model's own attention mask is ignored (documents come from the plan, causality from the module). Vision
encoders with full attention over their own images should keep a local implementation ("sdpa").
"""
import dataclasses

from transformers import AttentionInterface

from longvl.parallel.attention import context_parallel_attention
from longvl.parallel.mesh import CPGroups
from longvl.parallel.sharding import ShardPlan

ATTENTION_NAME = "longvl_context_parallel"
KWARG = "context_parallel"


@dataclasses.dataclass(frozen=True)
class CPSequence:
    """How one forward's sequence is laid out over the context-parallel group (`plan_for` made the plan)."""
    groups: CPGroups
    plan: ShardPlan                          # how the sequence was sharded (`plan_for(..., algorithm)`)
    algorithm: str = "auto"
    backend: str = "auto"                    # single-GPU attention backend (parallel.block_attention)


def cp_attention_forward(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None,
                         is_causal=None, context_parallel: CPSequence | None = None, **kwargs):
    """transformers attention function: q, k, v (B, H, S_local, D) -> ((B, S_local, H, D), None)."""
    if context_parallel is None:
        raise ValueError(f"attention implementation {ATTENTION_NAME!r} needs the sequence layout: call the model "
                         f"with {KWARG}=CPSequence(groups, plan, algorithm)")
    if dropout:
        raise ValueError("context-parallel attention does not implement attention dropout")
    if kwargs.get("sliding_window") is not None:
        raise ValueError("context-parallel attention does not implement sliding-window attention")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = context_parallel_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                     groups=context_parallel.groups, plan=context_parallel.plan,
                                     algorithm=context_parallel.algorithm, causal=causal, scale=scaling,
                                     backend=context_parallel.backend)
    return out, None


AttentionInterface.register(ATTENTION_NAME, cp_attention_forward)
