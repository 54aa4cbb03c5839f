"""Optimizers by name: an explicit dict from name to factory, for the trainer and the CLI.

A factory takes ``(model, **kwargs)`` and returns an optimizer; model-aware factories (GaLore
builds its groups from module names) need the model, plain ones use ``model.parameters()``.
Reference baselines that live in optional packages register only when those import.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .galore_adafactor import GaLoreAdafactor
from .galore_adamw import GaLoreAdamW
from .param_groups import galore_param_groups

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


OPTIMIZERS: dict[str, OptimizerFactory] = {
    "adamw": _plain(torch.optim.AdamW),
    "galore_adamw": _galore_factory(GaLoreAdamW),
    "galore_adafactor": _galore_factory(GaLoreAdafactor),
}


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
