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

from slimtrain.optim import row_shards
from slimtrain.optim.row_shards import range_finder_bytes as refresh_bytes, sketch_width
from slimtrain.optim.galore_adamw import galore_adamw_right_step

from .comm import Comm


def distributed_right_projector(local_grad: Tensor, rank_r: int, comm: Comm, oversample: int = 8,
                                power_iters: int = 2, seed: int = 0) -> Tensor | None:
    """:func:`slimtrain.optim.row_shards.distributed_right_projector` over a :class:`Comm` (which
    counts the bytes it moves)."""
    return row_shards.distributed_right_projector(local_grad, rank_r, comm.all_reduce, oversample=oversample,
                                                  power_iters=power_iters, seed=seed)


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
