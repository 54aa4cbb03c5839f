"""GaLore AdamW with block-wise 8-bit low-rank moments.

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", ICML 2024
(the 8-bit variant of its Sec. 4); moments as in Dettmers et al., "8-bit Optimizers via
Block-wise Quantization", ICLR 2022.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .validation import check_adam_args, check_8bit_args
from .. import kernels
from . import projector as proj
from . import bf16_weights
from .adamw8bit import SKIPPED, has_8bit_moments, init_8bit_moments, load_8bit_moments
from .galore_adamw import galore_adamw
from .galore_base import GaLoreOptimizerBase
from .shards import is_sharded, local


def galore_adamw8bit(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[kernels.Blockwise8bit],
    exp_avg_sqs: list[kernels.Blockwise8bit],
    nonfinite_skipped: list[Tensor],
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
    backend: str | None = None,
) -> None:
    """Functional GaLore-AdamW step with 8-bit moments, on gradients already in optimizer space.

    The update rule is :func:`slimtrain.optim.galore_adamw`'s (bias correction folded into the
    step size, ``eps`` added to ``sqrt(v)``, decoupled decay after the update)::

        m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
        p -= lr sqrt(1-b2^t)/(1-b1^t) * scale * P^T( m / (sqrt(v) + eps) );  p -= lr wd p

    written for the fused kernel as ``lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps/sqrt(1-b2^t))``.
    For projected tensors the kernel writes the low-rank direction (r x n, small), which is
    projected back; for the others it updates the parameter in place. The moments
    (``exp_avgs[i]`` signed, ``exp_avg_sqs[i]`` unsigned) are updated in place. Gradient
    elements that are not finite are skipped and counted.
    """
    for i, param in enumerate(params):
        step_t = state_steps[i]
        step_t += 1
        step = float(step_t)
        bc1 = 1.0 - beta1**step if correct_bias else 1.0
        sqrt_bc2 = math.sqrt(1.0 - beta2**step) if correct_bias else 1.0
        coeffs = dict(step_size=lr / bc1, beta1=beta1, beta2=beta2, inv_sqrt_bc2=1.0 / sqrt_bc2, eps=eps / sqrt_bc2)
        grad = grads[i].contiguous()
        left, right = proj_lefts[i], proj_rights[i]
        m, v = exp_avgs[i], exp_avg_sqs[i]
        moments = (m.codes, m.absmax, v.codes, v.absmax, nonfinite_skipped[i])
        if left is None and right is None:
            target = param if param.is_contiguous() else param.contiguous()
            kernels.adamw8bit_update(target, grad, *moments, decay=1.0, block_size=m.block_size, backend=backend,
                                     **coeffs)
            if target is not param:
                param.copy_(target)
        else:
            direction = torch.empty_like(grad, dtype=torch.float32)
            kernels.adamw8bit_update(param, grad, *moments, decay=1.0, out=direction, block_size=m.block_size,
                                     backend=backend, **coeffs)
            param.sub_(proj.project_back(direction, left, right, scale).view_as(param).to(param.dtype))
        if weight_decay > 0.0:
            param.add_(param, alpha=-lr * weight_decay)


def _codes(state: dict, block_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The 8-bit moments' (codes, absmax) tensors, m then v, as the fused kernel takes them."""
    m, v = load_8bit_moments(state, block_size)
    return m.codes, m.absmax, v.codes, v.absmax


