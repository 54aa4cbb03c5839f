"""The two kinds of optimizer step, as functions: backprop (any engine) and zeroth-order.

Both take the micro-batches of one step (an iterable, read lazily) and ``loss_of(module,
batch)``, and return a :class:`StepOutcome`. Neither touches the schedule, the step counter or
the NaN policy: the loop owns those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .distributed import Distributed
from .engines import Engine

LossFn = Callable[[torch.nn.Module, object], torch.Tensor]


@dataclass
class StepOutcome:
    loss: float
    """Mean loss over the step's micro-batches and ranks."""
    grad_norm: float
    """Global gradient norm before clipping (nan where the engine has none)."""
    applied: bool
    """False when the step was refused (non-finite loss or gradients): no weight moved (layer-wise:
    see :class:`.engines.LayerwiseEngine`)."""


def backprop_step(engine: Engine, micro_batches: Iterable, loss_of: LossFn, dist: Distributed,
                  grad_accum: int, max_grad_norm: float) -> StepOutcome:
    """Forward + backward over the micro-batches, then the engine's sync / clip / update."""
    total = torch.zeros((), device=dist.device)
    engine.begin_step()
    for i, batch in enumerate(micro_batches):
        engine.before_forward(last=i == grad_accum - 1)
        loss = loss_of(engine.module, batch)
        engine.backward(loss, grad_accum)
        total += loss.detach() / grad_accum
    loss = float(dist.mean(total))
    if not math.isfinite(loss):
        engine.discard()
        return StepOutcome(loss, float("nan"), applied=False)
    grad_norm, applied = engine.apply(max_grad_norm)
    return StepOutcome(loss, grad_norm, applied)


def zeroth_order_step(optimizer, micro_batches: Iterable, loss_of: LossFn, engine: Engine, dist: Distributed,
                      grad_accum: int) -> StepOutcome:
    """``optimizer.step(closure)`` with a closure that returns the rank-averaged loss of the step's
    micro-batches, under ``torch.no_grad()`` (MeZO evaluates it at ``w +- eps z``)."""
    batches = list(micro_batches)
    seen = []

    def closure():
        with torch.no_grad():
            total = sum(loss_of(engine.module, batch) for batch in batches) / grad_accum
            total = dist.mean(total)
        engine.after_forward_without_backward()  # the weights move next, in place
        seen.append(total)
        return total

    returned = optimizer.step(closure)
    loss = float((returned if isinstance(returned, torch.Tensor) else seen[0]).detach().float())
    return StepOutcome(loss, float("nan"), applied=math.isfinite(loss))


__all__ = ["StepOutcome", "backprop_step", "zeroth_order_step"]
