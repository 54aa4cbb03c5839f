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


def check_8bit_args(min_8bit_size: int, block_size: int, backend: str | None, backends: tuple) -> None:
    """What the 8-bit-state optimizers add: the fp32 threshold, the block size and the kernel backend."""
    if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"min_8bit_size={min_8bit_size!r} must be a non-negative integer")
    if block_size < 2:
        raise ValueError(f"block_size={block_size!r} must be >= 2 (default 256)")
    if backend is not None and backend not in backends:
        raise ValueError(f"backend={backend!r} is not one of {backends}")


def check_projected_matrix(p, rank: int, side: str, *, who: str, group_index: int, param_index: int) -> None:
    """A tensor in a projected (``rank``) group must be a matrix whose projected side holds ``rank``."""
    if p.dim() != 2:
        raise ValueError(
            f"{who} projects 2-D matrices, but params[{param_index}] of param group {group_index} has shape "
            f"{tuple(p.shape)} ({p.dim()}-D); allowed: 2-D tensors only. Put biases, norms and other "
            "non-matrix tensors in a group without `rank` (galore_param_groups does).")
    m, n = p.shape
    limit = {"left": m, "right": n}.get(side, min(m, n))
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(
            f"rank={rank!r} is out of range for params[{param_index}] of param group {group_index} with shape "
            f"({m}, {n}): allowed 1 <= rank <= {limit} (the matrix's projected side)")
