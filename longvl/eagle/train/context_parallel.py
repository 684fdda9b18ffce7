"""Context-parallel sharding of a packed batch and the attention the LLM runs on it, for one stage.

Each step the full packed sequence is cut with parallel/'s plan for the stage's algorithm (zigzag per
document; documents padded to multiples of 2 x cp, pads unsupervised), and the LLM's attention layers run
`parallel`'s context-parallel attention on the local shard through transformers' AttentionInterface
(longvl.parallel.hf). The same path serves cp = 1: packed documents then get varlen attention that never crosses
documents. The sequence structure is stated around the forward AND the backward (activation checkpointing
recomputes attention during backward).
"""
from __future__ import annotations

import torch

from longvl.parallel.attention import plan_for, resolve
from longvl.parallel.hf import ATTENTION_NAME, cp_context
from longvl.parallel.sharding import shard as shard_sequence


def install_attention(model) -> None:
    """Route the language model's attention through context parallelism (the vision tower keeps sdpa)."""
    model.language_model.config._attn_implementation = ATTENTION_NAME
    model.config.text_config._attn_implementation = ATTENTION_NAME


class StageAttention:
    """Shards batches for this rank and provides the attention context of one stage."""

    def __init__(self, stage_mesh, stage, text_config, image_token_index: int):
        self.groups = stage_mesh.groups
        self.cp_rank = stage_mesh.cp_rank
        self.image_token_index = image_token_index
        self.algorithm = resolve(stage.cp_algorithm, self.groups, text_config.num_attention_heads,
                                 text_config.num_key_value_heads)

    def shard(self, batch: dict, device: torch.device) -> dict:
        """This rank's slice of every per-token tensor, plus `image_index` (global feature row per token)."""
        input_ids = batch["input_ids"]
        is_image = input_ids == self.image_token_index
        slots, rows = int(is_image.sum()), batch["num_image_rows"]
        if slots != rows:
            raise ValueError(f"pack has {slots} <IMG_CONTEXT> tokens but its {batch['pixel_values'].shape[0]} "
                             f"tiles give {rows} feature rows: processor and model disagree on tokens per tile")
        image_index = torch.where(is_image, is_image.long().cumsum(-1) - 1, torch.full_like(input_ids, -1))
        plan = plan_for(batch["cu_seqlens"], self.groups, self.algorithm)
        pieces = {"input_ids": (input_ids, 0), "position_ids": (batch["position_ids"], 0),
                  "labels": (batch["shift_labels"], -100), "loss_weights": (batch["loss_weights"], 0),
                  "image_index": (image_index, -1)}
        inputs = {name: shard_sequence(x, plan, self.cp_rank, dim=1, pad_value=pad).to(device, non_blocking=True)
                  for name, (x, pad) in pieces.items()}
        inputs["pixel_values"] = batch["pixel_values"].to(device, non_blocking=True)
        cu_seqlens = plan.cu_seqlens(device)
        return {"inputs": inputs, "cu_seqlens": cu_seqlens}

    def active(self, shard: dict):
        """Context in which the LLM's attention sees `shard`'s sequence structure (forward and backward)."""
        return cp_context(self.groups, algorithm=self.algorithm, cu_seqlens=shard["cu_seqlens"])
