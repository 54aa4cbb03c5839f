"""Argument checks shared by the Adam-family optimizers (errors name the bad value)."""

from __future__ import annotations


def check_adam_args(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not 0.0 <= lr:
        raise ValueError(f"lr={lr!r} must be >= 0")
    if len(betas) != 2 or not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"betas={betas!r} must be two numbers in [0, 1), e.g. (0.9, 0.999)")
    if not 0.0 <= eps:
        raise ValueError(f"eps={eps!r} must be >= 0")
    if not 0.0 <= weight_decay:
        raise ValueError(f"weight_decay={weight_decay!r} must be >= 0")
