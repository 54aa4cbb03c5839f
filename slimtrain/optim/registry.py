"""Optimizers by name: an explicit dict from name to factory, for the trainer and the CLI.

A factory takes ``(model, **kwargs)`` and returns an optimizer; model-aware factories (GaLore
builds its groups from module names) need the model, plain ones use ``model.parameters()``.
Reference baselines that live in optional packages register only when those import.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .adamw8bit import AdamW8bit
from .galore_adafactor import GaLoreAdafactor
from .galore_adamw import GaLoreAdamW
from .galore_adamw8bit import GaLoreAdamW8bit
from .lisa import LISA
from .mezo import MeZO, SparseMeZO, zo_param_groups
from .param_groups import galore_param_groups
from .qgalore import QGaLoreAdamW8bit, QuantLinear, qgalore_param_groups, quantize_weights

OptimizerFactory = Callable[..., torch.optim.Optimizer]

_GALORE_KEYS = ("target_modules", "rank", "update_proj_gap", "scale", "proj_type", "proj_method",
                "oversample", "power_iters", "proj_seed", "max_grad_norm")


def _split_galore(kwargs: dict) -> tuple[dict, dict]:
    galore = {k: kwargs.pop(k) for k in _GALORE_KEYS if k in kwargs}
    return galore, kwargs


def _galore_factory(cls) -> OptimizerFactory:
    def build(model: nn.Module, **kwargs):
        galore, rest = _split_galore(dict(kwargs))
        return cls(galore_param_groups(model, **galore), **rest)

    build.__doc__ = f"{cls.__name__} over galore_param_groups(model, ...)"
    return build


def _plain(cls) -> OptimizerFactory:
    def build(model: nn.Module, **kwargs):
        return cls([p for p in model.parameters() if p.requires_grad], **kwargs)

    build.__doc__ = f"{cls.__module__}.{cls.__name__} over all trainable parameters"
    return build


def _zeroth_order(cls) -> OptimizerFactory:
    def build(model: nn.Module, weight_decay: float = 0.0, **kwargs):
        # the model goes in too: dropout is switched off during the two evaluations
        return cls(zo_param_groups(model, weight_decay), model=model, **kwargs)

    build.__doc__ = f"{cls.__name__} over all trainable parameters, evaluating with dropout off"
    return build


def _lisa(model: nn.Module, inner: str = "adamw", n_active: int = 2, interval: int = 20, always_active=None,
          layers=None, seed: int = 0, **inner_kwargs) -> LISA:
    """LISA over the registry optimizer ``inner``, built (before any freezing) with ``inner_kwargs``."""
    if inner in ("lisa", "mezo", "sparse_mezo"):
        raise ValueError(f"inner={inner!r} cannot be wrapped by LISA; use a gradient optimizer such as 'adamw'")
    optimizer = build_optimizer(inner, model, **inner_kwargs)
    return LISA(model, n_active=n_active, interval=interval, always_active=always_active, layers=layers, seed=seed,
                optimizer=optimizer)


def _qgalore(model: nn.Module, weight_bits: int = 8, weight_group_size: int = 256, exclude=("lm_head",),
             **kwargs) -> QGaLoreAdamW8bit:
    """QGaLoreAdamW8bit: first swaps ``model``'s nn.Linear layers (but ``exclude``) for INT8
    QuantLinear layers *in place* (quantize_weights), then projects those INT8 weights."""
    galore, rest = _split_galore(dict(kwargs))
    if galore.pop("target_modules", "all-linear") != "all-linear":
        raise ValueError("qgalore_adamw8bit projects every quantized linear layer; choose them with `exclude`")
    if not any(isinstance(m, QuantLinear) for m in model.modules()):  # else built INT8 already (model.int8_weights)
        quantize_weights(model, bits=weight_bits, group_size=weight_group_size, exclude=exclude)
    return QGaLoreAdamW8bit(qgalore_param_groups(model, **galore), **rest)


OPTIMIZERS: dict[str, OptimizerFactory] = {
    "adamw": _plain(torch.optim.AdamW),
    "galore_adamw": _galore_factory(GaLoreAdamW),
    "galore_adafactor": _galore_factory(GaLoreAdafactor),
    "adamw8bit": _plain(AdamW8bit),
    "galore_adamw8bit": _galore_factory(GaLoreAdamW8bit),
    "qgalore_adamw8bit": _qgalore,
    "mezo": _zeroth_order(MeZO),
    "sparse_mezo": _zeroth_order(SparseMeZO),
    "lisa": _lisa,
}


# Optimizers whose update can run inside backward, one tensor at a time (``layerwise=True``):
# until the capability specs land (issue 11), the one place that says so.
LAYERWISE = frozenset({"galore_adamw", "galore_adafactor", "adamw8bit", "galore_adamw8bit", "qgalore_adamw8bit"})


def supports_layerwise(name: str) -> bool:
    """Whether optimizer ``name`` has the layer-wise (update-in-backward) path."""
    return name in LAYERWISE


def _register_optional_baselines() -> None:
    try:
        import bitsandbytes as bnb  # noqa: F401

        OPTIMIZERS["bnb_adamw8bit"] = _plain(bnb.optim.AdamW8bit)
    except Exception:  # not installed, or no usable backend on this machine
        pass
    try:
        import galore_torch

        OPTIMIZERS["galore_torch_adamw"] = _galore_factory(galore_torch.GaLoreAdamW)
    except Exception:
        pass


def register(name: str, factory: OptimizerFactory) -> None:
    """Add an optimizer under ``name`` (refuses to silently replace an existing one)."""
    if name in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is already registered")
    OPTIMIZERS[name] = factory


def build_optimizer(name: str, model: nn.Module, **kwargs) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for ``model``; unknown names list the known ones."""
    if name not in OPTIMIZERS:
        _register_optional_baselines()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](model, **kwargs)


def available_optimizers() -> list[str]:
    _register_optional_baselines()
    return sorted(OPTIMIZERS)
