"""A DDP communication hook that all-reduces GaLore matrices' gradients *projected*.

``torch.nn.parallel.DistributedDataParallel`` all-reduces each gradient bucket during backward;
a communication hook (``ddp.register_comm_hook(state, hook)``) replaces that all-reduce. torch's
PowerSGD hook compresses every matrix approximately. This one is exact for GaLore-family
optimizers: their update depends on a projected matrix's gradient only through ``P^T G``, and
projection is linear (``P^T sum_k G_k = sum_k P^T G_k``), so each rank projects its own
gradient with the shared projector and the ``(r, n)`` results are averaged: the optimizer steps
on the same projected gradient as with full all-reduce, for ``r / min(m, n)`` of the bytes.

Per bucket, each gradient travels

* projected, when its tensor is a projected matrix (the optimizer's
  :class:`~slimtrain.optim.spec.LowRankStep` lists it) whose projector is not refreshed on this
  step; the averaged result is kept in :attr:`LowRankHookState.projected` for the engine to hand
  to the optimizer (``set_projected_grad``), and the bucket's slice is zeroed;
* whole otherwise (every other tensor, and projected matrices on a refresh step, which need the
  full averaged gradient to compute the new projector).

Everything in one bucket goes in one ``all_reduce`` (divided by the world size first, as torch's
default ``allreduce_hook`` does). The hook only reads the optimizer through ``LowRankStep``;
all ranks agree on refresh steps because they share step counters.
"""

# No ``from __future__ import annotations``: DDP checks the hook's annotations at run time
# (``bucket`` must be ``dist.GradBucket``, the result ``torch.futures.Future[torch.Tensor]``).
import torch
import torch.distributed as dist
from torch import Tensor

from ..optim.spec import LowRankStep


class LowRankHookState:
    """State of :func:`lowrank_allreduce_hook`: the optimizer's low-rank interface, what the last
    backward produced, and the bytes this rank handed to ``all_reduce``."""

    def __init__(self, lowrank: LowRankStep, process_group: dist.ProcessGroup | None = None):
        self.lowrank = lowrank
        self.process_group = process_group
        self.projected: dict[Tensor, Tensor] = {}
        """param -> its rank-averaged projected gradient from the last synchronised backward."""
        self.bytes = 0
        self.projected_bytes = 0
        """Of :attr:`bytes`, the part that travelled as projected gradients."""
        self._projected_ids: set[int] | None = None

    def is_projected(self, p: Tensor) -> bool:
        if self._projected_ids is None:  # the projected set is fixed once the optimizer is built
            self._projected_ids = {id(q) for q, _ in self.lowrank.lowrank_params()}
        return id(p) in self._projected_ids

    def take(self) -> dict[Tensor, Tensor]:
        """The projected gradients of the last backward (and forget them)."""
        out, self.projected = self.projected, {}
        return out


def lowrank_allreduce_hook(state: LowRankHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """``DistributedDataParallel.register_comm_hook(state, lowrank_allreduce_hook)``."""
    world = dist.get_world_size(state.process_group)
    params, grads = bucket.parameters(), bucket.gradients()
    low = state.lowrank
    pieces, projected = [], []
    for p, g in zip(params, grads):
        travel_low = state.is_projected(p) and not low.needs_refresh(p)
        pieces.append(low.project_grad(p, g.view_as(p)) if travel_low else g)
        projected.append(travel_low)
    flat = torch.cat([t.reshape(-1) for t in pieces]).div_(world)
    nbytes = flat.numel() * flat.element_size()
    state.bytes += nbytes
    state.projected_bytes += sum(t.numel() for t, low_ in zip(pieces, projected) if low_) * flat.element_size()
    work = dist.all_reduce(flat, group=state.process_group, async_op=True)

    def unpack(fut: torch.futures.Future) -> Tensor:
        reduced = fut.value()[0]
        offset = 0
        for p, g, t, travel_low in zip(params, grads, pieces, projected):
            part = reduced[offset: offset + t.numel()].view(t.shape)
            offset += t.numel()
            if travel_low:
                state.projected[p] = part.to(t.dtype, copy=True)
                g.zero_()  # the optimizer steps on the projected gradient, not on .grad
            else:
                g.copy_(part)
        return bucket.buffer()

    return work.get_future().then(unpack)


__all__ = ["LowRankHookState", "lowrank_allreduce_hook"]
