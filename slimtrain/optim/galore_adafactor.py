"""GaLore Adafactor: Adafactor's factored second moment on low-rank projected gradients.

Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML 2018;
combined with the gradient projection of Zhao et al., "GaLore", ICML 2024.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from . import projector as proj
from . import row_shards
from .galore_base import GaLoreOptimizerBase
from .shards import is_sharded, local

RowSum = Callable[[Tensor], Tensor]  # sums a tensor over every rank's rows (FSDP2 shards)


def _rms(t: Tensor, row_sum: RowSum | None = None, rows: int | None = None) -> Tensor:
    if row_sum is None:
        return t.norm(2) / (t.numel() ** 0.5)
    # a row shard: the whole tensor's (rows, ...) root mean square from every rank's sum of squares
    numel = rows * math.prod(t.shape[1:])
    return (row_sum(t.float().pow(2).sum()) / numel).sqrt()


def _mean_over_rows(t: Tensor, dim: int, row_sum: RowSum | None, rows: int | None) -> Tensor:
    # dim indexes the rows: their mean over every rank when sharded
    if row_sum is None:
        return t.mean(dim=dim, keepdim=dim == -1)
    return row_sum(t.sum(dim=dim, keepdim=dim == -1)) / rows


def adafactor_lr(lr, step: float, rms: float, *, eps2: float, relative_step: bool, warmup_init: bool, scale_parameter: bool) -> float:
    """Adafactor's effective step size (relative step and parameter scaling, as in the paper)."""
    rel_step = lr
    if relative_step:
        min_step = 1e-6 * step if warmup_init else 1e-2
        rel_step = min(min_step, 1.0 / math.sqrt(step))
    param_scale = max(eps2, rms) if scale_parameter else 1.0
    return param_scale * rel_step


def galore_adafactor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor | None],
    exp_avg_sq_rows: list[Tensor | None],
    exp_avg_sq_cols: list[Tensor | None],
    exp_avg_sqs: list[Tensor | None],
    state_steps: list[Tensor],
    proj_lefts: list[Tensor | None],
    proj_rights: list[Tensor | None],
    *,
    lr: float | None,
    eps: tuple[float, float],
    clip_threshold: float,
    decay_rate: float,
    beta1: float | None,
    weight_decay: float,
    scale_parameter: bool,
    relative_step: bool,
    warmup_init: bool,
    scale: float,
    row_sums: list[RowSum | None] | None = None,
    full_rows: list[int | None] | None = None,
) -> None:
    """Functional GaLore-Adafactor step on optimizer-space gradients (projected for GaLore
    tensors). A tensor is factored (row + column second moments) when its gradient is >= 2-D:
    ``exp_avg_sq_rows/cols`` are then set and ``exp_avg_sqs`` is ``None``, and vice versa.

    ``row_sums[i]`` (FSDP2 row shards): ``params[i]`` and ``grads[i]`` are this rank's rows of a
    tensor with ``full_rows[i]`` rows, and ``row_sums[i]`` sums a tensor over the ranks. Adafactor
    reads four whole-tensor statistics (the parameter's RMS, the row factor's mean, the column
    means, the update's RMS); each becomes a sum over ranks (three scalars and one vector of the
    columns), so N ranks take one process's step.
    """
    for i, param in enumerate(params):
        grad, step_t = grads[i], state_steps[i]
        reduce, rows = (row_sums[i], full_rows[i]) if row_sums else (None, None)
        step_t += 1
        step = float(step_t)
        p32 = param.float() if param.dtype in (torch.float16, torch.bfloat16) else param
        step_lr = adafactor_lr(
            lr, step, float(_rms(p32, reduce, rows)), eps2=eps[1], relative_step=relative_step,
            warmup_init=warmup_init, scale_parameter=scale_parameter,
        )
        beta2t = 1.0 - math.pow(step, decay_rate)
        update = grad**2 + eps[0]
        if exp_avg_sqs[i] is None:
            row, col = exp_avg_sq_rows[i], exp_avg_sq_cols[i]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(_mean_over_rows(update, -2, reduce, rows), alpha=1.0 - beta2t)
            r_factor = (row / _mean_over_rows(row, -1, reduce, rows)).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            update = torch.mul(r_factor, c_factor).mul_(grad)
        else:
            exp_avg_sqs[i].mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = exp_avg_sqs[i].rsqrt().mul_(grad)
        update.div_((_rms(update, reduce, rows) / clip_threshold).clamp_(min=1.0))
        update.mul_(step_lr)
        if beta1 is not None:
            exp_avgs[i].mul_(beta1).add_(update, alpha=1.0 - beta1)
            update = exp_avgs[i]
        if proj_lefts[i] is not None or proj_rights[i] is not None:
            update = proj.project_back(update, proj_lefts[i], proj_rights[i], scale).view_as(param)
        if weight_decay != 0:
            p32.add_(p32, alpha=-weight_decay * step_lr)
        p32.add_(-update)
        if p32 is not param:
            param.copy_(p32)


