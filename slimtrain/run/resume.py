"""Applying what a ``--resume`` may change to the restored training state."""

from __future__ import annotations


def rescale_lr(scheduler, factor: float) -> None:
    """Scale a restored ``LambdaLR``'s base learning rates by ``factor`` (new peak lr / saved peak
    lr) and set every group's current lr from the scheduler's lambdas at its restored position,
    so a changed lr / warmup / floor takes effect from the next step on (torch's
    ``load_state_dict`` restores the saved base lrs, which would silently keep the old schedule)."""
    scheduler.base_lrs = [base * factor for base in scheduler.base_lrs]
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


__all__ = ["rescale_lr"]
