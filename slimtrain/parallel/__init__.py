"""Distributed plumbing: byte-counted collectives and low-rank gradient synchronisation."""

from .comm import Comm, all_reduce_bucketed
from .lowrank_sync import LowRankGradSync

__all__ = ["Comm", "all_reduce_bucketed", "LowRankGradSync"]
