"""The learning-rate schedule of ``slimtrain train``: linear warmup, then cosine decay."""

from __future__ import annotations

import math


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier for update ``s`` (0-based): linear warmup, then cosine to ``min_ratio``."""

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


__all__ = ["warmup_cosine"]
