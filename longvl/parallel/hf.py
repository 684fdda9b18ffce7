"""Context-parallel attention inside Hugging Face models, without touching their modelling code.

Importing this module registers `ATTENTION_NAME` in transformers' `AttentionInterface`; a model whose
(text) config has `_attn_implementation = ATTENTION_NAME` then sends every attention call here. The call
carries no CP information, so the trainer states it around the forward and backward:

    with cp_context(groups, algorithm="ring", cu_seqlens=plan.cu_seqlens(device)):
        loss = model(input_ids=shard(ids, plan, rank), position_ids=shard(pos, plan, rank), ...).loss
        loss.backward()

Inputs, position ids and shifted labels must be sharded with the same plan (`longvl.parallel.plan_for`); the model's
own attention mask is ignored (documents come from `cu_seqlens`, causality from the module). Vision
encoders with full attention over their own images should keep a local implementation ("sdpa").
"""
import contextlib
import dataclasses

from transformers import AttentionInterface

from longvl.parallel.attention import context_parallel_attention
from longvl.parallel.mesh import CPGroups

ATTENTION_NAME = "longvl_context_parallel"


@dataclasses.dataclass
class _CPState:
    groups: CPGroups
    algorithm: str
    cu_seqlens: object
    backend: str


_ACTIVE: list = []


@contextlib.contextmanager
def cp_context(groups: CPGroups, algorithm="auto", cu_seqlens=None, backend="auto"):
    """Route `ATTENTION_NAME` attention calls through context parallelism over `groups` inside the block."""
    _ACTIVE.append(_CPState(groups, algorithm, cu_seqlens, backend))
    try:
        yield
    finally:
        _ACTIVE.pop()


def cp_attention_forward(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None,
                         is_causal=None, **kwargs):
    """transformers attention function: q, k, v (B, H, S_local, D) -> ((B, S_local, H, D), None)."""
    if not _ACTIVE:
        raise RuntimeError(f"attention implementation {ATTENTION_NAME!r} called outside longvl.parallel.hf.cp_context")
    if dropout:
        raise ValueError("context-parallel attention does not implement attention dropout")
    if kwargs.get("sliding_window") is not None:
        raise ValueError("context-parallel attention does not implement sliding-window attention")
    state = _ACTIVE[-1]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = context_parallel_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                     groups=state.groups, algorithm=state.algorithm, causal=causal,
                                     cu_seqlens=state.cu_seqlens, scale=scaling, backend=state.backend)
    return out, None


AttentionInterface.register(ATTENTION_NAME, cp_attention_forward)
