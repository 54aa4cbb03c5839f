"""GaLore on matrices sharded by rows (FSDP2's ``Shard(0)`` ``DTensor`` parameters).

Rank k holds rows ``W[k]`` and, after FSDP's reduce-scatter, the matching gradient rows ``G[k]``.
With a *right* projector ``P`` (r, n) every per-step piece of GaLore is row-local: ``G[k] P^T``
is rows k of ``G P^T``, Adam's moments are element-wise, and ``U[k] P`` is rows k of the
update. So a sharded GaLore step needs no communication at all; only the projector refresh needs
the whole gradient, and it is done one of two ways, chosen per matrix by bytes
(:func:`refresh_plan`, a rule that depends on the matrix and the group, never on the number of
ranks, so N ranks follow one process):

* ``"gather"``: the row shards are gathered to the mesh's first rank, which computes the
  projector exactly as one process does (``projector.compute_projector``) and broadcasts it
  (r x n). Bytes: the matrix once, to one rank.
* ``"range_finder"`` (``proj_method="randomized"`` only): :func:`distributed_right_projector`,
  ``power_iters + 1`` all-reduces of (n, r + p) sketches; the (m, n) gradient never travels.

Signs: singular vectors are defined up to sign, and GaLore keeps its moments across a refresh,
so two runs agree only if their projectors agree in sign too. Every projector computed here gets
:func:`canonical_signs` (largest-magnitude entry of each row positive).

This module speaks ``torch.distributed`` through each DTensor's own device mesh: it needs no
process group from the caller, and an optimizer can use it without importing slimtrain.parallel.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from . import projector as proj
from .shards import is_sharded

Refresh = str  # "gather" | "range_finder"


def check_row_sharded(t: Tensor) -> None:
    """Raise unless ``t`` is a DTensor sharded on dim 0 over a 1-D mesh (what FSDP2 makes)."""
    placements = tuple(t.placements)
    if t.device_mesh.ndim != 1 or len(placements) != 1 or not placements[0].is_shard(0):
        raise ValueError(f"GaLore steps on FSDP2 row shards (a 1-D mesh, Shard(0)); got placements {placements} "
                         f"on a {t.device_mesh.ndim}-D mesh")


def _group(t: Tensor):
    return t.device_mesh.get_group()


def _first_rank(t: Tensor) -> int:
    return dist.get_global_rank(_group(t), 0)


def shard_count(t: Tensor) -> int:
    """How many ranks hold shards of ``t``."""
    return dist.get_world_size(_group(t))


def all_reduce_sum(value: Tensor, like: Tensor) -> Tensor:
    """``value`` summed over the ranks holding shards of ``like`` (in place; returned)."""
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=_group(like))
    return value


def gather_rows_to_first(t: Tensor) -> Tensor | None:
    """The whole matrix of a dim-0-sharded DTensor on the mesh's first rank (None elsewhere).

    Shards may be uneven (``torch.chunk``: the last ranks may hold fewer rows, even none), so each
    is padded to the largest before ``gather`` and trimmed after."""
    group = _group(t)
    world = dist.get_world_size(group)
    rows = proj.as_matrix(t.to_local()).float().contiguous()
    m, n = proj.as_matrix(t).shape
    per = -(-m // world)
    padded = torch.zeros(per, n, dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    first = _first_rank(t)
    mine = dist.get_rank() == first
    bucket = [torch.empty_like(padded) for _ in range(world)] if mine else None
    dist.gather(padded, gather_list=bucket, dst=first, group=group)
    return torch.cat(bucket)[:m] if mine else None


def broadcast_from_first(value: Tensor, like: Tensor) -> Tensor:
    """``value`` as the mesh's first rank has it, on every rank of ``like``'s mesh (in place)."""
    dist.broadcast(value, src=_first_rank(like), group=_group(like))
    return value


def canonical_signs(p: Tensor) -> Tensor:
    """Flip each row of a (r, n) projector so that its largest-magnitude entry is positive: the
    projector then depends only on the subspace's vectors, not on the solver's sign choices."""
    peak = p.gather(1, p.abs().argmax(dim=1, keepdim=True))
    return p * torch.where(peak < 0, -1.0, 1.0).to(p.dtype)


def sketch_width(rank_r: int, n: int, oversample: int = 8) -> int:
    """Columns of the range finder's sketch, ``min(r + p, n)``."""
    return min(rank_r + oversample, n)


