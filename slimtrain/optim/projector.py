"""Low-rank gradient projectors for the GaLore family, as plain functions over tensors.

A projector is one or two orthonormal matrices kept in ``optimizer.state`` (never a Python
object, so ``torch.load(weights_only=True)`` restores it):

* ``left``  (m, r): project ``G`` (m, n) as ``left.T @ G`` -> (r, n)
* ``right`` (r, n): project ``G`` (m, n) as ``G @ right.T`` -> (m, r)
* both (``proj_type="full"``): ``left.T @ G @ right.T`` -> (r, r)

Sides follow galore-torch: ``std`` keeps the *smaller* dimension of the gradient as the
projected one (right projector when m >= n), ``reverse_std`` the opposite.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
PROJ_METHODS = ("svd", "randomized")


def as_matrix(t: Tensor) -> Tensor:
    """View a >=2-D tensor as a matrix: conv weights (out, in, kh, kw) become (out, in*kh*kw)."""
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


def projection_side(shape: tuple[int, int], proj_type: str) -> str:
    """Which projector(s) a matrix of ``shape`` uses: "left", "right" or "full"."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type
    raise ValueError(f"proj_type={proj_type!r} is not one of {PROJ_TYPES}")


def effective_rank(rank: int, shape: tuple[int, int], side: str) -> int:
    """Clamp ``rank`` to what the projected dimension(s) of ``shape`` can hold."""
    m, n = shape
    limit = {"left": m, "right": n, "full": min(m, n)}[side]
    return min(rank, limit)


def _top_singular_vectors_svd(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], vh[:rank, :]


def randomized_range(
    matrix: Tensor, rank: int, *, oversample: int, power_iters: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Top-``rank`` singular vectors of ``matrix`` (m, n) by a randomized range finder.

    Halko, Martinsson & Tropp (2011), Alg. 4.4: sketch the column space with ``rank +
    oversample`` Gaussian probes, sharpen it with ``power_iters`` subspace iterations
    (re-orthonormalised each time so small singular values do not underflow), then take an
    exact SVD of the small (l, n) projection. Costs O(m n l) instead of O(m n min(m, n)).
    """
    m, n = matrix.shape
    ell = min(rank + oversample, m, n)
    omega = torch.randn(n, ell, device=matrix.device, dtype=matrix.dtype, generator=generator)
    q, _ = torch.linalg.qr(matrix @ omega)  # (m, l): approximate column space
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(matrix.T @ q)  # (n, l)
        q, _ = torch.linalg.qr(matrix @ z)  # (m, l)
    small = q.T @ matrix  # (l, n)
    u_small, _, vh = torch.linalg.svd(small, full_matrices=False)
    return (q @ u_small)[:, :rank], vh[:rank, :]


def compute_projector(
    grad: Tensor,
    rank: int,
    side: str,
    *,
    method: str = "svd",
    oversample: int = 8,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor | None, Tensor | None] | None:
    """Orthonormal projector(s) for a gradient matrix, computed in fp32.

    Returns ``(left, right)`` with the unused side ``None``, or ``None`` when the
    decomposition failed or produced non-finite values: the caller then keeps its previous
    projector, so a bad gradient never turns into NaN weights.
    """
    matrix = as_matrix(grad).float()
    try:
        if method == "svd":
            u, vh = _top_singular_vectors_svd(matrix, rank)
        elif method == "randomized":
            u, vh = randomized_range(
                matrix, rank, oversample=oversample, power_iters=power_iters, generator=generator
            )
        else:
            raise ValueError(f"proj_method={method!r} is not one of {PROJ_METHODS}")
    except torch.linalg.LinAlgError:
        return None
    left = u.contiguous() if side in ("left", "full") else None
    right = vh.contiguous() if side in ("right", "full") else None
    for t in (left, right):
        if t is not None and not bool(torch.isfinite(t).all()):
            return None
    return left, right


def fallback_projector(shape: tuple[int, int], rank: int, side: str, device) -> tuple[Tensor | None, Tensor | None]:
    """A valid orthonormal projector when no SVD has ever succeeded (first coordinates)."""
    m, n = shape
    left = torch.eye(m, rank, device=device) if side in ("left", "full") else None
    right = torch.eye(rank, n, device=device) if side in ("right", "full") else None
    return left, right


def project(grad: Tensor, left: Tensor | None, right: Tensor | None) -> Tensor:
    """Full gradient (m, n) -> low-rank gradient in the projector's dtype."""
    g = as_matrix(grad).to(left.dtype if left is not None else right.dtype)
    if left is not None:
        g = left.T @ g  # (r, n)
    if right is not None:
        g = g @ right.T  # (., r)
    return g


def project_back(low: Tensor, left: Tensor | None, right: Tensor | None, scale: float) -> Tensor:
    """Low-rank update -> full (m, n) update, multiplied by GaLore's ``scale`` (alpha)."""
    if left is not None:
        low = left @ low
    if right is not None:
        low = low @ right
    return low * scale


def captured_energy(grad: Tensor, left: Tensor | None, right: Tensor | None) -> float:
    """Fraction of ``||G||_F^2`` that survives projection (1.0 = nothing lost)."""
    # float64: LLM gradients are so close to low-rank that the lost energy sits near fp32 round-off
    g = as_matrix(grad).double()
    left = left.double() if left is not None else None
    right = right.double() if right is not None else None
    total = float(g.pow(2).sum())
    return float(project(g, left, right).pow(2).sum()) / total if total > 0 else 1.0


def warn_rank_clamped(rank: int, clamped: int, shape) -> None:
    warnings.warn(
        f"GaLore rank={rank} is larger than the projected dimension of a {tuple(shape)} matrix; "
        f"using rank={clamped} for it (set rank <= {clamped} to silence this)",
        stacklevel=4,
    )


def projector_seed(base_seed: int, param_index: int, step: int) -> int:
    """Deterministic seed for the randomized range finder: the same on every rank and after a
    resume, without a global RNG (so nothing else's random stream is disturbed)."""
    return (base_seed * 1_000_003 + param_index * 7_919 + step) % (2**63 - 1)


__all__ = [
    "PROJ_TYPES",
    "PROJ_METHODS",
    "as_matrix",
    "projection_side",
    "effective_rank",
    "randomized_range",
    "compute_projector",
    "fallback_projector",
    "project",
    "project_back",
    "captured_energy",
    "projector_seed",
]
