"""`PackedBatch`: one packed training sequence, as the collator makes it and the model and the loss consume it.

Created once per pack by `collate_pack`; under context parallelism each rank takes its part with
`PackedBatch.shard(plan, rank, device)`, which cuts every per-token field with the same plan and keeps the
tiles whole (every rank runs the vision tower on its share and gathers the rest, see the model's
`packed_loss`). Nothing else reshapes it.
"""
from __future__ import annotations

import dataclasses

import torch

from longvl.parallel.sharding import ShardPlan, shard

IGNORE_INDEX = -100


@dataclasses.dataclass
class PackStats:
    """What a pack holds, for metrics and logs (not read by the model)."""
    doc_lengths: list        # tokens of each real document (the padding document not included)
    tokens: int              # tokens of the real documents
    padding_tokens: int      # tokens of the trailing padding document (0 when none)
    supervised_tokens: int   # positions with a target
    images: int              # image blocks (an image's tiles and thumbnail count once)
    frames: int              # video frames (one tile each)
    tiles: int               # vision tiles: image tiles, thumbnails and frames
    degraded: int            # documents whose visual content degrade sampling reduced
    bad_samples: list        # samples skipped while making this pack: {dataset, id, reason, detail}
    worker_seconds: float    # reading and processing time in the loader worker
    doc_keys: list           # (dataset, record id) of every document, in order

    @property
    def docs(self) -> int:
        return len(self.doc_lengths)


@dataclasses.dataclass
class PackedBatch:
    """One packed sequence of whole documents (batch size 1), every per-token tensor of shape (1, L).

    input_ids       token ids, documents back to back, then an optional padding document
    position_ids    positions restarting at 0 in every document (RoPE and attention never cross documents)
    target_ids      the token each position predicts, shifted inside its document; IGNORE_INDEX where
                    nothing is supervised, at every document's last position and in padding
    loss_weights    fp32 square-root averaged weight of each target (sum 1 over a pack; 0 where ignored):
                    the pack's loss is sum(weight x token cross-entropy)
    feature_index   for each `<IMG_CONTEXT>` token the row of the pack's image features it receives
                    (tiles in token order, `tokens_per_tile` rows each), -1 for every other token
    cu_seqlens      int32 document boundaries (docs + 1,); after `shard`, the plan's padded boundaries, or None
                    for a single document
    pixel_values    (tiles, 3, s, s) every tile of the pack in token order (also after `shard`)
    stats           `PackStats`
    resume_state    the sampler's position after this pack (the loader keeps it for checkpoints)
    plan            after `shard`: how the pack is laid out over the context-parallel ranks (attention takes it)
    """
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    target_ids: torch.Tensor
    loss_weights: torch.Tensor
    feature_index: torch.Tensor
    cu_seqlens: torch.Tensor | None
    pixel_values: torch.Tensor
    stats: PackStats
    resume_state: dict | None = None
    plan: ShardPlan | None = None

    def shard(self, plan: ShardPlan, rank: int, device: torch.device) -> PackedBatch:
        """This context-parallel rank's part, on `device`: per-token fields cut by `plan`, tiles whole.

        Pad positions the plan inserts get no target, zero weight and no image feature.
        """
        def cut(x, pad_value):
            return shard(x, plan, rank, dim=1, pad_value=pad_value).to(device, non_blocking=True)

        return dataclasses.replace(
            self, input_ids=cut(self.input_ids, 0), position_ids=cut(self.position_ids, 0),
            target_ids=cut(self.target_ids, IGNORE_INDEX), loss_weights=cut(self.loss_weights, 0),
            feature_index=cut(self.feature_index, -1), cu_seqlens=plan.cu_seqlens(device),
            pixel_values=self.pixel_values.to(device, non_blocking=True), plan=plan)
