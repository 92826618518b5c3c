"""FP8 block-scaled weights (DeepSeek-V3 checkpoints): e4m3 values with one fp32 scale per block.

`W[r, c] = float32(W8[r, c]) · S[r // br, c // bc]` with a ceil-div scale grid, so ragged edge blocks (the
576-row `kv_a_proj_with_mqa`) index correctly. Quantisation pads edge blocks with zeros for the amax, then
drops the padding: `S = amax(block) / 448`, `W8 = e4m3(W / S)`.
"""

from __future__ import annotations

import math

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def scale_grid(shape: tuple[int, int] | torch.Size, block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def expand_scales(scale_inv: torch.Tensor, shape: tuple[int, int] | torch.Size, block: tuple[int, int]) -> torch.Tensor:
    """Per-element fp32 scales [R, C] from the block grid."""
    rows, cols = shape
    return scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def dequantize(w8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """e4m3 [R, C] + scales [ceil(R/br), ceil(C/bc)] -> dtype [R, C], computed in fp32, rounded once."""
    if tuple(scale_inv.shape) != scale_grid(w8.shape, block):
        raise ValueError(f"scale grid {tuple(scale_inv.shape)} does not match weight {tuple(w8.shape)} "
                         f"in {block[0]}x{block[1]} blocks (expected {scale_grid(w8.shape, block)})")
    return (w8.float() * expand_scales(scale_inv, w8.shape, block)).to(dtype)


def quantize(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] float -> (e4m3 [R, C], fp32 scale_inv [ceil(R/br), ceil(C/bc)])."""
    rows, cols = w.shape
    gr, gc = scale_grid(w.shape, block)
    padded = torch.zeros(gr * block[0], gc * block[1], dtype=torch.float32)
    padded[:rows, :cols] = w.float()
    amax = padded.view(gr, block[0], gc, block[1]).abs().amax(dim=(1, 3))
    scale_inv = (amax / FP8_MAX).clamp(min=1e-12)
    w8 = (w.float() / expand_scales(scale_inv, w.shape, block)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return w8, scale_inv
