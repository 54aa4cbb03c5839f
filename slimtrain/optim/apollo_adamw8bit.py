"""APOLLO / APOLLO-Mini with block-wise 8-bit low-rank moments.

Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", MLSys 2025; moments as in
Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from . import projector as proj
from .adamw8bit import SKIPPED, has_8bit_moments, init_8bit_moments, load_8bit_moments
from .apollo import APOLLOAdamW, APOLLOMini, apollo_direction_to_update, lowrank_grad
from .galore_adamw import apply_direction
from .galore_adamw8bit import galore_adamw8bit
from .validation import check_8bit_args


def apollo_adamw8bit(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[kernels.Blockwise8bit],
    exp_avg_sqs: list[kernels.Blockwise8bit],
    nonfinite_skipped: list[Tensor],
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
    backend: str | None = None,
) -> None:
    """Functional APOLLO step (:func:`slimtrain.optim.apollo.apollo_adamw`'s rule) whose Adam
    moments are 8-bit codes + fp32 absmax per block.

    The fused 8-bit kernel advances the low-rank moments and writes the plain direction
    ``m / (sqrt(v) + eps)`` (called with unit step size and no bias correction: the correction
    is in the step size applied afterwards, as in the fp32 step); scaling, limiter and the update
    are the fp32 step's. Tensors without a seed take GaLore-AdamW8bit's plain 8-bit step.
    Non-finite gradient elements are skipped by the kernel and counted in ``nonfinite_skipped``.
    """
    for i, param in enumerate(params):
        m, v = exp_avgs[i], exp_avg_sqs[i]
        if proj_seeds[i] is None:
            galore_adamw8bit([param], [grads[i].float()], [m], [v], [nonfinite_skipped[i]], [state_steps[i]], [None],
                             [None], lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                             correct_bias=correct_bias, scale=1.0, backend=backend)
            continue
        step_t, grad = state_steps[i], grads[i]
        side = proj.projection_side(tuple(grad.shape), proj_type)
        low = lowrank_grad(grad, proj_seeds[i], float(step_t), rank=rank, side=side,
                           update_proj_gap=update_proj_gap).contiguous()
        step_t += 1
        direction = torch.empty_like(low)
        kernels.adamw8bit_update(param, low, m.codes, m.absmax, v.codes, v.absmax, nonfinite_skipped[i],
                                 step_size=1.0, beta1=beta1, beta2=beta2, inv_sqrt_bc2=1.0, eps=eps, decay=1.0,
                                 out=direction, block_size=m.block_size, backend=backend)
        update = apollo_direction_to_update(grad, low, direction, limiter_norms[i], side=side, scale_type=scale_type,
                                            scale=scale, scale_front=scale_front,
                                            norm_growth_limiter=norm_growth_limiter, limiter_gamma=limiter_gamma)
        apply_direction(param, update, None, None, float(step_t), lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, correct_bias=correct_bias, scale=1.0)


class _EightBitMoments:
    """Mixin: 8-bit moments for tensors with at least ``min_8bit_size`` moment elements."""

    def _setup_8bit(self, min_8bit_size: int, block_size: int, backend: str | None) -> dict:
        check_8bit_args(min_8bit_size, block_size, backend, kernels.BACKENDS)
        self.backend = backend
        return dict(min_8bit_size=min_8bit_size, block_size=block_size)

    def _init_moments(self, state: dict, shape: tuple[int, ...], device) -> None:
        group = self._initialising_group
        numel = 1
        for d in shape:
            numel *= d
        if numel >= group["min_8bit_size"]:
            init_8bit_moments(state, torch.empty(shape, device=device), group["block_size"])
        else:
            super()._init_moments(state, shape, device)

    def _init_group(self, group: dict, first_index: int) -> list[Tensor]:
        self._initialising_group = group
        return super()._init_group(group, first_index)

    def _group_step(self, group: dict, params: list[Tensor]) -> None:
        quant = [p for p in params if has_8bit_moments(self.state[p])]
        full = [p for p in params if not has_8bit_moments(self.state[p])]
        if full:
            super()._group_step(group, full)
        if quant:
            st = [self.state[p] for p in quant]
            moments = [load_8bit_moments(s, group["block_size"]) for s in st]
            apollo_adamw8bit(quant, [p.grad for p in quant], [m for m, _ in moments], [v for _, v in moments],
                             [s[SKIPPED] for s in st], [s["step"] for s in st], [s.get("proj_seed") for s in st],
                             [s.get("limiter_norm") for s in st], backend=self.backend, **self._hyper(group))

    def nonfinite_skipped(self) -> int:
        """Gradient elements skipped so far (inf/NaN), summed over all 8-bit tensors."""
        return int(sum(int(s[SKIPPED]) for s in self.state.values() if SKIPPED in s))


class APOLLOAdamW8bit(_EightBitMoments, APOLLOAdamW):
    """APOLLO (and, with ``rank=1, scale_type="tensor"`` groups, APOLLO-Mini) with 8-bit moments.

    Algorithm: :class:`~slimtrain.optim.apollo.APOLLOAdamW` (Zhu et al., MLSys 2025) with the
    low-rank Adam moments stored as block-wise 8-bit dynamic-map codes (Dettmers et al., ICLR
    2022), updated by slimtrain's fused 8-bit kernel (C++ on CPU, Triton on CUDA).

    Memory per (m, n) matrix, m >= n: ``2 r m (1 + 4/block_size)`` bytes of moments (about
    ``2 r m`` bytes against the fp32 step's ``8 r m``), a seed and a limiter norm; no projector
    is stored. Tensors with fewer moment elements than ``min_8bit_size`` keep fp32 moments;
    tensors outside ``rank`` groups take the 8-bit AdamW step (2.03 bytes per parameter).
    State is tensors only (``torch.load(weights_only=True)`` resumes exactly).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True, scale_front: bool = False,
                 disable_nl: bool = False, min_8bit_size: int = 4096, *, limiter_gamma: float = 1.01,
                 block_size: int = kernels.DEFAULT_BLOCK, backend: str | None = None):
        extra = self._setup_8bit(min_8bit_size, block_size, backend)
        self._extra_defaults = extra
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                         scale_front=scale_front, disable_nl=disable_nl, limiter_gamma=limiter_gamma)

    def add_param_group(self, param_group: dict) -> None:
        for key, value in self._extra_defaults.items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)


class APOLLOMini8bit(APOLLOAdamW8bit, APOLLOMini):
    """APOLLO-Mini (rank 1, tensor-wise scaling, ``scale=128``) with 8-bit moments; see
    :class:`APOLLOAdamW8bit` and :class:`~slimtrain.optim.apollo.APOLLOMini`. Rank-1 moments are
    ``max(m, n)`` elements, so matrices below ``min_8bit_size`` rows keep them in fp32."""


__all__ = ["APOLLOAdamW8bit", "APOLLOMini8bit", "apollo_adamw8bit"]
