"""Optimizers by name: an explicit dict from name to entry, for the trainer and the CLI.

An entry is a factory plus the capabilities of what it builds (:mod:`slimtrain.optim.spec`). A
factory takes ``(model, **kwargs)`` and returns an optimizer; model-aware factories (GaLore
builds its groups from module names) need the model, plain ones use ``model.parameters()``.
The spec is known before building (:func:`optimizer_spec`), so a trainer or a federated server
can choose its engine, or refuse a combination, without building a throwaway optimizer.
Reference baselines that live in optional packages register only when those import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import nn

from .adamw8bit import AdamW8bit
from .apollo import APOLLOAdamW, APOLLOMini
from .apollo_adamw8bit import APOLLOAdamW8bit
from .fira import FiraAdamW
from .galore_adafactor import GaLoreAdafactor
from .galore_adamw import GaLoreAdamW
from .galore_adamw8bit import GaLoreAdamW8bit
from .lisa import LISA
from .mezo import MeZO, SparseMeZO, zo_param_groups
from .param_groups import ALL_LINEAR, galore_param_groups, matching_module_names
from .qgalore import QGaLoreAdamW8bit, QuantLinear, qgalore_param_groups, quantize_weights
from .spec import PLAIN, OptimizerSpec

OptimizerFactory = Callable[..., torch.optim.Optimizer]
# A spec, or a function of the factory's keyword arguments (``layerwise=True``, LISA's ``inner``).
SpecRule = Union[OptimizerSpec, Callable[[dict], OptimizerSpec]]


@dataclass(frozen=True)
class Entry:
    """A registered optimizer: how to build it and what it can do."""

    build: OptimizerFactory
    spec: SpecRule = PLAIN

    def spec_for(self, kwargs: dict) -> OptimizerSpec:
        return self.spec(kwargs) if callable(self.spec) else self.spec

_GALORE_KEYS = ("target_modules", "rank", "update_proj_gap", "scale", "proj_type", "proj_method",
                "oversample", "power_iters", "proj_seed", "max_grad_norm", "natural_history",
                "natural_damping")
_APOLLO_KEYS = ("target_modules", "rank", "update_proj_gap", "scale", "proj_type", "scale_type", "proj_seed")


def _split_galore(kwargs: dict) -> tuple[dict, dict]:
    galore = {k: kwargs.pop(k) for k in _GALORE_KEYS if k in kwargs}
    return galore, kwargs


def _galore_factory(cls) -> OptimizerFactory:
    def build(model: nn.Module, **kwargs):
        galore, rest = _split_galore(dict(kwargs))
        return cls(galore_param_groups(model, **galore), **rest)

    build.__doc__ = f"{cls.__name__} over galore_param_groups(model, ...)"
    return build


def _apollo_factory(cls, **group_defaults) -> OptimizerFactory:
    def build(model: nn.Module, **kwargs):
        kwargs = {**group_defaults, **kwargs}
        groups = {k: kwargs.pop(k) for k in _APOLLO_KEYS if k in kwargs}
        return cls(galore_param_groups(model, proj="random", **groups), **kwargs)

    build.__doc__ = f"{cls.__name__} over galore_param_groups(model, ...) with APOLLO's group keys"
    return build


def _natural_galore_adamw(model: nn.Module, natural_history: int = 10, **kwargs) -> GaLoreAdamW:
    """Natural GaLore (Das 2024): GaLoreAdamW with a history of ``natural_history`` low-rank gradients."""
    if isinstance(natural_history, bool) or not isinstance(natural_history, int) or natural_history < 1:
        raise ValueError(f"natural_history={natural_history!r}: natural_galore_adamw needs a history of at least 1 "
                         "projected gradient (allowed: an integer >= 1, e.g. 10); for plain GaLore use galore_adamw")
    return _galore_factory(GaLoreAdamW)(model, natural_history=natural_history, **kwargs)


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


def _layerwise_spec(cls) -> SpecRule:
    """The spec of ``cls`` built with ``kwargs``: layer-wise when it offers the mode and is asked to."""
    return lambda kwargs: cls.spec_for(layerwise=kwargs.get("layerwise", False))


def _galore_spec(cls, natural: bool = False) -> SpecRule:
    """A GaLore class's spec for ``kwargs``: layer-wise if asked, Natural GaLore if a history is given."""
    return lambda kwargs: cls.spec_for(layerwise=kwargs.get("layerwise", False),
                                       natural=natural or bool(kwargs.get("natural_history", 0)))


def _lisa_spec(kwargs: dict) -> OptimizerSpec:
    inner = kwargs.get("inner", "adamw")
    inner_kwargs = {k: v for k, v in kwargs.items() if k not in ("inner", "n_active", "interval", "always_active",
                                                                  "layers", "seed")}
    if inner in OPTIMIZERS and optimizer_spec(inner, **inner_kwargs).zeroth_order:
        return OptimizerSpec(zeroth_order=True)  # refused when built; the spec only has to be honest
    return LISA.spec_over(optimizer_spec(inner, **inner_kwargs) if inner in OPTIMIZERS else PLAIN)


