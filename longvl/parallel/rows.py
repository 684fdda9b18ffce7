"""Row selection helpers shared by the ring and all-gather algorithms (slices for dense, indices for packed)."""
import torch


def take(x, rows):
    """Rows `rows` (None = all, a slice, or an index tensor) of x along the sequence dimension (dim 1)."""
    if rows is None:
        return x
    if isinstance(rows, slice):
        return x[:, rows]
    return x.index_select(1, rows)


def add_rows(acc, rows, block):
    """acc[:, rows] += block (fp32 accumulation), for any `rows` accepted by `take`."""
    if isinstance(rows, torch.Tensor):
        acc.index_add_(1, rows, block.to(acc.dtype))
    else:
        take(acc, rows).add_(block)
