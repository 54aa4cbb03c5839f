"""Shape-preserving optimizer-state sharding: ZeRO-1/2 semantics without flattening.

DeepSpeed ZeRO flattens parameters and gives each rank a 1-D slice, which defeats optimizers
that need matrices (GaLore's SVD, 8-bit block layouts keyed to a tensor). Here whole tensors
are assigned to owner ranks instead, balanced by the optimizer-state size each will create.
Each rank builds the wrapped optimizer over the tensors it owns only, so optimizer state is
~1/N per rank and every tensor keeps its shape.

Per step:
* stage 1: gradients are all-reduced (averaged); stage 2: each gradient is *reduced* to its
  owner only and freed on the other ranks;
* owners step their optimizer;
* every updated tensor is broadcast from its owner, so all ranks hold the same weights.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..optim import projector as proj
from .comm import Comm


def state_cost(p: Tensor, group: dict) -> int:
    """Elements of optimizer state ``p`` will create (Adam-like: 2 moments; GaLore: low-rank)."""
    if "rank" in group and p.dim() >= 2:
        m, n = proj.as_matrix(p).shape
        side = proj.projection_side((m, n), group.get("proj_type", "std"))
        r = proj.effective_rank(group["rank"], (m, n), side)
        kept = {"left": n, "right": m, "full": r}[side]
        projector = {"left": m * r, "right": r * n, "full": (m + n) * r}[side]
        return 2 * kept * r + projector
    return 2 * p.numel()


def assign_owners(groups: list[dict], world_size: int) -> list[list[int]]:
    """Owner rank of each tensor (same structure as the groups): largest state first to the
    least-loaded rank. Deterministic, so every rank computes the same assignment."""
    items = [(state_cost(p, g), gi, pi) for gi, g in enumerate(groups) for pi, p in enumerate(g["params"])]
    items.sort(key=lambda t: (-t[0], t[1], t[2]))
    load = [0] * world_size
    owners = [[0] * len(g["params"]) for g in groups]
    for cost, gi, pi in items:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[gi][pi] = rank
        load[rank] += cost
    return owners


class ShardedOptimizer:
    """Wrap ``optimizer_cls`` so each rank keeps state only for the whole tensors it owns.

    ``ShardedOptimizer(model.parameters() or groups, GaLoreAdamW, stage=2, lr=1e-3)``.
    Call ``step()`` after backward on every rank (it synchronises gradients itself; do not also
    wrap the model in DDP). ``optimizer.state`` of the wrapped optimizer holds this rank's
    shard; ``state_dict()`` is per rank (save one file per rank; resume at the same world size).

    Memory: optimizer state / N per rank (balanced by state size, so within one tensor's state
    of even). Communication per step: stage 1 all-reduces every gradient, stage 2 reduces it
    to one rank; both then broadcast every parameter once.
    """

    def __init__(self, params, optimizer_cls: Callable[..., torch.optim.Optimizer], *, stage: int = 2,
                 comm: Comm | None = None, **optimizer_kwargs):
        if stage not in (1, 2):
            raise ValueError(f"stage={stage!r}: shape-preserving sharding covers ZeRO stages 1 and 2")
        self.comm = comm or Comm()
        self.stage = stage
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.groups = [{**g, "params": list(g["params"])} for g in groups]
        self.owners = assign_owners(self.groups, self.comm.world_size)
        me = self.comm.rank
        owned = [{**g, "params": [p for p, o in zip(g["params"], own) if o == me]}
                 for g, own in zip(self.groups, self.owners)]
        owned = [g for g in owned if g["params"]]
        # A rank may own nothing when there are fewer tensors than ranks.
        self.optimizer = optimizer_cls(owned, **optimizer_kwargs) if owned else None

    @property
    def param_groups(self):
        return self.optimizer.param_groups if self.optimizer is not None else []

    def _tensors(self):
        for g, own in zip(self.groups, self.owners):
            yield from zip(g["params"], own)

    @torch.no_grad()
    def sync_gradients(self) -> None:
        world, me = self.comm.world_size, self.comm.rank
        for p, owner in self._tensors():
            if p.grad is None:
                if not p.requires_grad:
                    continue
                p.grad = torch.zeros_like(p)  # every rank must join each collective
            if self.stage == 1:
                self.comm.all_reduce(p.grad)
                p.grad /= world
            else:
                self.comm.reduce(p.grad, dst=owner)
                if me == owner:
                    p.grad /= world
                else:
                    p.grad = None  # stage 2: only the owner keeps a gradient

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.sync_gradients()
        if self.optimizer is not None:
            self.optimizer.step()
        for p, owner in self._tensors():
            self.comm.broadcast(p.data, src=owner)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, _ in self._tensors():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank."""
        if self.optimizer is None:
            return 0
        return sum(v.numel() * v.element_size() for s in self.optimizer.state.values()
                   for v in s.values() if isinstance(v, Tensor))

    def state_dict(self) -> dict:
        return {"world_size": self.comm.world_size, "rank": self.comm.rank, "stage": self.stage,
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        if state["world_size"] != self.comm.world_size:
            raise ValueError(
                f"this checkpoint was sharded over {state['world_size']} ranks but {self.comm.world_size} are "
                "running; resume with the same world size (whole-tensor ownership depends on it)"
            )
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
