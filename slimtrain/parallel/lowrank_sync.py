"""Low-rank gradient synchronisation for GaLore-family optimizers under data parallelism.

GaLore's update depends on the gradient only through its projection ``P^T G``, and projection
is linear: ``P^T (sum_k G_k) = sum_k P^T G_k``. So instead of all-reducing each (m, n)
gradient, every rank projects its own gradient with the shared projector and all-reduces the
(r, n) result, and the optimizer steps on that: the same update for about r/m of the bytes.
On a projector-refresh step (one in ``update_proj_gap``) the full gradient is all-reduced,
rank 0 computes the projector and broadcasts it, so every rank holds identical projectors.
Tensors outside GaLore groups are all-reduced in flat buckets, as DDP does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..optim.spec import LowRankStep, lowrank_step_of, spec_of
from .comm import Comm, all_reduce_bucketed


class LowRankGradSync:
    """Call :meth:`sync` after backward and before ``optimizer.step()`` on every rank.

    Gradients are averaged over ranks (the loss of ``N`` ranks x batch ``b`` then matches one
    process with batch ``N b``). ``comm.bytes`` counts what was sent.
    """

    def __init__(self, optimizer, comm: Comm | None = None, bucket_bytes: int = 25 * 2**20):
        spec = spec_of(optimizer)
        if not spec.lowrank_grads:
            raise TypeError(
                f"LowRankGradSync needs an optimizer whose gradients can travel projected (a GaLore-family "
                f"optimizer), got {type(optimizer).__name__}; plain optimizers use ordinary all-reduce "
                "(torch DDP or DeepSpeed)"
            )
        if spec.layerwise:
            raise ValueError("LowRankGradSync steps the optimizer after backward; build it with layerwise=False")
        self.optimizer = optimizer
        self.lowrank = lowrank_step_of(optimizer)
        self.comm = comm or Comm()
        self.bucket_bytes = bucket_bytes

    @torch.no_grad()
    def sync(self) -> None:
        opt, low_opt, comm = self.optimizer, self.lowrank, self.comm
        galore = low_opt.lowrank_params()
        galore_ids = {id(p) for p, _ in galore}
        full: list[Tensor] = []  # gradients that travel whole
        refresh: list[tuple[Tensor, dict]] = []
        low: list[tuple[Tensor, Tensor]] = []
        for p, group in galore:
            if p.grad is None:
                continue
            if low_opt.needs_refresh(p):
                full.append(p.grad)
                refresh.append((p, group))
            else:
                low.append((p, low_opt.project_grad(p, p.grad)))
        full += [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None and id(p) not in galore_ids]
        all_reduce_bucketed(comm, full, self.bucket_bytes)
        all_reduce_bucketed(comm, [t for _, t in low], self.bucket_bytes)
        for p, group in refresh:
            if comm.rank == 0:
                low_opt.refresh_projector(p, p.grad, group)
            broadcast_projector(low_opt, p, group, comm, src=0)
            low.append((p, low_opt.project_grad(p, p.grad)))
        for p, low_grad in low:
            low_opt.set_projected_grad(p, low_grad)
            p.grad = None  # the full gradient is no longer needed


def broadcast_projector(opt: LowRankStep, p: Tensor, group: dict, comm: Comm, src: int) -> None:
    """Send ``p``'s projector from rank ``src`` (which just refreshed it) to every rank; the
    receivers also count the refresh, so per-tensor bookkeeping is identical everywhere."""
    if comm.rank != src:
        opt.count_refresh(p)
    for t in opt.projector_tensors(p, group):
        comm.broadcast(t, src=src)
