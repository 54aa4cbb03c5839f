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


__all__ = ["is_sharded", "local"]
