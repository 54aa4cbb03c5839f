"""FSDP2 hands optimizers ``DTensor`` parameters (dim-0 shards). An optimizer whose math is
element-wise can step on the local shard as a plain tensor; these helpers give that view."""

from __future__ import annotations

from torch import Tensor


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (a shard of a larger tensor)."""
    return hasattr(t, "to_local") and hasattr(t, "placements")


def local(t: Tensor) -> Tensor:
    """The part of ``t`` this process holds: a DTensor's local shard (a view sharing its storage),
    a plain tensor as it is."""
    return t.to_local() if is_sharded(t) else t


def row_range(t: Tensor) -> tuple[int, int]:
    """``(first, end)``: the rows of the whole tensor that this process holds (all of them for a
    plain tensor; FSDP2's ``Shard(0)``: a contiguous block, possibly empty)."""
    if not is_sharded(t):
        return 0, t.shape[0] if t.dim() else 1
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if any(o != 0 for o in offset[1:]):
        raise ValueError(f"expected a DTensor sharded on dim 0, got placements {tuple(t.placements)}")
    return int(offset[0]), int(offset[0]) + int(shape[0])


__all__ = ["is_sharded", "local", "row_range"]
