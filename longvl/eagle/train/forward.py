"""One training forward of Eagle on a (context-parallel shard of a) packed sequence, returning its loss.

The module wraps the Eagle model so FSDP2 sees a single root whose forward does everything: the vision tower
on this rank's share of the tiles, the exchange of features across the context-parallel group, the splice,
the LLM and the fused linear + cross-entropy with square-root loss weights.

Vision under context parallelism: the pack's tiles are split evenly over the CP ranks (each runs the tower on
its own share, padded with blank tiles to the same count so every rank runs every FSDP module), the
features are all-gathered with autograd, and each rank splices the rows its tokens need. The all-gather's
backward sums every rank's feature gradients onto the tile's owner, so the vision tower learns from tokens
on all ranks (the public reference loses those gradients). The local and gathered features always join the
loss with weight 0 as well, and every rank runs the same ops whatever its tokens: text-only packs still run
the tower's backward, and the exchange's backward collective comes at the same point of every rank's backward
(collectives must match in order across ranks, FSDP2's included).

The loss is the sum of weighted token losses on this shard (weights already hold the global per-document
counts); summed over the CP group it is the pack's loss.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def gather_tile_features(local: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """All-gather per-rank tile features (padded to the same count) with autograd; drop the padding."""
    if group is None or dist.get_world_size(group) == 1:
        return local[: counts[0]]
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(local.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def split_tiles(num_tiles: int, cp: int) -> list[int]:
    """Tiles per CP rank: an even contiguous split, the first ranks taking one more when it does not divide."""
    base, extra = divmod(num_tiles, cp)
    return [base + (r < extra) for r in range(cp)]


class EagleTrainingForward(nn.Module):
    """`forward(batch) -> loss` (a 0-dim fp32 tensor) for one CP shard of one packed sequence."""

    def __init__(self, model: nn.Module, *, fused_cross_entropy: bool = True):
        super().__init__()
        self.model = model
        self.fused_cross_entropy = fused_cross_entropy
        self.cp_group = None
        self.cp_rank = 0
        self.cp = 1

    def set_cp_group(self, group, cp_rank: int, cp: int) -> None:
        self.cp_group, self.cp_rank, self.cp = group, cp_rank, cp

    def local_tiles(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """This rank's tiles padded with blank ones to the largest share (>= 1), and every rank's real count."""
        counts = split_tiles(pixel_values.shape[0], self.cp)
        start = sum(counts[: self.cp_rank])
        mine = pixel_values[start:start + counts[self.cp_rank]]
        width = max(1, max(counts))
        if mine.shape[0] < width:
            size = self.model.config.force_image_size
            blank = mine.new_zeros(width - mine.shape[0], 3, size, size)
            mine = torch.cat([mine, blank])
        return mine, counts

    def forward(self, input_ids, position_ids, labels, loss_weights, image_index, pixel_values, **attn_kwargs):
        """Arguments are this shard's (1, n) tensors; `image_index` is the global feature row of each
        `<IMG_CONTEXT>` token (-1 elsewhere); `pixel_values` holds ALL the pack's tiles (t, 3, s, s)."""
        model = self.model
        lm = model.language_model
        embeds = lm.get_input_embeddings()(input_ids)
        tiles, counts = self.local_tiles(pixel_values)
        local = model.extract_features(tiles)
        features = gather_tile_features(local, counts, self.cp_group)
        rows = features.reshape(-1, features.shape[-1])
        mask = image_index >= 0
        # The same ops on every rank, even without image tokens here: the autograd engine then runs the
        # gather's backward collective at the same point on all ranks (else it deadlocks against FSDP's).
        picked = rows.index_select(0, image_index[mask])
        embeds = embeds.masked_scatter(mask.unsqueeze(-1), picked.to(embeds.dtype))
        # Blank tiles and text-only packs: keep the tower and the exchange in the graph on every rank.
        embeds = embeds + 0 * (features.sum() + local.sum()).to(embeds.dtype)
        hidden = lm.model(inputs_embeds=embeds, position_ids=position_ids, use_cache=False,
                          **attn_kwargs).last_hidden_state
        return self.weighted_loss(hidden, lm.lm_head, labels, loss_weights)

    def weighted_loss(self, hidden, lm_head, labels, loss_weights):
        x = hidden.reshape(-1, hidden.shape[-1])
        target, weights = labels.reshape(-1), loss_weights.reshape(-1).float()
        if self.fused_cross_entropy:
            from longvl.kernels.linear_cross_entropy import linear_cross_entropy

            return linear_cross_entropy(x, lm_head.weight, target, lm_head.bias, reduction="sum",
                                        weights=weights).float()
        logits = lm_head(x).float()
        losses = F.cross_entropy(logits, target, reduction="none", ignore_index=-100)
        return (losses * weights).sum()