def _lisa(model: nn.Module, inner: str = "adamw", n_active: int = 2, interval: int = 20, always_active=None,
          layers=None, seed: int = 0, **inner_kwargs) -> LISA:
    """LISA over the registry optimizer ``inner``, built (before any freezing) with ``inner_kwargs``."""
    if inner in ("lisa", "mezo", "sparse_mezo"):
        raise ValueError(f"inner={inner!r} cannot be wrapped by LISA; use a gradient optimizer such as 'adamw'")
    optimizer = build_optimizer(inner, model, **inner_kwargs)
    return LISA(model, n_active=n_active, interval=interval, always_active=always_active, layers=layers, seed=seed,
                optimizer=optimizer, inner_spec=optimizer_spec(inner, **inner_kwargs))


def _qgalore(model: nn.Module, weight_bits: int = 8, weight_group_size: int = 256, exclude=("lm_head",),
             **kwargs) -> QGaLoreAdamW8bit:
    """QGaLoreAdamW8bit: first swaps ``model``'s nn.Linear layers (those ``target_modules`` names,
    as for GaLore; but ``exclude``) for INT8 QuantLinear layers *in place* (quantize_weights),
    then projects those INT8 weights."""
    galore, rest = _split_galore(dict(kwargs))
    target = galore.pop("target_modules", ALL_LINEAR)
    if target != ALL_LINEAR:  # quantize (and project) only the chosen matrices; the rest stay fp32
        chosen = set(matching_module_names(model, target))
        exclude = tuple(exclude) + tuple(n for n, m in model.named_modules()
                                         if type(m) is nn.Linear and n not in chosen)
    if not any(isinstance(m, QuantLinear) for m in model.modules()):  # else built INT8 already (model.int8_weights)
        quantize_weights(model, bits=weight_bits, group_size=weight_group_size, exclude=exclude)
    return QGaLoreAdamW8bit(qgalore_param_groups(model, **galore), **rest)


OPTIMIZERS: dict[str, Entry] = {
    # torch's AdamW declares nothing; its foreach step is carried by DTensor dispatch (FSDP2)
    "adamw": Entry(_plain(torch.optim.AdamW), PLAIN.with_(dtensor_params=True)),
    "galore_adamw": Entry(_galore_factory(GaLoreAdamW), _galore_spec(GaLoreAdamW)),
    "natural_galore_adamw": Entry(_natural_galore_adamw, _galore_spec(GaLoreAdamW, natural=True)),
    "galore_adafactor": Entry(_galore_factory(GaLoreAdafactor), _galore_spec(GaLoreAdafactor)),
    "adamw8bit": Entry(_plain(AdamW8bit), _layerwise_spec(AdamW8bit)),
    "galore_adamw8bit": Entry(_galore_factory(GaLoreAdamW8bit), _galore_spec(GaLoreAdamW8bit)),
    "apollo_adamw": Entry(_apollo_factory(APOLLOAdamW, rank=256, scale=1.0, scale_type="channel"), APOLLOAdamW.spec),
    "apollo_mini": Entry(_apollo_factory(APOLLOMini, rank=1, scale=128.0, scale_type="tensor"), APOLLOMini.spec),
    "apollo_adamw8bit": Entry(_apollo_factory(APOLLOAdamW8bit, rank=256, scale=1.0, scale_type="channel"),
                              APOLLOAdamW8bit.spec),
    "fira_adamw": Entry(_galore_factory(FiraAdamW), FiraAdamW.spec_for()),
    "qgalore_adamw8bit": Entry(_qgalore, _layerwise_spec(QGaLoreAdamW8bit)),
    "mezo": Entry(_zeroth_order(MeZO), MeZO.spec),
    "sparse_mezo": Entry(_zeroth_order(SparseMeZO), SparseMeZO.spec),
    "lisa": Entry(_lisa, _lisa_spec),
}


def _register_optional_baselines() -> None:
    try:
        import bitsandbytes as bnb  # noqa: F401

        OPTIMIZERS.setdefault("bnb_adamw8bit", Entry(_plain(bnb.optim.AdamW8bit)))
    except Exception:  # not installed, or no usable backend on this machine
        pass
    try:
        import galore_torch

        # galore-torch declares nothing, but it projects matrices: no flat ZeRO partitions
        OPTIMIZERS.setdefault("galore_torch_adamw", Entry(_galore_factory(galore_torch.GaLoreAdamW),
                                                          OptimizerSpec(whole_matrices=True)))
    except Exception:
        pass


def register(name: str, factory: OptimizerFactory, spec: SpecRule = PLAIN) -> None:
    """Add an optimizer under ``name`` with what it can do (refuses to silently replace one)."""
    if name in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is already registered")
    OPTIMIZERS[name] = Entry(factory, spec)


def _entry(name: str) -> Entry:
    if name not in OPTIMIZERS:
        _register_optional_baselines()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def build_optimizer(name: str, model: nn.Module, **kwargs) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for ``model``; unknown names list the known ones."""
    return _entry(name).build(model, **kwargs)


def optimizer_spec(name: str, **kwargs) -> OptimizerSpec:
    """What optimizer ``name`` built with ``kwargs`` can do, without building it."""
    return _entry(name).spec_for(kwargs)


def available_optimizers() -> list[str]:
    _register_optional_baselines()
    return sorted(OPTIMIZERS)
