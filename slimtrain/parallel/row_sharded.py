"""GaLore on a matrix sharded by rows over the ranks of a :class:`Comm` (FSDP2's ``Shard(0)``).

Rank k holds rows ``W[k]`` and, after FSDP's reduce-scatter, the matching gradient rows ``G[k]``,
both (m/N, n). With a *right* projector ``P`` (r, n) everything GaLore does per step is
row-local: ``G[k] P^T`` is rows k of ``G P^T``, Adam's moments are elementwise, and the
back-projection ``U[k] P`` gives rows k of the update. Only the projector refresh needs the
whole ``G``; :func:`distributed_right_projector` finds its top-r right singular subspace from the
row shards by all-reducing (n, r+p) sketches, never the (m, n) gradient.

This is the measured core of the design in ``docs/distributed.md`` ("How ZeRO-3 / FSDP2
parameter sharding would carry GaLore"); it is not wired into FSDP2 or DeepSpeed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimtrain.optim import projector as proj
from slimtrain.optim.galore_adamw import galore_adamw_right_step

from .comm import Comm


def sketch_width(rank_r: int, n: int, oversample: int = 8) -> int:
    """Columns of the range finder's sketch, ``min(r + p, n)`` (the single-process
    ``randomized_range`` also caps at m; row sharding assumes the full m >= that width)."""
    return min(rank_r + oversample, n)


def refresh_bytes(n: int, rank_r: int, oversample: int = 8, power_iters: int = 2, itemsize: int = 4) -> int:
    """Payload one rank hands to all-reduce per refresh of one (m, n) matrix:
    ``(power_iters + 1)`` sketches of (n, r + p)."""
    return (power_iters + 1) * n * sketch_width(rank_r, n, oversample) * itemsize


def _canonical_signs(p: Tensor) -> Tensor:
    """Singular vectors are defined up to sign; fix it (largest-magnitude entry of each row
    positive) so that a projector depends only on the subspace's vectors, not on the solver."""
    peak = p.gather(1, p.abs().argmax(dim=1, keepdim=True))  # (r, 1)
    return p * torch.where(peak < 0, -1.0, 1.0)


def distributed_right_projector(
    local_grad: Tensor,
    rank_r: int,
    comm: Comm,
    oversample: int = 8,
    power_iters: int = 2,
    seed: int = 0,
) -> Tensor | None:
    """Top-``rank_r`` right singular vectors ``P`` (r, n) of ``G`` from its row shard ``G[k]``.

    Every rank passes its own rows (m/N, n) and the same ``seed``; every rank gets the same P.
    Halko, Martinsson & Tropp (2011) run on ``G^T G = sum_k G[k]^T G[k]`` without forming it:

    1. ``Omega`` (n, l), l = r + p, drawn from ``seed`` (identical on all ranks); ``Z = qr(Omega)``.
    2. ``Y = sum_k G[k]^T (G[k] Z)``: each rank computes its (n, l) term, one all-reduce.
    3. ``power_iters`` times: ``Z = qr(Y)``, then step 2 again.
    4. Locally: the Rayleigh-Ritz step of the single-process finder. ``randomized_range`` on
       the concatenated ``G`` returns the top right singular vectors of ``Q Q^T G`` with
       ``Q = orth(G Z)``; those are the top eigenvectors of ``G^T Q Q^T G = Y (Z^T Y)^{-1} Y^T``,
       computed from ``Y = Q_Y R_Y`` as ``Q_Y`` times the eigenvectors of
       ``(Z^T Q_Y)^{-1} R_Y^T`` (l x l), in float64.

    In exact arithmetic P spans what ``projector.randomized_range(G, r, oversample=p,
    power_iters=q)`` returns on the whole G with the same ``Omega`` (same seed, same draw), row
    for row up to sign; signs here are canonical (largest-magnitude entry of each row
    positive). Communication: ``power_iters + 1`` all-reduces of (n, l) floats
    (:func:`refresh_bytes`), independent of m and of the number of ranks.

    Returns ``None`` when the decomposition fails or is non-finite (the caller keeps its
    previous projector, as ``compute_projector`` callers do); all ranks see the same
    all-reduced data, so all of them return ``None`` together.
    """
    g = proj.as_matrix(local_grad).float()  # (m/N, n)
    n = g.shape[1]
    if not 1 <= rank_r <= n:
        raise ValueError(f"rank_r={rank_r} must be between 1 and the number of columns n={n}")
    ell = sketch_width(rank_r, n, oversample)
    generator = torch.Generator(device=g.device).manual_seed(seed)
    # the same draw as randomized_range(G, ...): (n, l) standard normals, fp32
    omega = torch.randn(n, ell, device=g.device, dtype=g.dtype, generator=generator)
    try:
        z, _ = torch.linalg.qr(omega)  # span(G Z) = span(G Omega): the reference's first sketch
        y = comm.all_reduce(g.T @ (g @ z))  # (n, l) = G^T G Z
        for _ in range(power_iters):
            z, _ = torch.linalg.qr(y)
            y = comm.all_reduce(g.T @ (g @ z))
        # Rayleigh-Ritz in float64: Y and Z carry fp32 round-off; the local (n, l) algebra should
        # not add more (in fp32 it did, at r = n / 2 on real gradients)
        z64, y64 = z.double(), y.double()
        q_y, r_y = torch.linalg.qr(y64)  # (n, l), (l, l)
        c = torch.linalg.solve(z64.T @ q_y, r_y.T)  # = R_Y (Z^T Y)^{-1} R_Y^T, symmetric
        _, vecs = torch.linalg.eigh((c + c.T) / 2)  # ascending
        p = (q_y @ vecs.flip(-1)[:, :rank_r]).T  # (r, n)
    except torch.linalg.LinAlgError:
        return None
    if not bool(torch.isfinite(p).all()):
        return None
    return _canonical_signs(p).float().contiguous()


def row_sharded_galore_adamw_step(
    param_rows: Tensor,
    grad_rows: Tensor,
    state: dict,
    comm: Comm,
    *,
    rank: int,
    update_proj_gap: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    correct_bias: bool = True,
    scale: float = 1.0,
    oversample: int = 8,
    power_iters: int = 2,
    proj_seed: int = 0,
    param_index: int = 0,
) -> None:
    """One GaLore-AdamW step (``proj_type="right"``) of this rank's rows of an (m, n) matrix.

    ``state`` is ``GaLoreAdamW``'s per-tensor state (kept by
    :func:`slimtrain.optim.galore_adamw.galore_adamw_right_step`): the projector is replicated
    (r, n), the moments are this rank's rows (m/N, r) of the unsharded optimizer's moments. The refresh rule and the probe seed
    (``projector_seed(proj_seed, param_index, step)``) are ``GaLoreAdamW``'s with
    ``proj_method="randomized"``. Collectives: on a refresh step those of
    :func:`distributed_right_projector`, on every other step none.

    Not supported: per-tensor ``max_grad_norm`` (the norm of the projected gradient would need
    a scalar all-reduce) and left / two-sided projectors (``G`` multiplied from the left mixes
    rows of every rank).
    """
    def refresh(grad: Tensor, r: int, seed: int) -> Tensor | None:
        return distributed_right_projector(grad, r, comm, oversample=oversample, power_iters=power_iters, seed=seed)

    galore_adamw_right_step(param_rows, grad_rows, state, refresh, rank=rank, update_proj_gap=update_proj_gap, lr=lr,
                            betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias, scale=scale,
                            proj_seed=proj_seed, param_index=param_index)


__all__ = ["distributed_right_projector", "row_sharded_galore_adamw_step", "refresh_bytes", "sketch_width"]
