"""Whole-tensor ownership for shape-preserving optimizer-state sharding (ZeRO-1/2 without
flattening), as :class:`slimtrain.parallel.DataParallelOptimizer` uses it.

DeepSpeed ZeRO flattens parameters and gives each rank a 1-D slice, which defeats optimizers
that need matrices (GaLore's SVD, 8-bit block layouts keyed to a tensor); FSDP2 shards every
tensor by rows, which carries the element-wise and right-projected GaLore optimizers but not
those that need a whole matrix on one rank (Q-GaLore's INT8 weights, APOLLO, Fira, Natural
GaLore). Here whole tensors are assigned to owner ranks instead, balanced by the optimizer-state
size each will create, so state is ~1/N per rank and every tensor keeps its shape.
"""

from __future__ import annotations

from torch import Tensor

from ..optim import projector as proj


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
