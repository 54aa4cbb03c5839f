"""Collectives with a byte counter, so benchmarks and tests can see what a step sends."""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist
from torch import Tensor


class Comm:
    """Thin wrapper over ``torch.distributed`` collectives on one process group.

    ``bytes[op]`` accumulates the payload handed to each collective (tensor bytes per call, per
    rank). A ring all-reduce moves about ``2 (N-1)/N`` times its payload over each link; a
    reduce or broadcast about once; report payload and let readers scale by the algorithm.
    """

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.bytes: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if dist.is_initialized() else 0

    def _count(self, op: str, t: Tensor) -> None:
        self.bytes[op] += t.numel() * t.element_size()
        self.calls[op] += 1

    def all_reduce(self, t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        if self.world_size > 1:
            self._count("all_reduce", t)
            dist.all_reduce(t, op=op, group=self.group)
        return t

    def reduce(self, t: Tensor, dst: int) -> Tensor:
        if self.world_size > 1:
            self._count("reduce", t)
            dist.reduce(t, dst=dist.get_global_rank(self.group, dst) if self.group else dst, group=self.group)
        return t

    def broadcast(self, t: Tensor, src: int) -> Tensor:
        if self.world_size > 1:
            self._count("broadcast", t)
            dist.broadcast(t, src=dist.get_global_rank(self.group, src) if self.group else src, group=self.group)
        return t

    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()


def all_reduce_bucketed(comm: Comm, tensors: list[Tensor], bucket_bytes: int = 25 * 2**20, average: bool = True) -> None:
    """All-reduce ``tensors`` in place, packed into flat buckets of at most ``bucket_bytes``
    (one collective per bucket instead of one per tensor, as DDP does)."""
    world = comm.world_size
    if world == 1 or not tensors:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        bucket: list[Tensor] = []
        size = 0
        for t in group + [None]:
            if t is not None and (size + t.numel() * t.element_size() <= bucket_bytes or not bucket):
                bucket.append(t)
                size += t.numel() * t.element_size()
                continue
            if bucket:
                flat = torch.cat([b.reshape(-1) for b in bucket])
                comm.all_reduce(flat)
                if average:
                    flat /= world
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset : offset + b.numel()].view_as(b))
                    offset += b.numel()
            bucket, size = ([t], t.numel() * t.element_size()) if t is not None else ([], 0)
