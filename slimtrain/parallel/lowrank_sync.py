"""The one piece of low-rank gradient synchronisation both data-parallel engines share.

GaLore's update depends on the gradient only through its projection ``P^T G``, and projection
is linear: ``P^T (sum_k G_k) = sum_k P^T G_k``, so ranks may sum projected gradients instead of
full ones, provided they hold the same projector. On a refresh step one rank computes it from
the averaged full gradient and :func:`broadcast_projector` sends it to the others. The sums
themselves are done by DDP's communication hook (:mod:`slimtrain.parallel.ddp_hooks`) or by
:class:`slimtrain.parallel.DataParallelOptimizer` (whole-tensor sharding, where a projected
gradient is reduced to its owner only).
"""

from __future__ import annotations

from torch import Tensor

from ..optim.spec import LowRankStep
from .comm import Comm


def broadcast_projector(opt: LowRankStep, p: Tensor, group: dict, comm: Comm, src: int) -> None:
    """Send ``p``'s projector from rank ``src`` (which just refreshed it) to every rank; the
    receivers also count the refresh, so per-tensor bookkeeping is identical everywhere."""
    if comm.rank != src:
        opt.count_refresh(p)
    for t in opt.projector_tensors(p, group):
        comm.broadcast(t, src=src)