def range_finder_bytes(n: int, rank_r: int, oversample: int = 8, power_iters: int = 2, itemsize: int = 4) -> int:
    """Payload one rank hands to all-reduce per range-finder refresh of an (m, n) matrix:
    ``(power_iters + 1)`` sketches of (n, r + p)."""
    return (power_iters + 1) * n * sketch_width(rank_r, n, oversample) * itemsize


def refresh_plan(shape: tuple[int, int], rank_r: int, method: str, oversample: int, power_iters: int) -> Refresh:
    """How a row-sharded (m, n) matrix refreshes its projector.

    An exact SVD needs the whole matrix: ``"gather"``. A randomized projector may come from the
    distributed range finder, whose all-reduces (each moves about twice its payload) are worth it
    when they carry fewer bytes than the matrix itself: ``2 (q + 1) n (r + p) < m n``. The rule
    reads only the shape and the group's settings, so every world size (one included) picks the
    same way and N ranks follow one process."""
    if method != "randomized":
        return "gather"
    m, n = shape
    return "range_finder" if 2 * range_finder_bytes(n, rank_r, oversample, power_iters, 1) < m * n else "gather"


def distributed_right_projector(
    local_grad: Tensor,
    rank_r: int,
    all_reduce: Callable[[Tensor], Tensor],
    oversample: int = 8,
    power_iters: int = 2,
    seed: int = 0,
) -> Tensor | None:
    """Top-``rank_r`` right singular vectors ``P`` (r, n) of ``G`` from its row shard ``G[k]``.

    Every rank passes its own rows (m/N, n), the same ``seed`` and an ``all_reduce`` that sums a
    tensor over the ranks (returning it); every rank gets the same P. Halko, Martinsson & Tropp
    (2011) run on ``G^T G = sum_k G[k]^T G[k]`` without forming it:

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
    for row up to sign; signs here are canonical. Communication: ``power_iters + 1`` all-reduces
    of (n, l) floats (:func:`range_finder_bytes`), independent of m and of the number of ranks.

    Returns ``None`` when the decomposition fails or is non-finite (the caller keeps its previous
    projector); all ranks see the same all-reduced data, so all of them return ``None`` together.
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
        y = all_reduce(g.T @ (g @ z))  # (n, l) = G^T G Z
        for _ in range(power_iters):
            z, _ = torch.linalg.qr(y)
            y = all_reduce(g.T @ (g @ z))
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
    return canonical_signs(p).float().contiguous()


def right_projector_of_rows(grad: Tensor, rank_r: int, *, method: str, oversample: int, power_iters: int,
                            seed: int) -> Tensor | None:
    """The (r, n) right projector of a row-sharded gradient ``grad`` (a DTensor), the same on
    every rank, or None on every rank when it could not be computed (keep the previous one).

    Collective: every rank holding a shard must call it, in the same order."""
    check_row_sharded(grad)
    m, n = proj.as_matrix(grad).shape
    plan = refresh_plan((m, n), rank_r, method, oversample, power_iters)
    if plan == "range_finder":
        return distributed_right_projector(grad.to_local(), rank_r, lambda t: all_reduce_sum(t, grad),
                                           oversample=oversample, power_iters=power_iters, seed=seed)
    whole = gather_rows_to_first(grad)
    # as on one process, a factorisation of an (m, n) matrix has at most min(m, n) vectors
    k = min(rank_r, m, n)
    # the first rank computes, everyone receives: the projector and one flag (did it work?)
    out = torch.zeros(k + 1, n, dtype=torch.float32, device=grad.to_local().device)
    if whole is not None:
        generator = torch.Generator(device=whole.device).manual_seed(seed) if method == "randomized" else None
        result = proj.compute_projector(whole, rank_r, "right", method=method, oversample=oversample,
                                        power_iters=power_iters, generator=generator)
        if result is not None and result[1].shape[0] == k:
            out[:k] = canonical_signs(result[1])
            out[k, 0] = 1.0
    broadcast_from_first(out, grad)
    return out[:k].contiguous() if bool(out[k, 0] == 1.0) else None


def global_norm(local_piece: Tensor, like: Tensor) -> Tensor:
    """The norm of the whole tensor whose local piece (on this rank) is ``local_piece``: one
    scalar all-reduce when ``like`` is sharded."""
    sq = torch.linalg.vector_norm(local_piece.float()) ** 2
    if is_sharded(like):
        all_reduce_sum(sq, like)
    return sq.sqrt()


__all__ = ["all_reduce_sum", "broadcast_from_first", "canonical_signs", "check_row_sharded",
           "distributed_right_projector", "gather_rows_to_first", "global_norm", "range_finder_bytes",
           "refresh_plan", "right_projector_of_rows", "shard_count", "sketch_width"]
