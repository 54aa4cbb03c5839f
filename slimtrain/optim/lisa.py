"""LISA: Layerwise Importance Sampled AdamW, as an optimizer wrapping any inner optimizer.

Pan et al., "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language Model
Fine-Tuning", NeurIPS 2024, Algorithm 1.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .spec import OptimizerSpec, spec_of
from .state_checks import FORMAT_KEY, check_state_dict


def find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of repeated blocks: the ``nn.ModuleList`` of same-class modules holding
    the most parameters (``model.layers`` in Llama, ``encoder.layer`` in BERT)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > 0 and (best is None or size > best[0]):
            best = (size, name, module)
    if best is None:
        raise ValueError(
            f"could not find a list of repeated layers in {type(model).__name__}; pass layers='<dotted path>' "
            "naming its nn.ModuleList (e.g. 'model.layers')"
        )
    return best[1], best[2]


def _resolve_layers(model: nn.Module, layers: str | Sequence[nn.Module] | None) -> tuple[str, list[nn.Module]]:
    if layers is None:
        name, found = find_layer_list(model)
        return name, list(found)
    if isinstance(layers, str):
        try:
            found = model.get_submodule(layers)
        except AttributeError as err:
            candidates = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
            raise ValueError(f"layers={layers!r} is not a submodule of the model; module lists: {candidates}") from err
        if not isinstance(found, (nn.ModuleList, nn.Sequential)):
            raise ValueError(f"layers={layers!r} is a {type(found).__name__}, expected an nn.ModuleList of layers")
        return layers, list(found)
    return "<given>", list(layers)


class LISA(Optimizer):
    """Layerwise importance sampling: train the always-active modules plus ``n_active``
    randomly chosen middle layers, re-drawn every ``interval`` steps.

    Algorithm: Pan et al., *LISA* (NeurIPS 2024), Alg. 1 -- every ``interval`` steps, freeze
    every layer, unfreeze the embedding, head and final norm (``always_active``) and
    ``n_active`` layers sampled uniformly without replacement, then run the inner optimizer.

    Mechanics: frozen layers get ``requires_grad=False`` before the next forward, so autograd
    computes no weight gradient for them (and does not keep the activations that only a weight
    gradient needs; activations needed to carry the gradient back to the embedding are still
    kept). On deactivation a layer's ``.grad`` is freed and its **inner optimizer state is
    dropped**; a re-activated layer starts from fresh state (zero moments, step 0 -- the
    paper's restart; Adam's bias correction makes the first steps of a period full-size). A
    layer drawn again at a switch stays active and keeps its state.

    Memory: the inner optimizer's per-parameter cost (AdamW: 8 bytes, GaLore / 8-bit less)
    times the *active* parameters only -- always-active modules plus ``n_active`` layers --
    plus gradients for those same parameters. The sampler is a private ``torch.Generator``
    seeded with ``seed``: every rank draws the same layers without communication, and its
    state, the active set and the inner optimizer's state go into ``state_dict`` as tensors, so
    a resume between switch points continues with the same layers and moments.

    ``optimizer_cls`` is any ``torch.optim``-style class (``torch.optim.AdamW``,
    :class:`~slimtrain.optim.GaLoreAdamW`, an 8-bit AdamW, ...), built over ``param_groups``
    (default: every trainable parameter of ``model``, frozen or not, so param groups and LR
    schedulers stay fixed; the inner optimizer skips parameters without a gradient) with
    ``optimizer_kwargs``; or pass a built ``optimizer`` instead. ``param_groups`` and
    ``state`` are the inner optimizer's, so an LR scheduler or ``transformers.Trainer`` can
    drive LISA like any optimizer. With DDP, wrap with ``find_unused_parameters=True``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer_cls: type[Optimizer] | Callable[..., Optimizer] = torch.optim.AdamW,
        n_active: int = 2,
        interval: int = 20,
        always_active: Sequence[str] | None = None,
        layers: str | Sequence[nn.Module] | None = None,
        seed: int = 0,
        *,
        param_groups: list[dict] | None = None,
        optimizer: Optimizer | None = None,
        inner_spec: OptimizerSpec | None = None,
        **optimizer_kwargs: Any,
    ):
        self.model = model
        # what the inner optimizer can do, when its builder knows more than the instance declares
        # (the registry's "adamw" is torch's AdamW, which declares nothing but steps on DTensors)
        self._inner_spec = inner_spec
        self.layers_path, self.layers = _resolve_layers(model, layers)
        if not isinstance(n_active, int) or not 1 <= n_active <= len(self.layers):
            raise ValueError(
                f"n_active={n_active!r} must be an integer in [1, {len(self.layers)}] "
                f"({self.layers_path} has {len(self.layers)} layers)"
            )
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval={interval!r} must be an integer >= 1 (steps between layer switches)")
        self.n_active = n_active
        self.interval = interval

        layer_params = {id(p) for layer in self.layers for p in layer.parameters()}
        if always_active is None:
            # everything outside the layer stack: embeddings, final norm, head (and pooler,
            # classifier, ... for encoder models)
            fixed = [p for p in model.parameters() if id(p) not in layer_params and p.requires_grad]
        else:
            fixed = []
            for name in always_active:
                try:
                    fixed.extend(p for p in model.get_submodule(name).parameters() if p.requires_grad)
                except AttributeError as err:
                    raise ValueError(f"always_active entry {name!r} is not a submodule of the model") from err
            fixed_ids = {id(p) for p in fixed}
            # parameters outside the layers that the user did not list stay frozen for good
            for p in model.parameters():
                if id(p) not in layer_params and id(p) not in fixed_ids:
                    p.requires_grad_(False)
        self._layer_params = [[p for p in layer.parameters() if p.requires_grad] for layer in self.layers]
        if not any(self._layer_params):
            raise ValueError(f"no trainable parameters in the layers at {self.layers_path}")

        if optimizer is not None:
            if optimizer_kwargs or param_groups is not None:
                raise ValueError("pass either a built optimizer= or optimizer_cls with its kwargs, not both")
            self.optimizer = optimizer
        else:
            groups = param_groups if param_groups is not None else [p for p in model.parameters() if p.requires_grad]
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        inner_ids = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        missing = [i for i, ps in enumerate(self._layer_params) if any(id(p) not in inner_ids for p in ps)]
        if missing:
            raise ValueError(
                f"layers {missing} of {self.layers_path} have parameters the inner optimizer does not hold; "
                "build it before freezing anything (LISA freezes layers itself)"
            )

        # torch.optim.Optimizer bookkeeping (hooks, step patching) without a second copy of the
        # groups: param_groups / state / defaults *are* the inner optimizer's.
        super().__init__([{"params": [p for g in self.optimizer.param_groups for p in g["params"]]}], {})
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

        self._generator = torch.Generator().manual_seed(int(seed))
        self._step = torch.tensor(0, dtype=torch.int64)
        self.active = torch.zeros(0, dtype=torch.int64)
        self._set_active(self._sample())

    # ------------------------------------------------------------------ sampling
    def _sample(self) -> Tensor:
        # uniform without replacement (Alg. 1), from the private generator only
        return torch.randperm(len(self.layers), generator=self._generator)[: self.n_active].sort().values

    @torch.no_grad()
    def _set_active(self, active: Tensor) -> None:
        keep = set(active.tolist())
        for i, params in enumerate(self._layer_params):
            on = i in keep
            for p in params:
                if not on:
                    p.grad = None
                    # drop the inner state: memory follows the active set, and a layer that comes
                    # back restarts from zero moments
                    self.optimizer.state.pop(p, None)
                p.requires_grad_(on)
        self.active = active.clone()

    @property
    def active_layers(self) -> list[int]:
        """Indices (into the layer list) of the layers trained in the current period."""
        return self.active.tolist()

    # ------------------------------------------------------------------ capabilities
    @staticmethod
    def spec_over(inner: OptimizerSpec) -> OptimizerSpec:
        """LISA's spec over an inner optimizer with spec ``inner``: the inner optimizer's needs, but
        never layer-wise (LISA steps after backward), and the trained tensors change each period."""
        return inner.with_(layerwise_capable=False, layerwise=False, changes_trainable=True,
                           # under FSDP2 the inner state is created per shard; LISA's own is a
                           # seed, a counter and the active set, the same on every rank
                           local_shard_state=inner.local_shard_state or inner.dtensor_params)

    @property
    def spec(self) -> OptimizerSpec:
        return self.spec_over(self._inner_spec if self._inner_spec is not None else spec_of(self.optimizer))

    def lowrank_step(self):
        """The inner optimizer's :class:`~slimtrain.optim.spec.LowRankStep` (its spec says whether it has one)."""
        return self.optimizer.lowrank_step()

    def external_grads(self) -> list[Tensor]:
        return self.optimizer.external_grads()

    # ------------------------------------------------------------------ optimizer API
    def step(self, closure=None):  # type: ignore[override]
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self._step += 1
        if int(self._step) % self.interval == 0:
            self._set_active(self._sample())
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {
            FORMAT_KEY: type(self).__name__,
            "optimizer": self.optimizer.state_dict(),
            "lisa": {
                "active": self.active.clone(),
                "generator": self._generator.get_state(),
                "step": self._step.clone(),
            },
        }

    def load_state_dict(self, state_dict: dict) -> None:
        check_state_dict(self, state_dict, nested="optimizer")
        if "lisa" not in state_dict or "optimizer" not in state_dict:
            raise ValueError(f"not a LISA state_dict (keys {sorted(state_dict)}); expected 'optimizer' and 'lisa'")
        lisa = state_dict["lisa"]
        if lisa["active"].numel() != self.n_active or int(lisa["active"].max()) >= len(self.layers):
            raise ValueError(
                f"checkpoint's active layers {lisa['active'].tolist()} do not fit n_active={self.n_active} "
                f"over {len(self.layers)} layers; resume with the same LISA settings"
            )
        self._set_active(lisa["active"])
        self._generator.set_state(lisa["generator"])
        self._step = lisa["step"].clone()
        self.optimizer.load_state_dict(state_dict["optimizer"])
        # torch's load_state_dict rebinds the inner state dict; keep ours the same object
        self.state = self.optimizer.state
        self.param_groups = self.optimizer.param_groups

    def __repr__(self) -> str:
        return (f"LISA(n_active={self.n_active}, interval={self.interval}, layers={self.layers_path}"
                f"[{len(self.layers)}], active={self.active_layers}, inner={type(self.optimizer).__name__})")


__all__ = ["LISA", "find_layer_list"]
