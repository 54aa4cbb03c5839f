"""GaLore AdamW: Adam moments kept in a low-rank gradient subspace.

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024.
"""

from __future__ import annotations

import math
import torch
from torch import Tensor

from .validation import check_adam_args
from . import projector as proj
from .galore_base import GaLoreOptimizerBase
from .shards import local
from .natural import NATURAL_DEFAULT_DAMPING, check_natural_args


def galore_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    proj_lefts: list[Tensor | None],
    proj_rights: list[Tensor | None],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
    scale: float,
) -> None:
    """Functional GaLore-AdamW step on gradients that are *already* in optimizer space.

    ``grads[i]`` is the projected gradient when ``proj_lefts[i]`` / ``proj_rights[i]`` is set
    (GaLore tensors), the full gradient otherwise. Because the moments only ever see the
    projected gradient, callers may project, all-reduce or accumulate it themselves (the
    distributed code all-reduces r x n instead of m x n) and then call this.

    Update rule (galore-torch / transformers AdamW, bias correction folded into the step size,
    decoupled weight decay applied after the update)::

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * scale * P^T( m / (sqrt(v) + eps) )
        p -= lr * wd * p
    """
    for i, param in enumerate(params):
        left, right = proj_lefts[i], proj_rights[i]
        norm_grad = adam_direction(grads[i], exp_avgs[i], exp_avg_sqs[i], state_steps[i], beta1=beta1, beta2=beta2,
                                   eps=eps)
        apply_direction(param, norm_grad, left, right, float(state_steps[i]), lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, correct_bias=correct_bias, scale=scale)


def adam_direction(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_t: Tensor, *, beta1: float, beta2: float,
                   eps: float) -> Tensor:
    """First half of the step: advance the moments and ``step_t``; return ``m / (sqrt(v) + eps)``
    (in optimizer space, i.e. low-rank for GaLore tensors)."""
    step_t += 1
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(eps)
    return exp_avg / denom


def apply_direction(param: Tensor, norm_grad: Tensor, left: Tensor | None, right: Tensor | None, step: float, *,
                    lr: float, beta1: float, beta2: float, weight_decay: float, correct_bias: bool,
                    scale: float) -> None:
    """Second half: project the direction back, scale by the bias-corrected step size and apply
    decoupled weight decay. Sharded data parallelism sends ``norm_grad`` (r x n) from the
    tensor's owner and every rank runs this, so all ranks compute the same new weight."""
    step_size = lr
    if correct_bias:
        step_size = step_size * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    if left is not None or right is not None:
        norm_grad = proj.project_back(norm_grad, left, right, scale).view_as(param)
    param.add_(norm_grad.to(param.dtype), alpha=-step_size)
    if weight_decay > 0.0:
        param.add_(param, alpha=-lr * weight_decay)


