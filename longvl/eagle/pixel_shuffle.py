"""Pixel shuffle: merge each k x k block of vision cells into one token with k*k times the channels.

The channel order is part of the checkpoint format: for k = 2, token (r, c) concatenates cells
(2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1) -- row offset major, column offset minor -- and tokens are
flattened row-major. Real `mlp1` weights only make sense in this order.
"""
import torch


def pixel_shuffle(features: torch.Tensor, factor: int) -> torch.Tensor:
    """(tiles, grid*grid, C) -> (tiles, (grid/factor)^2, C*factor^2)."""
    if features.dim() != 3:
        raise ValueError(f"pixel_shuffle expects (tiles, cells, channels), got shape {tuple(features.shape)}")
    tiles, cells, channels = features.shape
    grid = int(round(cells ** 0.5))
    if grid * grid != cells or grid % factor:
        raise ValueError(f"pixel_shuffle needs a square grid divisible by {factor}, got {cells} cells")
    out = grid // factor
    blocks = features.reshape(tiles, out, factor, out, factor, channels)
    # (tiles, row, dy, col, dx, C) -> (tiles, row, col, dy, dx, C): channels ordered by (dy, dx)
    return blocks.permute(0, 1, 3, 2, 4, 5).reshape(tiles, out * out, factor * factor * channels)
