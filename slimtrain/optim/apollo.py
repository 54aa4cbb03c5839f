"""APOLLO and APOLLO-Mini: AdamW-like updates from low-rank moments of a random projection.

Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", MLSys 2025 (arXiv 2412.05270).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import projector as proj
from .galore_adamw import adam_direction, apply_direction
from .param_groups import galore_param_groups
from .norm_scaling import SCALE_TYPES, limit_norm_growth, new_limiter_state, scaling_factor
from .spec import OptimizerSpec
from .state_dtypes import restore_state_dtypes
from .validation import check_adam_args, check_projected_matrix

# Keys a projected (``rank``) group may carry and their defaults (apollo-torch's names).
APOLLO_GROUP_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200,
    "scale": 1.0,
    "proj_type": "std",
    "proj": "random",
    "scale_type": "channel",
    "proj_seed": 0,
}
APOLLO_PROJ_TYPES = ("std", "reverse_std", "left", "right")

# How many int64 draws advance one projector seed to the next (apollo-torch's ``ADV_DEFAULT``):
# the seed chain, and so the sequence of projections, is the reference's.
_SEED_ADVANCE = 15


def next_projection_seed(seed: int) -> int:
    """The seed of the projector after the one seeded with ``seed``: the last of 15 int64 draws
    from a CPU generator seeded with it (a pure function of ``seed``, so resume is exact)."""
    g = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (_SEED_ADVANCE,), generator=g)[-1])


def random_projection(shape: tuple[int, int], rank: int, side: str, seed: int, device) -> Tensor:
    """Gaussian projector with entries N(0, 1/rank), regenerated from ``seed`` (never stored).

    ``side="right"``: (rank, n), the gradient (m, n) is projected as ``G @ P.T`` -> (m, rank);
    ``side="left"``: (m, rank), projected as ``P.T @ G`` -> (rank, n). A fresh generator on the
    gradient's device is seeded with ``seed`` (apollo-torch draws the same numbers).
    """
    m, n = shape
    size = (rank, n) if side == "right" else (m, rank)
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(size, generator=g, device=device, dtype=torch.float32) / math.sqrt(rank)


def project_random(grad: Tensor, p_mat: Tensor, side: str) -> Tensor:
    g = grad.float()
    return g @ p_mat.t() if side == "right" else p_mat.t() @ g


def lowrank_grad(grad: Tensor, proj_seed: Tensor, step: float, *, rank: int, side: str, update_proj_gap: int) -> Tensor:
    """The low-rank gradient of this step; advances ``proj_seed`` (an int64 tensor) on refresh
    steps (``step`` = updates done so far is a positive multiple of ``update_proj_gap``)."""
    if step > 0 and int(step) % update_proj_gap == 0:
        proj_seed.fill_(next_projection_seed(int(proj_seed)))
    p_mat = random_projection(tuple(grad.shape), rank, side, int(proj_seed), grad.device)
    return project_random(grad, p_mat, side)


def apollo_direction_to_update(grad: Tensor, low: Tensor, direction: Tensor, limiter_norm: Tensor, *, side: str,
                               scale_type: str, scale: float, scale_front: bool, norm_growth_limiter: bool,
                               limiter_gamma: float) -> Tensor:
    """APOLLO steps 3-4: scale the *raw full-rank* gradient by the channel-/tensor-wise ratio of
    the low-rank Adam direction to the low-rank gradient, limit its norm growth, and multiply by
    ``sqrt(scale)`` (apollo-torch's convention: ``scale`` is alpha^2; APOLLO-Mini uses 128)."""
    update = grad.float() * scaling_factor(direction, low, side, scale_type)
    root = math.sqrt(scale)
    if scale_front:
        update = update * root
    if norm_growth_limiter:
        update = limit_norm_growth(update, limiter_norm, limiter_gamma)
    if not scale_front:
        update = update * root
    return update


def apollo_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    proj_seeds: list[Tensor | None],
    limiter_norms: list[Tensor | None],
    *,
    rank: int | None,
    update_proj_gap: int,
    proj_type: str,
    scale: float,
    scale_type: str,
    scale_front: bool,
    norm_growth_limiter: bool,
    limiter_gamma: float,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
) -> None:
    """Functional APOLLO step on full-rank gradients (one param group's hyperparameters).

    For each tensor with a seed (``proj_seeds[i]`` set)::

        R = G P^T (or P^T G)            P ~ N(0, 1/r) regenerated from the seed, new every gap steps
        m, v = Adam moments of R;  D = m / (sqrt(v) + eps)               (low-rank, r x n or m x r)
        s = ||D||_ch / ||R||_ch          per channel (APOLLO) or whole tensor (APOLLO-Mini)
        U = limit_growth(sqrt(scale) * G * s)                            (Fira's limiter, gamma)
        p -= lr sqrt(1 - b2^t) / (1 - b1^t) * U;  p -= lr wd p

    Tensors without a seed take GaLore-AdamW's plain step (Adam on the full gradient).
    """
    for i, param in enumerate(params):
        step_t, grad = state_steps[i], grads[i]
        if proj_seeds[i] is None:
            direction = adam_direction(grad.to(exp_avgs[i].dtype), exp_avgs[i], exp_avg_sqs[i], step_t, beta1=beta1,
                                       beta2=beta2, eps=eps)
            update = direction
        else:
            side = proj.projection_side(tuple(grad.shape), proj_type)
            low = lowrank_grad(grad, proj_seeds[i], float(step_t), rank=rank, side=side,
                               update_proj_gap=update_proj_gap)
            direction = adam_direction(low, exp_avgs[i], exp_avg_sqs[i], step_t, beta1=beta1, beta2=beta2, eps=eps)
            update = apollo_direction_to_update(grad, low, direction, limiter_norms[i], side=side,
                                                scale_type=scale_type, scale=scale, scale_front=scale_front,
                                                norm_growth_limiter=norm_growth_limiter, limiter_gamma=limiter_gamma)
        apply_direction(param, update, None, None, float(step_t), lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, correct_bias=correct_bias, scale=1.0)


