"""slimtrain optimizers inside a ``transformers.Trainer``.

``Trainer(optimizers=(opt, sched))`` is not enough: with a DeepSpeed config the Trainer builds
its optimizer through ``create_optimizer`` and the tuple is silently replaced by AdamW. So the
optimizer is built *in* ``create_optimizer`` from the registry, on whatever model the Trainer
hands over (the wrapped one included), with the Trainer's learning rate::

    from slimtrain.integrations.hf import SlimtrainHFTrainer
    trainer = SlimtrainHFTrainer(model=model, args=args, train_dataset=ds,
                                 slimtrain_optim="galore_adamw", slimtrain_optim_args={"rank": 128})

Any registry name works the same way (``"apollo_adamw"``, ``"apollo_mini"``, ``"fira_adamw"``, ...);
or, keeping a plain ``transformers.Trainer``, pass
``optimizer_cls_and_kwargs=slimtrain_optimizer_cls_and_kwargs("galore_adamw", lr=1e-3, rank=128)``.

Zeroth-order optimizers (MeZO) need a closure without backward, which ``transformers.Trainer``
never provides; they are refused with a pointer to ``slimtrain train``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from ..optim.registry import available_optimizers, build_optimizer, optimizer_spec


def _build(name: str, model: torch.nn.Module, kwargs: dict) -> torch.optim.Optimizer:
    if name not in available_optimizers():
        raise ValueError(f"unknown slimtrain optimizer {name!r}; known: {available_optimizers()}")
    if optimizer_spec(name, **kwargs).zeroth_order:  # refused before anything is built
        raise ValueError(f"{name!r} is zeroth-order (step(closure) without backward); transformers.Trainer always "
                         "runs backward. Use `slimtrain train optim.name=...` instead")
    return build_optimizer(name, model, **kwargs)


class SlimtrainOptimizerFactory:
    """An optimizer factory for ``optimizer_cls_and_kwargs``: transformers instantiates it with no
    arguments and calls it as ``factory(model, **kwargs)`` (its protocol for model-aware optimizers)."""

    def __call__(self, model: torch.nn.Module, *, slimtrain_optim: str, **kwargs: Any) -> torch.optim.Optimizer:
        return _build(slimtrain_optim, model, kwargs)


def slimtrain_optimizer_cls_and_kwargs(name: str, **kwargs) -> tuple[type, dict]:
    """``(factory, kwargs)`` for ``transformers.Trainer(optimizer_cls_and_kwargs=...)``; give ``lr`` here
    (the Trainer does not add its learning rate to a user-supplied pair)."""
    return SlimtrainOptimizerFactory, {"slimtrain_optim": name, **kwargs}


class SlimtrainHFTrainer(Trainer):
    """A ``transformers.Trainer`` whose ``create_optimizer`` builds slimtrain optimizer ``slimtrain_optim``."""

    def __init__(self, *args, slimtrain_optim: str, slimtrain_optim_args: dict | None = None, **kwargs):
        self.slimtrain_optim = slimtrain_optim
        self.slimtrain_optim_args = dict(slimtrain_optim_args or {})
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            kwargs = {"lr": self.args.learning_rate, **self.slimtrain_optim_args}
            self.optimizer = _build(self.slimtrain_optim, self.model if model is None else model, kwargs)
        return self.optimizer
