"""AdamW with block-wise 8-bit moments.

Dettmers, Lewis, Shleifer & Zettlemoyer, "8-bit Optimizers via Block-wise Quantization",
ICLR 2022; Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from .validation import check_adam_args, check_8bit_args
from .shards import is_sharded, local
from .spec import OptimizerSpec
from .state_checks import check_params_supported, check_state_dict, mark
from .state_dtypes import restore_state_dtypes
from torch.optim.adamw import adamw as _torch_adamw

from .. import kernels
from ..kernels import Blockwise8bit
from . import bf16_weights
from .layerwise import LayerwiseUpdates

# State names of the 8-bit moments: m as signed, v as unsigned Blockwise8bit, stored as
# "exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax" (plain tensors:
# torch.load(weights_only=True) restores them), and the int32 count of skipped gradient elements.
EXP_AVG, EXP_AVG_SQ, SKIPPED = "exp_avg", "exp_avg_sq", "nonfinite_skipped"


def init_8bit_moments(state: dict, like: Tensor, block_size: int) -> None:
    """Zero 8-bit moments for a tensor shaped like ``like`` (codes of 0.0, absmax 0)."""
    Blockwise8bit.zeros(like, signed=True, block_size=block_size).store(state, EXP_AVG)
    Blockwise8bit.zeros(like, signed=False, block_size=block_size).store(state, EXP_AVG_SQ)
    state[SKIPPED] = torch.zeros(1, dtype=torch.int32, device=like.device)


def has_8bit_moments(state: dict) -> bool:
    return Blockwise8bit.stored(state, EXP_AVG)


def load_8bit_moments(state: dict, block_size: int) -> tuple[Blockwise8bit, Blockwise8bit]:
    """``(m, v)`` of a tensor with 8-bit moments, viewing its state tensors."""
    return (Blockwise8bit.load(state, EXP_AVG, signed=True, block_size=block_size),
            Blockwise8bit.load(state, EXP_AVG_SQ, signed=False, block_size=block_size))


def adam8bit_coefficients(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                          step: float) -> dict[str, float]:
    """torch.optim.AdamW's bias-corrected step as the fused kernel's runtime arguments."""
    return dict(
        step_size=lr / (1.0 - beta1**step),
        beta1=beta1,
        beta2=beta2,
        inv_sqrt_bc2=1.0 / math.sqrt(1.0 - beta2**step),
        eps=eps,
        decay=1.0 - lr * weight_decay,
    )


def adamw8bit(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Blockwise8bit],
    exp_avg_sqs: list[Blockwise8bit],
    nonfinite_skipped: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    backend: str | None = None,
) -> None:
    """Functional AdamW step on block-wise 8-bit moments (torch.optim.AdamW's update rule).

    ``exp_avgs[i]`` (signed map) and ``exp_avg_sqs[i]`` (unsigned map) are updated in place.
    For each tensor, one fused pass (:func:`slimtrain.kernels.adamw8bit_update`) reads
    param, grad, codes and absmax and writes param, codes and absmax; the fp32 moments exist
    only inside the kernel. Gradient elements that are not finite are skipped (param and
    moments unchanged) and counted in ``nonfinite_skipped[i]``.
    """
    for i, param in enumerate(params):
        step_t = state_steps[i]
        step_t += 1
        coeffs = adam8bit_coefficients(lr, beta1, beta2, eps, weight_decay, float(step_t))
        target = param if param.is_contiguous() else param.contiguous()
        m, v = exp_avgs[i], exp_avg_sqs[i]
        kernels.adamw8bit_update(
            target, grads[i].contiguous(), m.codes, m.absmax, v.codes, v.absmax, nonfinite_skipped[i],
            block_size=m.block_size, backend=backend, **coeffs,
        )
        if target is not param:
            param.copy_(target)


def _adamw32(params, grads, exp_avgs, exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps, weight_decay):
    # Tensors below min_8bit_size keep fp32 moments and take torch's own AdamW step (fp32
    # arithmetic also for half-precision parameters, which torch's kernel cannot mix).
    for i, p in enumerate(params):
        work = p if p.dtype == torch.float32 else p.float()
        _torch_adamw([work], [grads[i].to(torch.float32)], [exp_avgs[i]], [exp_avg_sqs[i]], [], [state_steps[i]],
                     foreach=False, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay,
                     eps=eps, maximize=False)
        if work is not p:
            p.copy_(work)


class AdamW8bit(LayerwiseUpdates, Optimizer):
    """AdamW whose two moments are stored as block-wise 8-bit dynamic-map codes.

    Algorithm: Dettmers et al., *8-bit Optimizers via Block-wise Quantization* (ICLR 2022):
    each block of ``block_size`` (256) moment values is stored as uint8 indices into a
    256-value dynamic map (signed for ``m``, unsigned for ``v``) plus one fp32 absmax. The
    update is torch.optim.AdamW's (decoupled weight decay, bias-corrected step)::

        m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
        p = p (1 - lr wd) - lr/(1-b1^t) * m / (sqrt(v / (1-b2^t)) + eps)

    Memory per parameter: 2 bytes of codes + 8/``block_size`` bytes of absmax (2.03 bytes at
    256) instead of AdamW's 8. Tensors with fewer than ``min_8bit_size`` elements (biases,
    norms) keep fp32 moments (8 bytes), as in bitsandbytes.

    Drop-in for ``bitsandbytes.optim.AdamW8bit`` (same defaults: ``lr=1e-3``,
    ``betas=(0.9, 0.999)``, ``eps=1e-8``, ``weight_decay=1e-2``, ``min_8bit_size=4096``), on
    CPU and CUDA. ``backend`` picks the kernel implementation (see
    :mod:`slimtrain.kernels.dispatch`): Triton on CUDA; on CPU by default the C++ step
    (``"cpp"``: AVX2, torch's threads, bit-identical to the PyTorch twin and faster than
    ``torch.optim.AdamW``), built on first use, or the eager twin if it does not build.

    Gradient elements that are inf/NaN are skipped rather than poisoning their block; the
    running count per tensor is ``optimizer.state[p]["nonfinite_skipped"]`` and the total is
    :meth:`nonfinite_skipped`.

    slimtrain additions (keyword-only, off by default): ``layerwise=True`` updates each tensor
    inside backward and frees its gradient there (:class:`~slimtrain.optim.layerwise.LayerwiseUpdates`,
    with ``accumulation_steps``); ``max_grad_norm`` clips each tensor's gradient to that norm
    (per tensor, the same in both modes: a global norm needs the whole gradient);
    ``stochastic_rounding=True`` computes the update of bf16 parameters in fp32 and writes it back
    with stochastic rounding (:mod:`~slimtrain.optim.bf16_weights`), so bf16 weights need no
    fp32 master copy.
    """

    @classmethod
    def spec_for(cls, layerwise: bool = False) -> OptimizerSpec:
        # whole-tensor state; the layer-wise mode is LayerwiseUpdates'
        # element-wise, so it steps on FSDP2's local shards: 8-bit blocks on the shard, state as
        # plain tensors of the shard (saved per rank, see local_shard_state)
        return OptimizerSpec(layerwise_capable=True, layerwise=bool(layerwise), dtensor_params=not layerwise,
                             local_shard_state=not layerwise)

    @property
    def spec(self) -> OptimizerSpec:
        return self.spec_for(self.layerwise)

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        optim_bits: int = 8,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
        *,
        block_size: int = kernels.DEFAULT_BLOCK,
        backend: str | None = None,
        layerwise: bool = False,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        stochastic_rounding: bool = False,
    ):
        check_adam_args(lr, betas, eps, weight_decay)
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm={max_grad_norm!r} must be a positive number or None (no clipping)")
        # bitsandbytes-signature arguments whose other values select features this class does
        # not implement: refuse them instead of silently ignoring them.
        unsupported = {"amsgrad": (amsgrad, False), "optim_bits": (optim_bits, 8), "args": (args, None),
                       "percentile_clipping": (percentile_clipping, 100), "block_wise": (block_wise, True),
                       "is_paged": (is_paged, False)}
        for name, (value, default) in unsupported.items():
            if value != default:
                raise ValueError(f"{name}={value!r} is not supported by slimtrain's AdamW8bit (only {default!r})")
        check_8bit_args(min_8bit_size, block_size, backend, kernels.BACKENDS)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, min_8bit_size=min_8bit_size,
                        block_size=block_size, max_grad_norm=max_grad_norm, stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)
        check_params_supported(self)
        self.backend = backend
        self._setup_layerwise(layerwise, accumulation_steps)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if getattr(self, "layerwise", False):
            self._register_layerwise_hooks(self.param_groups[-1]["params"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.layerwise:
            return  # gradients are consumed by the hooks; clearing here would drop an accumulation
        super().zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return mark(super().state_dict(), self)

    def load_state_dict(self, state_dict: dict) -> None:
        check_state_dict(self, state_dict)  # shapes, dtypes, format: before anything is replaced
        super().load_state_dict(state_dict)
        # absmax and the 32-bit moments are fp32 on purpose, also for bf16 parameters.
        restore_state_dtypes(self, state_dict)

    def _init_group(self, group, quant, full):
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamW8bit does not support sparse gradients")
            self._init_state(p, group)
            (quant if has_8bit_moments(self.state[p]) else full).append(p)

    def _init_state(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            held = local(p)  # an FSDP2 shard: moments for the rows this rank holds
            if p.numel() >= group["min_8bit_size"]:  # decided on the whole tensor: the same at any world size
                init_8bit_moments(state, held, group["block_size"])
            else:
                state["exp_avg"] = torch.zeros_like(held, dtype=torch.float32, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(held, dtype=torch.float32,
                                                       memory_format=torch.preserve_format)

    @staticmethod
    def _clip(grad: Tensor, max_norm: float | None) -> Tensor:
        if max_norm is None:
            return grad
        norm = torch.linalg.vector_norm(grad.float())
        return grad * (max_norm / (norm + 1e-6)).clamp(max=1.0).to(grad.dtype)

    def _update_one(self, p: Tensor, group: dict) -> None:
        """One tensor's step (what ``step`` does for it): the layer-wise hooks' update."""
        if p.grad.is_sparse:
            raise RuntimeError("AdamW8bit does not support sparse gradients")
        self._init_state(p, group)
        state = self.state[p]
        grad = self._clip(p.grad, group.get("max_grad_norm"))
        beta1, beta2 = group["betas"]
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        rounded = bf16_weights.wants_rounding(p, group.get("stochastic_rounding", False))
        if has_8bit_moments(state):
            m, v = load_8bit_moments(state, group["block_size"])
            codes = [m.codes, m.absmax, v.codes, v.absmax, state[SKIPPED]]
            if rounded:
                state["step"] += 1
                seed = bf16_weights.rounding_seed(0, self._param_index(p), int(state["step"]))
                bf16_weights.adamw8bit_bf16_(p, grad, *codes, seed=seed, block_size=group["block_size"],
                                             backend=self.backend,
                                             **adam8bit_coefficients(**hyper, step=float(state["step"])))
            else:
                adamw8bit([p], [grad], [m], [v], [state[SKIPPED]], [state["step"]], backend=self.backend, **hyper)
        elif rounded:
            work = p.float()
            _adamw32([work], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], [state["step"]], **hyper)
            bf16_weights.write_rounded_(p, work, bf16_weights.rounding_seed(0, self._param_index(p),
                                                                            int(state["step"])))
        else:
            _adamw32([p], [grad], [state["exp_avg"]], [state["exp_avg_sq"]], [state["step"]], **hyper)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.layerwise:
            self._flush_layerwise()
            return loss
        for group in self.param_groups:
            if group.get("max_grad_norm") is not None or group.get("stochastic_rounding", False):
                if any(is_sharded(p) for p in group["params"]):
                    raise ValueError("AdamW8bit's per-tensor max_grad_norm / stochastic_rounding need whole tensors; "
                                     "under FSDP2 clip with train.max_grad_norm (the global norm) instead")
                for p in group["params"]:  # the per-tensor path the layer-wise hooks take
                    if p.grad is not None:
                        self._update_one(p, group)
                continue
            quant: list[Tensor] = []
            full: list[Tensor] = []
            self._init_group(group, quant, full)
            beta1, beta2 = group["betas"]
            hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
            if quant:
                st = [self.state[p] for p in quant]
                moments = [load_8bit_moments(s, group["block_size"]) for s in st]
                adamw8bit([local(p) for p in quant], [local(p.grad) for p in quant], [m for m, _ in moments],
                          [v for _, v in moments], [s[SKIPPED] for s in st], [s["step"] for s in st],
                          backend=self.backend, **hyper)
            if full:
                st = [self.state[p] for p in full]
                _adamw32([local(p) for p in full], [local(p.grad) for p in full], [s["exp_avg"] for s in st],
                         [s["exp_avg_sq"] for s in st], [s["step"] for s in st], **hyper)
        return loss

    def nonfinite_skipped(self) -> int:
        """Gradient elements skipped so far (inf/NaN), summed over all 8-bit tensors."""
        return int(sum(int(s[SKIPPED]) for s in self.state.values() if SKIPPED in s))
