"""Merge partial attention results over disjoint key sets, in fp32.

If rows attended to key set A (out_a, lse_a) and separately to key set B (out_b, lse_b), attention over A and B
is  out = out_a - sigmoid(lse_b - lse_a) * (out_a - out_b),  lse = lse_a - logsigmoid(lse_a - lse_b).
This form never exponentiates a large lse, so it stays finite for any score range. Keeping the running out
and lse in fp32 stops bf16 rounding from accumulating over ring steps.
"""
import torch
import torch.nn.functional as F


def merge_block(out, lse, block_out, block_lse, rows=None):
    """Fold one block into the running fp32 (out (B, S, H, D), lse (B, S, H)) in place.

    `rows` says which rows of the running result the block covers: None (all), a slice (a view, merged in
    place) or an index tensor along the sequence dimension (gathered, merged, written back).
    """
    if isinstance(rows, torch.Tensor):
        sub_out, sub_lse = out.index_select(1, rows), lse.index_select(1, rows)
        merge_block(sub_out, sub_lse, block_out, block_lse)
        out.index_copy_(1, rows, sub_out)
        lse.index_copy_(1, rows, sub_lse)
        return
    if rows is not None:
        out, lse = out[:, rows], lse[:, rows]
    block_lse = block_lse.float()
    weight = torch.sigmoid(block_lse - lse).unsqueeze(-1)
    out.sub_(weight * (out - block_out.float()))
    lse.sub_(F.logsigmoid(lse - block_lse))
