"""Process group and device for one training process (torchrun, deepspeed or a plain python).

Kept apart from the loop so the loop never asks how it was launched: it gets a
:class:`Distributed` with the world, this rank, the device, and the two collectives the loop needs
(a mean over ranks and an in-place average), whose tensors live on the communication device
(NCCL refuses CPU tensors).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Distributed:
    world: int
    rank: int
    local_rank: int
    device: torch.device
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` averaged over ranks (a new tensor; ``value`` itself is left alone)."""
        if self.world == 1:
            return value
        value = value.detach().clone().to(self.device)
        dist.all_reduce(value)
        return value / self.world

    def average_in_place(self, t: torch.Tensor) -> None:
        """Average ``t`` over ranks in place (layer-wise optimizers' ``grad_reducer``)."""
        dist.all_reduce(t)
        t /= self.world

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over ranks (moved to the communication device and back)."""
        if self.world == 1:
            return t
        moved = t.to(self.device)
        dist.all_reduce(moved)
        return moved.to(t.device)

    def barrier(self) -> None:
        """Wait for every rank (e.g. until rank 0 has written an export, before any rank tears down)."""
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(engine: str) -> Distributed:
    """Join (or form) the process group the launcher described in the environment.

    ``engine="deepspeed"`` lets DeepSpeed form the group (its launcher and ours both set the
    usual variables; a single process started by hand gets a one-rank group on a free port).
    """
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    owns = False
    if engine == "deepspeed":
        if not cuda:
            # DeepSpeed picks its accelerator when first imported; without CUDA it must be cpu.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if "MASTER_ADDR" not in env:  # a single process started without any launcher
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                       LOCAL_RANK="0")
        import deepspeed

        owns = not dist.is_initialized()
        deepspeed.init_distributed(dist_backend=backend)
    elif (world > 1 or engine == "fsdp") and not dist.is_initialized():
        if world == 1 and "MASTER_ADDR" not in env:  # FSDP2 needs a group even for one process started by hand
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend)
        owns = True
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return Distributed(world=world, rank=rank, local_rank=local_rank, device=device, owns_process_group=owns)


__all__ = ["Distributed", "free_port", "setup_distributed"]