class GaLoreAdafactor(GaLoreOptimizerBase):
    """Adafactor with GaLore projection for matrices in a ``rank`` group.

    Algorithm: Shazeer & Stern, *Adafactor* (ICML 2018) — relative step size, parameter-scale
    learning rate, update clipping, factored second moment — applied to the projected gradient
    as in Zhao et al., *GaLore* (ICML 2024).

    Memory per (m, n) GaLore matrix with m >= n projected to (m, r): the factored second moment
    is ``m + r`` floats, plus ``m r`` if ``beta1`` is set, plus the ``r n`` projector. Other
    matrices cost ``m + n`` floats (factored), vectors one float per parameter.

    Drop-in for ``galore_torch.GaLoreAdafactor`` (same arguments, defaults and group keys);
    slimtrain's group keys and ``layerwise`` mode are those of :class:`GaLoreAdamW`.
    """

    ROW_SHARDS = True  # on FSDP2 row shards, its whole-matrix statistics are summed over ranks

    def __init__(
        self,
        params,
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        layerwise: bool = False,
        accumulation_steps: int = 1,
    ):
        if lr is not None and relative_step:
            raise ValueError(f"lr={lr!r} cannot be combined with relative_step=True; set relative_step=False to use it")
        if lr is None and not relative_step:
            raise ValueError("relative_step=False needs an explicit lr (e.g. lr=1e-3)")
        if warmup_init and not relative_step:
            raise ValueError("warmup_init=True requires relative_step=True")
        if lr is not None and not 0.0 <= lr:  # as torch.optim: rejects negative and NaN
            raise ValueError(f"lr={lr!r} must be >= 0")
        if len(eps) != 2 or not all(0.0 <= e for e in eps):
            raise ValueError(f"eps={eps!r} must be two numbers >= 0, e.g. (1e-30, 1e-3)")
        if not 0.0 < clip_threshold:
            raise ValueError(f"clip_threshold={clip_threshold!r} must be > 0")
        if not decay_rate <= 0.0:
            raise ValueError(f"decay_rate={decay_rate!r} must be <= 0 (e.g. -0.8)")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay={weight_decay!r} must be >= 0")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"beta1={beta1!r} must be None or lie in [0, 1)")
        defaults = dict(
            lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
            weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
            warmup_init=warmup_init,
        )
        super().__init__(params, defaults, layerwise=layerwise, accumulation_steps=accumulation_steps)

    def _update(self, p: Tensor, low_grad: Tensor, state: dict, group: dict) -> None:
        grad = low_grad.float() if low_grad.dtype in (torch.float16, torch.bfloat16) else low_grad
        factored = grad.dim() >= 2
        if "exp_avg_sq_row" not in state and "exp_avg_sq" not in state:
            if group["beta1"] is not None:
                state["exp_avg"] = torch.zeros_like(grad)
            if factored:
                state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])
                state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
        state.setdefault("step", torch.tensor(0.0))
        galore = "rank" in group
        sharded = is_sharded(p)
        if sharded and grad.dim() > 2:
            raise ValueError(f"GaLoreAdafactor on an FSDP2 shard of shape {tuple(p.shape)}: factored moments of a "
                             ">2-D gradient are not supported on row shards")
        galore_adafactor(
            [local(p)], [grad], [state.get("exp_avg")], [state.get("exp_avg_sq_row")], [state.get("exp_avg_sq_col")],
            [state.get("exp_avg_sq")], [state["step"]],
            [state.get("proj_left") if galore else None], [state.get("proj_right") if galore else None],
            lr=group["lr"], eps=group["eps"], clip_threshold=group["clip_threshold"], decay_rate=group["decay_rate"],
            beta1=group["beta1"], weight_decay=group["weight_decay"], scale_parameter=group["scale_parameter"],
            relative_step=group["relative_step"], warmup_init=group["warmup_init"],
            scale=group["scale"] if galore else 1.0,
            row_sums=[(lambda t: row_shards.all_reduce_sum(t, p)) if sharded else None],
            full_rows=[p.shape[0] if sharded else None],
        )
