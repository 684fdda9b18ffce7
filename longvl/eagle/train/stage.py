"""One stage of progressive training as one object: its settings, its mesh, its context-parallel layout.

A `Stage` is built when the stage starts and handed to every step. It cuts each packed batch for this rank
(`shard`) and says how the language model's attention sees the sequence (`sequence`), so nothing about the
stage travels through globals.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from longvl.eagle.data.batch import PackedBatch
from longvl.eagle.train.config import StageConfig
from longvl.eagle.train.parallel_dims import StageMesh, build_stage_mesh
from longvl.parallel.attention import plan_for, resolve
from longvl.parallel.hf import CPSequence


@dataclasses.dataclass
class Stage:
    config: StageConfig
    mesh: StageMesh
    algorithm: str      # the context-parallel algorithm "auto" resolved to for this model and mesh
    steps: int          # optimizer steps in the stage

    @classmethod
    def build(cls, config: StageConfig, fsdp_mesh, text_config, mesh: StageMesh | None = None) -> Stage:
        """The stage on a new mesh, or on `mesh` (one built earlier for the same cp and ulysses degrees)."""
        mesh = mesh or build_stage_mesh(fsdp_mesh, config.cp, config.ulysses)
        algorithm = resolve(config.cp_algorithm, mesh.groups, text_config.num_attention_heads,
                            text_config.num_key_value_heads)
        return cls(config, mesh, algorithm, stage_steps(config, mesh.dp))

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def cp(self) -> int:
        return self.config.cp

    def describe(self) -> str:
        layout = f"cp {self.cp} ({self.algorithm})" if self.cp > 1 else "no context parallelism"
        return (f"stage {self.name}: max_length {self.config.max_length}, {layout}, dp {self.mesh.dp}, "
                f"{self.steps} steps")

    def shard(self, batch: PackedBatch, device: torch.device) -> PackedBatch:
        """This rank's part of the pack (zigzag per document, padded to the layout the algorithm needs)."""
        plan = plan_for(batch.cu_seqlens, self.mesh.groups, self.algorithm)
        return batch.shard(plan, self.mesh.cp_rank, device)

    def sequence(self, shard: PackedBatch) -> CPSequence:
        """The sequence layout the language model's context-parallel attention takes for `shard`."""
        return CPSequence(self.mesh.groups, shard.plan, self.algorithm)

    def learning_rate(self, step: int) -> float:
        return learning_rate(self.config, step, self.steps)


def stage_steps(stage: StageConfig, dp: int) -> int:
    if stage.steps is not None:
        return int(stage.steps)
    return max(1, math.ceil(stage.tokens / (stage.max_length * dp)))


def learning_rate(stage: StageConfig, step: int, total: int) -> float:
    """Linear warmup over `warmup_fraction` of the stage, then cosine down to `min_lr_ratio` x lr."""
    warmup = math.ceil(stage.warmup_fraction * total)
    if step < warmup:
        return stage.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = stage.lr * stage.min_lr_ratio
    return floor + (stage.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
