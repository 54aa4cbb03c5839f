"""What APOLLO and Fira share: the norm-based scaling factor estimated in the low-rank space and
Fira's norm-growth limiter, as plain functions over tensors (no host synchronisation)."""

from __future__ import annotations

import torch
from torch import Tensor

SCALE_TYPES = ("channel", "tensor")

# Added to denominators, as both references do, so an all-zero gradient gives a factor of 0.
NORM_EPS = 1e-8


def norm_dim(side: str) -> int:
    """The dimension of the low-rank gradient that holds the rank: norms over it leave one factor
    per channel of the *un*-projected side ((m, r) -> m rows; (r, n) -> n columns)."""
    if side == "right":
        return 1
    if side == "left":
        return 0
    raise ValueError(f"channel-wise scaling needs a one-sided projection, got side={side!r}")


def scaling_factor(direction: Tensor, low_grad: Tensor, side: str, scale_type: str) -> Tensor:
    """``||direction|| / ||low_grad||`` per channel (``scale_type="channel"``, shape broadcastable
    to the full matrix) or for the whole matrix (``"tensor"``, a 0-d tensor).

    ``direction`` is the low-rank Adam direction ``m / (sqrt(v) + eps)``, ``low_grad`` the low-rank
    gradient it came from: their norm ratio estimates how much Adam would rescale each channel of
    the full gradient (APOLLO, Sec. 3; Fira, Sec. 4.1).
    """
    if scale_type == "channel":
        dim = norm_dim(side)
        num = torch.linalg.vector_norm(direction, dim=dim, keepdim=True)
        den = torch.linalg.vector_norm(low_grad, dim=dim, keepdim=True)
    elif scale_type == "tensor":
        num, den = torch.linalg.vector_norm(direction), torch.linalg.vector_norm(low_grad)
    else:
        raise ValueError(f"scale_type={scale_type!r} is not one of {SCALE_TYPES}")
    return num / (den + NORM_EPS)


def limit_norm_growth(update: Tensor, prev_norm: Tensor, gamma: float) -> Tensor:
    """Fira's norm-growth limiter (Chen et al. 2024, Sec. 4.2): if ``||update||`` grew by more than
    ``gamma`` since the last step, shrink it to exactly ``gamma`` times the last (limited) norm.

    ``prev_norm`` (a 0-d fp32 tensor in optimizer state) is updated in place. Start it at ``inf``:
    the first step is then left as it is and only records its norm, as in the references.
    """
    norm = torch.linalg.vector_norm(update)
    limiter = (norm / (prev_norm + NORM_EPS)).clamp(min=gamma) / gamma
    prev_norm.copy_(norm / limiter)
    return update / limiter


def new_limiter_state(device) -> Tensor:
    return torch.tensor(float("inf"), dtype=torch.float32, device=device)
