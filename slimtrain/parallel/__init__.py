"""Distributed plumbing: byte-counted collectives, slimtrain's whole-tensor data parallelism,
DDP's low-rank communication hook and FSDP2 sharding of slimtrain's models."""

from .comm import Comm, all_reduce_bucketed
from .data_parallel import DataParallelOptimizer, merge_sharded_states
from .ddp_hooks import LowRankHookState, lowrank_allreduce_hook
from .sharded import assign_owners, state_cost

__all__ = ["Comm", "DataParallelOptimizer", "LowRankHookState", "all_reduce_bucketed", "assign_owners",
           "lowrank_allreduce_hook", "merge_sharded_states", "state_cost"]