class GaLoreAdamW8bit(GaLoreOptimizerBase):
    """GaLore AdamW whose (low-rank) moments are block-wise 8-bit codes.

    Algorithm: GaLore (Zhao et al., ICML 2024) with 8-bit Adam moments (Dettmers et al., ICLR
    2022): gradients of matrices in a ``rank`` group are projected to rank r (projector
    refreshed every ``update_proj_gap`` steps from the gradient's SVD), Adam runs there with
    m and v stored as uint8 dynamic-map codes plus an fp32 absmax per ``block_size`` values,
    and the update is projected back and scaled by ``scale``. Projection, refresh, clipping and
    layer-wise mode are :class:`~slimtrain.optim.galore_base.GaLoreOptimizerBase`'s.

    Memory per (m, n) GaLore matrix, m >= n: ``2 m r (1 + 4/block_size)`` bytes of moments plus
    an fp32 projector of ``4 r n`` bytes, against GaLoreAdamW's ``8 m r + 4 r n``. Tensors
    with fewer moment elements than ``min_8bit_size`` keep fp32 moments (GaLoreAdamW's step).
    Non-GaLore tensors take the 8-bit AdamW step (2.03 bytes per parameter when large).

    ``stochastic_rounding=True`` (slimtrain): bf16 parameters are updated in fp32 and written back
    with stochastic rounding (:mod:`~slimtrain.optim.bf16_weights`), so they need no fp32 master.

    Drop-in for ``galore_torch.GaLoreAdamW8bit`` (same defaults and group keys) and, unlike
    it, runs on CPU (the C++ step of :mod:`slimtrain.kernels.cpu_fused` by default, bit-identical
    to the kernels' PyTorch twins, which it falls back to) as well as CUDA (Triton).
    """

    ROW_SHARDS = True  # 8-bit blocks on each FSDP2 shard's projected rows (see block_size below)

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        correct_bias: bool = True,
        min_8bit_size: int = 4096,
        *,
        block_size: int = kernels.DEFAULT_BLOCK,
        backend: str | None = None,
        layerwise: bool = False,
        accumulation_steps: int = 1,
        stochastic_rounding: bool = False,
    ):
        check_adam_args(lr, betas, eps, weight_decay)
        check_8bit_args(min_8bit_size, block_size, backend, kernels.BACKENDS)
        self.backend = backend
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        min_8bit_size=min_8bit_size, block_size=block_size, stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults, layerwise=layerwise, accumulation_steps=accumulation_steps)

    def _projectors(self, state: dict, group: dict) -> tuple[Tensor | None, Tensor | None]:
        """The fp32 projector(s) of a tensor (``None, None`` outside rank groups)."""
        if "rank" not in group:
            return None, None
        return state.get("proj_left"), state.get("proj_right")

    def _update(self, p: Tensor, low_grad: Tensor, state: dict, group: dict) -> None:
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
        if not has_8bit_moments(state) and "exp_avg" not in state:
            numel = low_grad.numel()
            if is_sharded(p):  # decide by the whole tensor's size, so every world size decides alike
                numel = numel // max(local(p).shape[0], 1) * p.shape[0]
            if numel >= group["min_8bit_size"]:
                init_8bit_moments(state, low_grad, group["block_size"])
            else:
                state["exp_avg"] = torch.zeros_like(low_grad, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(low_grad, dtype=torch.float32)
        left, right = self._projectors(state, group)
        beta1, beta2 = group["betas"]
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                     correct_bias=group["correct_bias"], scale=group["scale"] if "rank" in group else 1.0)
        if not bf16_weights.wants_rounding(p, group.get("stochastic_rounding", False)):
            self._step_tensor(local(p), low_grad, state, group, left, right, hyper)
            return
        if is_sharded(p):
            # the rounding noise is drawn per tensor, not per global element: shards would not
            # follow one process. FSDP2 keeps fp32 sharded masters (train.bf16 computes in bf16).
            raise ValueError("stochastic_rounding=True with bf16 FSDP2 shards: keep fp32 sharded parameters "
                             "(FSDP2's MixedPrecisionPolicy computes in bf16) and stochastic_rounding=False")
        seed = bf16_weights.rounding_seed(group.get("proj_seed", 0), self._param_index(p), int(state["step"]) + 1)
        if has_8bit_moments(state) and left is None and right is None:
            # element-wise tensors (embeddings, head): fp32 one chunk at a time
            state["step"] += 1
            step = float(state["step"])
            bc1 = 1.0 - beta1**step if hyper["correct_bias"] else 1.0
            sqrt_bc2 = math.sqrt(1.0 - beta2**step) if hyper["correct_bias"] else 1.0
            bf16_weights.adamw8bit_bf16_(
                p, low_grad, *_codes(state, group["block_size"]), state[SKIPPED], seed=seed,
                block_size=group["block_size"], backend=self.backend, step_size=group["lr"] / bc1, beta1=beta1,
                beta2=beta2, inv_sqrt_bc2=1.0 / sqrt_bc2, eps=group["eps"] / sqrt_bc2, decay=1.0,
                post_decay=1.0 - group["lr"] * group["weight_decay"])
            return
        work = p.float()  # one matrix in fp32 (its back-projected update is that size anyway)
        self._step_tensor(work, low_grad, state, group, left, right, hyper)
        bf16_weights.write_rounded_(p, work, seed)

    def _step_tensor(self, p, low_grad, state, group, left, right, hyper) -> None:
        if has_8bit_moments(state):
            m, v = load_8bit_moments(state, group["block_size"])
            galore_adamw8bit([p], [low_grad.float()], [m], [v], [state[SKIPPED]], [state["step"]], [left], [right],
                             backend=self.backend, **hyper)
        else:
            galore_adamw([p], [low_grad.float()], [state["exp_avg"]], [state["exp_avg_sq"]], [state["step"]],
                         [left], [right], **hyper)

    def nonfinite_skipped(self) -> int:
        """Gradient elements skipped so far (inf/NaN), summed over all 8-bit tensors."""
        return int(sum(int(s[SKIPPED]) for s in self.state.values() if SKIPPED in s))
