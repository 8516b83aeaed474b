"""Fixed 2-D sine-cosine position tables, element for element as in the original MAE code (the released checkpoints
store them, and models trained with them expect this layout): the first half of the channels encodes the column (x)
coordinate, the second half the row (y), each ``[sin(pos * omega), cos(pos * omega)]`` with
``omega_k = 1 / 10000 ** (k / (D / 4))``. Computed in float64 with NumPy, then cast to float32, as the original."""
from __future__ import annotations

import numpy as np
import torch


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim) table ``[sin(pos*omega) | cos(pos*omega)]``."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(embed_dim: int, grid_size, cls_token: bool = False) -> np.ndarray:
    """(gh*gw [+1], embed_dim) table for an int or (gh, gw) grid in raster order; a leading zero row for the class
    token with ``cls_token``."""
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    cols, rows = np.meshgrid(np.arange(gw, dtype=np.float32), np.arange(gh, dtype=np.float32))  # cols[i, j] = j
    table = np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)
    return np.concatenate([np.zeros((1, embed_dim)), table], axis=0) if cls_token else table


def sincos_2d_tensor(embed_dim: int, grid_size, cls_token: bool = True) -> torch.Tensor:
    """The table as a (1, tokens, embed_dim) float32 tensor, ready to copy into a ``pos_embed``."""
    return torch.from_numpy(sincos_2d(embed_dim, grid_size, cls_token)).float().unsqueeze(0)
