"""Fira: GaLore's low-rank Adam plus a norm-scaled full-rank residual.

Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?",
arXiv 2410.01623 (2024).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import projector as proj
from .galore_adamw import adam_direction, apply_direction, galore_adamw
from .galore_base import GaLoreOptimizerBase
from .spec import OptimizerSpec
from .norm_scaling import SCALE_TYPES, limit_norm_growth, new_limiter_state, scaling_factor
from .validation import check_adam_args, check_projected_matrix


def fira_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    low_grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    proj_lefts: list[Tensor | None],
    proj_rights: list[Tensor | None],
    limiter_norms: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
    scale: float,
    scale_type: str,
    norm_growth_limiter: bool,
    limiter_gamma: float,
) -> None:
    """Functional Fira step for projected matrices: ``grads[i]`` is the full gradient G (m, n),
    ``low_grads[i]`` its projection R = P^T G with the current projector (refreshed by the caller)::

        m, v = Adam moments of R;  D = m / (sqrt(v) + eps)
        s = ||D||_ch / ||R||_ch                    per channel ("channel") or whole matrix ("tensor")
        E = limit_growth(s * (G - P R))            residual outside the subspace, Fira's limiter
        p -= lr sqrt(1 - b2^t) / (1 - b1^t) * (scale * P D + E);  p -= lr wd p

    ``scale`` (GaLore's alpha) multiplies the low-rank term only; the residual is the exact
    complement of the subspace (the paper's ``G - P P^T G``).
    """
    for i, param in enumerate(params):
        left, right = proj_lefts[i], proj_rights[i]
        low, grad = low_grads[i], grads[i]
        direction = adam_direction(low, exp_avgs[i], exp_avg_sqs[i], state_steps[i], beta1=beta1, beta2=beta2,
                                   eps=eps)
        residual = proj.as_matrix(grad).to(low.dtype) - proj.project_back(low, left, right, 1.0)
        side = "right" if left is None else "left"
        residual = residual * scaling_factor(direction, low, side, scale_type)
        if norm_growth_limiter:
            residual = limit_norm_growth(residual, limiter_norms[i], limiter_gamma)
        update = proj.project_back(direction, left, right, scale) + residual
        apply_direction(param, update.view_as(param), None, None, float(state_steps[i]), lr=lr, beta1=beta1,
                        beta2=beta2, weight_decay=weight_decay, correct_bias=correct_bias, scale=1.0)


class FiraAdamW(GaLoreOptimizerBase):
    """GaLore-AdamW plus the gradient outside the subspace, scaled like Adam would scale it.

    Algorithm: Chen et al., *Fira* (2024), Alg. 1. Matrices in a ``rank`` group are projected as
    in :class:`~slimtrain.optim.GaLoreAdamW` (SVD projector refreshed every ``update_proj_gap``
    steps; same projector code and group keys), Adam runs on the projection R, and the residual
    ``G - P R`` that GaLore drops is added back, scaled by the norm ratio of the low-rank Adam
    direction to R per column/row (``scale_type="channel"``, the paper's final choice) or for
    the whole matrix (``"tensor"``), with its norm growth capped at ``limiter_gamma`` (1.01) per
    step. Groups without ``rank`` are plain AdamW.

    Memory per (m, n) matrix, m >= n: GaLore's ``(2m + n) r`` fp32 floats (moments and projector)
    plus one 0-d limiter norm; other tensors cost AdamW's 2 floats per parameter.

    Drop-in for ``fira.FiraAdamW`` (``eps=1e-6``, ``correct_bias``; groups may say ``alpha``
    instead of ``scale``). Configured alike (``scale``/``alpha`` = 1, exact SVD) the two follow
    the same trajectory; with ``alpha != 1`` fira also scales the subtracted projection (its
    residual is ``G - alpha P P^T G``), here the residual is the paper's exact complement.
    A non-2-D tensor or a rank above the matrix's projected side in a ``rank`` group raises
    ``ValueError``. No layer-wise mode and no projected-gradient sync: Fira needs each full
    gradient (its spec has no ``lowrank_grads``; data parallelism all-reduces full gradients).
    """

    @classmethod
    def spec_for(cls, layerwise: bool = False) -> OptimizerSpec:
        # Fira's residual needs the full gradient: data-parallel code must not hand it projected
        # ones, and there is no layer-wise mode. It still needs whole matrices.
        return OptimizerSpec(whole_matrices=True, replicated_state=cls.REPLICATED_STATE)

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        no_deprecation_warning: bool = True,  # accepted for fira compatibility
        *,
        scale_type: str = "channel",
        limiter_gamma: float = 1.01,
        disable_nl: bool = False,
    ):
        check_adam_args(lr, betas, eps, weight_decay)
        if scale_type not in SCALE_TYPES:
            raise ValueError(f"scale_type={scale_type!r} is not one of {SCALE_TYPES}")
        if not limiter_gamma >= 1.0:
            raise ValueError(f"limiter_gamma={limiter_gamma!r} must be >= 1 (allowed norm growth per step, e.g. 1.01)")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        scale_type=scale_type, limiter_gamma=float(limiter_gamma), norm_growth_limiter=not disable_nl)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        if "rank" in param_group and "alpha" in param_group:  # fira's name for GaLore's scale
            param_group.setdefault("scale", param_group.pop("alpha"))
        if torch.is_tensor(param_group["params"]):
            param_group["params"] = [param_group["params"]]
        param_group["params"] = list(param_group["params"])
        if "rank" in param_group:
            index = len(self.param_groups)
            proj_type = param_group.get("proj_type", "std")
            if proj_type == "full":
                raise ValueError("proj_type='full' is not supported by FiraAdamW (allowed: std, reverse_std, left, "
                                 "right): the residual scaling needs a one-sided projector")
            for i, p in enumerate(param_group["params"]):
                side = proj.projection_side(tuple(p.shape), proj_type) if p.dim() == 2 else "min"
                check_projected_matrix(p, param_group["rank"], side, who="FiraAdamW", group_index=index,
                                       param_index=i)
        super().add_param_group(param_group)
        if "rank" in self.param_groups[-1] and self.param_groups[-1]["scale_type"] not in SCALE_TYPES:
            raise ValueError(f"scale_type={self.param_groups[-1]['scale_type']!r} is not one of {SCALE_TYPES}")

    def set_projected_grad(self, p: Tensor, low_grad: Tensor) -> None:
        raise RuntimeError("FiraAdamW needs each full gradient (its residual lies outside the subspace); "
                           "all-reduce full gradients instead of projected ones")

    def _apply(self, p: Tensor, grad: Tensor, group: dict) -> None:
        """Project (refreshing the projector when due) and update one tensor from its full gradient."""
        low = self.to_optimizer_space(p, grad, group)
        state = self.state[p]
        if "rank" not in group:
            self._update(p, self._clip(low, group["max_grad_norm"]), state, group)
            return
        grad = self._clip(grad, group["max_grad_norm"])
        if group["max_grad_norm"] is not None:
            low = proj.project(grad, state.get("proj_left"), state.get("proj_right"))
        self._init_moments(state, low)
        if "limiter_norm" not in state:
            state["limiter_norm"] = new_limiter_state(low.device)
        beta1, beta2 = group["betas"]
        fira_adamw([p], [grad], [low], [state["exp_avg"]], [state["exp_avg_sq"]], [state["step"]],
                   [state.get("proj_left")], [state.get("proj_right")], [state["limiter_norm"]], lr=group["lr"],
                   beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                   correct_bias=group["correct_bias"], scale=group["scale"], scale_type=group["scale_type"],
                   norm_growth_limiter=group["norm_growth_limiter"], limiter_gamma=group["limiter_gamma"])

    @staticmethod
    def _init_moments(state: dict, like: Tensor) -> None:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(like, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(like, dtype=torch.float32)
        state.setdefault("step", torch.tensor(0.0))

    def _update(self, p: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        # tensors outside rank groups: GaLore-AdamW's plain step
        self._init_moments(state, grad)
        beta1, beta2 = group["betas"]
        galore_adamw([p], [grad.float()], [state["exp_avg"]], [state["exp_avg_sq"]], [state["step"]], [None], [None],
                     lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                     correct_bias=group["correct_bias"], scale=1.0)


__all__ = ["FiraAdamW", "fira_adamw"]
