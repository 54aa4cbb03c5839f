"""Guards that keep a run from being poisoned: finite-gradient checks agreed by every rank, and
divergence detection against the initial eval loss.

A step is applied only when the loss and every gradient that goes into it are finite. The
check runs on each rank's *local* gradients before any communication (a NaN anywhere makes the
all-reduced gradient NaN, so this is the same decision, taken before a GaLore projector refresh
could consume it) and the ranks agree on it with one all-reduce; the trainer checks the global
norm of what the optimizer will apply once more after the reduction (an overflow in the sum).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def all_ranks_agree(ok: bool, device: torch.device | str = "cpu") -> bool:
    """True only when ``ok`` holds on every rank (one all-reduce of a flag on the communication
    ``device``: NCCL refuses CPU tensors; no-op on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=device)
    dist.all_reduce(flag)
    return int(flag) == 0


@torch.no_grad()
def local_grads_finite(params) -> bool:
    """Whether every existing ``.grad`` among ``params`` is finite on this rank."""
    for p in params:
        g = p.grad
        if g is not None and not bool(torch.isfinite(g).all()):
            return False
    return True


def grads_finite(params, device: torch.device | str = "cpu") -> bool:
    """Every rank's gradients finite (the ranks agree; call on all ranks)."""
    return all_ranks_agree(local_grads_finite(params), device)


class DivergenceGuard:
    """Stops a run whose eval loss rose more than ``margin`` (nats) above the initial eval loss,
    or became non-finite. ``margin <= 0`` turns it off."""

    def __init__(self, margin: float, initial: float | None = None):
        self.margin = margin
        self.initial = initial

    @property
    def enabled(self) -> bool:
        return self.margin > 0

    def check(self, eval_loss: float, step: int) -> str | None:
        """None while the run is fine, else the reason to stop."""
        if not self.enabled or self.initial is None:
            return None
        if not math.isfinite(eval_loss):
            return f"the eval loss at step {step} is {eval_loss} (the initial eval loss was {self.initial:.4f})"
        if eval_loss > self.initial + self.margin:
            return (f"the eval loss at step {step} is {eval_loss:.4g}, more than train.divergence_margin="
                    f"{self.margin} above the initial eval loss {self.initial:.4f}: the run diverged")
        return None


__all__ = ["all_ranks_agree", "local_grads_finite", "grads_finite", "DivergenceGuard"]