class APOLLOAdamW(Optimizer):
    """APOLLO: Adam moments of a *random* low-rank projection turned into a per-channel scaling of
    the raw gradient (SGD-like memory, AdamW-like updates).

    Algorithm: Zhu et al., *APOLLO: SGD-like Memory, AdamW-level Performance* (MLSys 2025), Alg. 1.
    For each matrix in a ``rank`` group the gradient is projected by a Gaussian matrix P (entries
    N(0, 1/r)) that is *regenerated from a seed* every step and replaced by the next seed's every
    ``update_proj_gap`` steps (no SVD, no stored projector). Adam runs on the (m, r) projection;
    the ratio of the Adam direction's norm to the projected gradient's norm, per channel
    (``scale_type="channel"``) or for the whole tensor (``"tensor"``, APOLLO-Mini), scales the
    *full-rank raw gradient*, whose growth is capped by Fira's norm-growth limiter
    (``limiter_gamma=1.01``; ``disable_nl=True`` turns it off). The update is multiplied by
    ``sqrt(scale)`` (apollo-torch's convention), applied with AdamW's bias-corrected step size
    and decoupled weight decay. Groups without ``rank`` are plain AdamW (GaLore-AdamW's step).

    Memory per (m, n) matrix, m >= n, in fp32: two moments of ``m r`` floats, a 0-d limiter norm
    and an int64 seed, i.e. ``2 r max(m, n)`` floats against AdamW's ``2 m n`` (APOLLO-Mini,
    r = 1: ``2 max(m, n)``, SGD-like). A transient P of ``r min(m, n)`` floats exists during the
    step. Other tensors cost AdamW's 2 floats per parameter.

    Drop-in for ``apollo_torch.APOLLOAdamW`` with ``proj="random"`` groups: same defaults
    (``eps=1e-6``, ``correct_bias``, ``scale_front``, ``disable_nl``), same group keys
    (``rank``, ``update_proj_gap``, ``scale``, ``proj_type`` in std / reverse_std / left / right,
    ``scale_type``, ``proj``) and the same seed chain (seed ``proj_seed + 1 + i`` for the i-th
    parameter over all groups, then apollo-torch's ``next_seed``): configured alike the two follow
    the same trajectory. State is tensors only (``torch.load(weights_only=True)`` resumes exactly).
    A non-2-D tensor or a rank above the projected side in a ``rank`` group raises ``ValueError``.
    """

    # Projects each matrix of a rank group (flat ZeRO partitions would break it); the update needs
    # the full gradient, so gradients travel whole; state is per tensor and shards by tensors.
    spec = OptimizerSpec(whole_matrices=True)

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        scale_front: bool = False,
        disable_nl: bool = False,
        no_deprecation_warning: bool = True,  # accepted for apollo-torch compatibility
        *,
        limiter_gamma: float = 1.01,
    ):
        check_adam_args(lr, betas, eps, weight_decay)
        if not limiter_gamma >= 1.0:
            raise ValueError(f"limiter_gamma={limiter_gamma!r} must be >= 1 (allowed norm growth per step, e.g. 1.01)")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        scale_front=bool(scale_front), norm_growth_limiter=not disable_nl,
                        limiter_gamma=float(limiter_gamma))
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups
    def _group_defaults(self) -> dict[str, Any]:
        return APOLLO_GROUP_DEFAULTS

    def add_param_group(self, param_group: dict) -> None:
        if "rank" in param_group:
            for key, value in self._group_defaults().items():
                param_group.setdefault(key, value)
            self._validate_group(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "rank" in group:
            index = len(self.param_groups) - 1
            for i, p in enumerate(group["params"]):
                side = proj.projection_side(tuple(p.shape), group["proj_type"]) if p.dim() == 2 else "min"
                check_projected_matrix(p, group["rank"], side, who=type(self).__name__, group_index=index,
                                       param_index=i)

    @staticmethod
    def _validate_group(group: dict) -> None:
        gap = group["update_proj_gap"]
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
            raise ValueError(f"update_proj_gap={gap!r} must be an integer >= 1 (steps between new projections)")
        if group["proj"] != "random":
            raise ValueError(f"proj={group['proj']!r}: APOLLO here uses random projections only (allowed: 'random'); "
                             "for SVD projectors use GaLoreAdamW or FiraAdamW")
        if group["proj_type"] not in APOLLO_PROJ_TYPES:
            raise ValueError(f"proj_type={group['proj_type']!r} is not one of {APOLLO_PROJ_TYPES}")
        if group["scale_type"] not in SCALE_TYPES:
            raise ValueError(f"scale_type={group['scale_type']!r} is not one of {SCALE_TYPES}")
        if isinstance(group["scale"], bool) or not isinstance(group["scale"], (int, float)) or group["scale"] <= 0:
            raise ValueError(f"scale={group['scale']!r} must be a number > 0 (the update is multiplied by sqrt(scale))")
        if isinstance(group["proj_seed"], bool) or not isinstance(group["proj_seed"], int) or group["proj_seed"] < 0:
            raise ValueError(f"proj_seed={group['proj_seed']!r} must be an integer >= 0")

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but moments stay fp32 for bf16/fp16 parameters (see state_dtypes)."""
        super().load_state_dict(state_dict)
        restore_state_dtypes(self, state_dict)

    # ------------------------------------------------------------------ state
    def _init_moments(self, state: dict, shape: tuple[int, ...], device) -> None:
        state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=device)

    def _init_group(self, group: dict, first_index: int) -> list[Tensor]:
        """Lazily create state for the group's tensors with a gradient; return those tensors."""
        with_grad = []
        for offset, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            with_grad.append(p)
            state = self.state[p]
            if "step" in state:
                continue
            state["step"] = torch.tensor(0.0)
            if "rank" in group:
                m, n = p.shape
                side = proj.projection_side((m, n), group["proj_type"])
                low_shape = (m, group["rank"]) if side == "right" else (group["rank"], n)
                self._init_moments(state, low_shape, p.device)
                # apollo-torch numbers parameters from 1 over all groups; kept on CPU (it seeds a generator)
                state["proj_seed"] = torch.tensor(group["proj_seed"] + first_index + offset + 1, dtype=torch.int64)
                state["limiter_norm"] = new_limiter_state(p.device)
            else:
                self._init_moments(state, tuple(p.shape), p.device)
        return with_grad

    # ------------------------------------------------------------------ step
    def _hyper(self, group: dict) -> dict:
        beta1, beta2 = group["betas"]
        rank = "rank" in group
        return dict(rank=group["rank"] if rank else None,
                    update_proj_gap=group["update_proj_gap"] if rank else 1,
                    proj_type=group["proj_type"] if rank else "std", scale=group["scale"] if rank else 1.0,
                    scale_type=group["scale_type"] if rank else "channel", scale_front=group["scale_front"],
                    norm_growth_limiter=group["norm_growth_limiter"], limiter_gamma=group["limiter_gamma"],
                    lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                    correct_bias=group["correct_bias"])

    def _group_step(self, group: dict, params: list[Tensor]) -> None:
        st = [self.state[p] for p in params]
        apollo_adamw(params, [p.grad for p in params], [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st],
                     [s["step"] for s in st], [s.get("proj_seed") for s in st], [s.get("limiter_norm") for s in st],
                     **self._hyper(group))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        first_index = 0
        for group in self.param_groups:
            params = self._init_group(group, first_index)
            first_index += len(group["params"])
            if params:
                self._group_step(group, params)
        return loss


class APOLLOMini(APOLLOAdamW):
    """APOLLO-Mini: rank-1 random projection with one *tensor-wise* scaling factor.

    Algorithm: Zhu et al., *APOLLO* (MLSys 2025), Sec. 4 ("APOLLO-Mini"): ``rank=1``,
    ``scale_type="tensor"`` and a heuristic scale alpha = sqrt(128) (``scale=128`` here, since
    the update is multiplied by ``sqrt(scale)`` as in apollo-torch). Everything else is
    :class:`APOLLOAdamW`'s. Memory per (m, n) matrix: ``2 max(m, n)`` fp32 floats plus a seed and
    a limiter norm, i.e. about SGD's; other tensors cost AdamW's 2 floats per parameter.
    A ``rank`` group with a rank other than 1 raises ``ValueError`` (use :class:`APOLLOAdamW`).
    """

    def _group_defaults(self) -> dict[str, Any]:
        return {**APOLLO_GROUP_DEFAULTS, "scale": 128.0, "scale_type": "tensor"}

    def add_param_group(self, param_group: dict) -> None:
        if "rank" in param_group and param_group["rank"] != 1:
            raise ValueError(f"rank={param_group['rank']!r}: APOLLO-Mini is rank 1 (allowed: 1); "
                             "use APOLLOAdamW for higher ranks")
        super().add_param_group(param_group)


def apollo_param_groups(model, target_modules="all-linear", rank: int = 256, update_proj_gap: int = 200,
                        scale: float = 1.0, proj_type: str = "std", scale_type: str = "channel",
                        **kwargs) -> list[dict]:
    """``galore_param_groups`` with APOLLO's group keys (``scale_type``, ``proj="random"``)."""
    return galore_param_groups(model, target_modules, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                               proj_type=proj_type, scale_type=scale_type, proj="random", **kwargs)


__all__ = [
    "APOLLOAdamW",
    "APOLLOMini",
    "apollo_adamw",
    "apollo_param_groups",
    "next_projection_seed",
    "random_projection",
]
