"""Emulated NVFP4 (4-bit E2M1 values with block scales), for ReaLB's low-precision ranks.

NVFP4 stores every block of 16 consecutive values (along the last axis, the matmul's reduction
axis) as E2M1 numbers (``0, 0.5, 1, 1.5, 2, 3, 4, 6`` and their negatives) times one FP8 E4M3
scale per block, with a float32 scale for the whole tensor. ``fake_nvfp4(x)`` rounds ``x`` to
that grid and returns it in ``x``'s dtype (quantize, then dequantize), so a matmul on the results
gives what an FP4 tensor-core matmul with float32 accumulation gives, at the speed of the original
dtype. Rounding is to the nearest grid value (ties towards the larger magnitude). The gradient
passes straight through (``x + (q - x).detach()``).
"""

from __future__ import annotations

import torch

__all__ = ["E2M1_GRID", "fake_nvfp4"]

#: non-negative E2M1 values
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E4M3_MAX = 448.0
_BLOCK = 16


def _round_e2m1(a: torch.Tensor) -> torch.Tensor:
    """Non-negative ``a`` (already scaled into ``[0, 6]``) rounded to the nearest E2M1 value."""
    grid = torch.tensor(E2M1_GRID, dtype=a.dtype, device=a.device)
    mids = (grid[1:] + grid[:-1]) / 2
    return grid[torch.bucketize(a, mids, right=True)]


def fake_nvfp4(x: torch.Tensor, block: int = _BLOCK) -> torch.Tensor:
    """``x`` rounded to NVFP4 along its last axis (blocks of ``block`` values); same shape and dtype.

    The last axis is zero-padded to a multiple of ``block`` for the scales and cut back after.
    """
    if x.numel() == 0:
        return x
    shape, n = x.shape, x.shape[-1]
    xf = x.float().reshape(-1, n)
    pad = (-n) % block
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    blocks = xf.view(xf.shape[0], -1, block)
    amax_t = xf.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    tensor_scale = amax_t / (6.0 * _E4M3_MAX)
    block_amax = blocks.abs().amax(-1, keepdim=True)
    block_scale = (block_amax / 6.0 / tensor_scale).clamp(max=_E4M3_MAX)
    block_scale = block_scale.to(torch.float8_e4m3fn).float() * tensor_scale
    safe = torch.where(block_scale > 0, block_scale, torch.ones_like(block_scale))
    q = _round_e2m1((blocks.abs() / safe).clamp(max=6.0)) * blocks.sign() * block_scale
    q = q.view(xf.shape)[:, :n].reshape(shape).to(x.dtype)
    return x + (q - x).detach()