class GaLoreAdamW(GaLoreOptimizerBase):
    """AdamW whose moments for matrices in a ``rank`` group live in a rank-r gradient subspace.

    Algorithm: Zhao et al., *GaLore* (ICML 2024), Alg. 2. Every ``update_proj_gap`` steps the
    projector is refreshed from the gradient's top-r singular vectors (exact SVD, or a
    randomized range finder with ``proj_method="randomized"``); in between the gradient of an
    (m, n) matrix is projected to (m, r) or (r, n), Adam runs there, and the update is
    projected back and scaled by ``scale``.

    Memory per (m, n) GaLore matrix, m >= n: two moments of m*r plus a projector of r*n, i.e.
    ``(2m + n) r`` floats instead of AdamW's ``2 m n``; other tensors cost AdamW's 2 floats per
    parameter. Moments and projectors are fp32 (also for bf16/fp16 parameters).

    Drop-in for ``galore_torch.GaLoreAdamW``: same constructor defaults (``eps=1e-6``,
    ``correct_bias``), same group keys (``rank``, ``update_proj_gap``, ``scale``,
    ``proj_type`` in std / reverse_std / left / right / full), and groups without ``rank`` are
    plain AdamW. slimtrain additions, all optional:

    * group keys ``proj_method`` ("svd" | "randomized"), ``oversample``, ``power_iters``,
      ``proj_seed`` (randomized probes are seeded per tensor and step, not from global RNG),
      ``max_grad_norm`` (per-tensor clipping of the optimizer-space gradient; see
      ``docs/galore.md``);
    * ``natural_history=s`` (> 0; constructor argument or group key) with ``natural_damping``
      (lambda, default 1e-3): **Natural GaLore** (Das 2024, arXiv:2410.16029). The low-rank
      gradient (after clipping) is replaced by ``(lambda I + G G^T)^{-1} g`` over the last ``s``
      low-rank gradients ``G``, computed with Woodbury's identity from an ``s x s`` system, and
      that is what Adam's moments see. Costs ``s`` extra copies of the low-rank gradient per
      matrix (``s m r`` floats for the (m, r) case above), kept across projector refreshes as the
      reference code does; see ``slimtrain.optim.natural`` and ``docs/galore.md``;
    * ``layerwise=True``: each tensor is updated in its post-accumulate-grad hook, so at most
      one full gradient is alive; ``accumulation_steps=k`` accumulates the *projected*
      gradient between micro-batches. ``step()`` then only flushes stragglers.

    Robustness: a rank above the projected dimension is clamped with a warning; conv weights
    are projected as (out, in*kh*kw); a failed or non-finite SVD keeps the previous projector;
    a 1-D tensor in a rank group raises (that is what DeepSpeed ZeRO>=1 hands an optimizer).
    """

    SPLIT_STEP = True  # lowrank_direction + apply_lowrank_direction
    ROW_SHARDS = True  # element-wise moments of the projected rows: steps on FSDP2 shards

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        no_deprecation_warning: bool = True,  # accepted for galore-torch compatibility
        *,
        natural_history: int = 0,
        natural_damping: float = NATURAL_DEFAULT_DAMPING,
        layerwise: bool = False,
        accumulation_steps: int = 1,
    ):
        check_adam_args(lr, betas, eps, weight_decay)
        check_natural_args(natural_history, natural_damping)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        natural_history=natural_history, natural_damping=natural_damping)
        super().__init__(params, defaults, layerwise=layerwise, accumulation_steps=accumulation_steps)

    # ------------------------------------------------------------------ split step (sharded DP)
    def lowrank_direction(self, p: Tensor, low_grad: Tensor) -> Tensor:
        """Owner side of a sharded step for a GaLore matrix: clip, advance the moments and the step
        counter, and return the low-rank direction (same shape as ``low_grad``) to broadcast."""
        group = self._group_of(p)
        state = self.state[p]
        low_grad = self._precondition(p, low_grad, group)
        self._init_moments(state, low_grad)
        beta1, beta2 = group["betas"]
        return adam_direction(low_grad.to(state["exp_avg"].dtype), state["exp_avg"], state["exp_avg_sq"],
                              state["step"], beta1=beta1, beta2=beta2, eps=group["eps"])

    def apply_lowrank_direction(self, p: Tensor, direction: Tensor) -> None:
        """Every rank: apply ``direction`` with this rank's (replicated) projector and step counter."""
        group = self._group_of(p)
        state = self.state[p]
        beta1, beta2 = group["betas"]
        apply_direction(p, direction, state.get("proj_left"), state.get("proj_right"), float(state["step"]),
                        lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                        correct_bias=group["correct_bias"], scale=group["scale"])

    @staticmethod
    def _init_moments(state: dict, low_grad: Tensor) -> None:
        if "exp_avg" not in state:
            # fp32 moments even for bf16/fp16 parameters: they are small (low-rank) and Adam's
            # second moment underflows in half precision.
            dtype = torch.float32 if low_grad.dtype in (torch.float16, torch.bfloat16) else low_grad.dtype
            state["exp_avg"] = torch.zeros_like(low_grad, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(low_grad, dtype=dtype, memory_format=torch.preserve_format)
        state.setdefault("step", torch.tensor(0.0))

    def _update(self, p: Tensor, low_grad: Tensor, state: dict, group: dict) -> None:
        self._init_moments(state, low_grad)
        beta1, beta2 = group["betas"]
        galore = "rank" in group
        galore_adamw(
            [local(p)],  # an FSDP2 shard steps on its own rows (low_grad is theirs)
            [low_grad.to(state["exp_avg"].dtype)],
            [state["exp_avg"]],
            [state["exp_avg_sq"]],
            [state["step"]],
            [state.get("proj_left") if galore else None],
            [state.get("proj_right") if galore else None],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            correct_bias=group["correct_bias"],
            scale=group["scale"] if galore else 1.0,
        )
