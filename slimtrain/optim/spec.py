"""What an optimizer can do, declared once by the optimizer itself.

Trainer, federated clients, the transformers bridge and the data-parallel engines need to know a
few things about an optimizer before they drive it: does it run backward at all, does it update
inside backward, does it need each weight as a matrix, may its state be sharded, does it rewrite
the model. torch's optimizers declare such things (``_step_supports_amp_scaling``, the
``foreach``/``fused`` flags) instead of letting callers probe them; slimtrain's do the same with
an :class:`OptimizerSpec`:

* every slimtrain optimizer class has a ``spec`` (a class attribute, or a property where the
  answer depends on how the instance was built: ``layerwise=True``, LISA's inner optimizer);
* every registry entry carries the spec its optimizer will have
  (:func:`slimtrain.optim.registry.optimizer_spec`), so a caller can decide before building;
* :func:`spec_of` reads an instance's spec; a plain ``torch.optim`` optimizer (or a reference
  package's) declares nothing and is :data:`PLAIN`.

Callers read these fields and never ``isinstance`` an optimizer class or look into
``optimizer.state``: what an engine needs from an optimizer's state goes through the narrow
methods of :class:`LowRankStep`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from torch import Tensor

Sharding = Literal["whole_tensor", "none"]


@dataclass(frozen=True)
class OptimizerSpec:
    """Capabilities of one optimizer (instance or registry entry)."""

    zeroth_order: bool = False
    """``step(closure)`` with a closure that only evaluates the loss; backward never runs."""
    layerwise_capable: bool = False
    """Offers the update-in-backward mode (``layerwise=True``: each tensor is updated in its
    post-accumulate-grad hook and its gradient freed at once)."""
    layerwise: bool = False
    """This instance updates inside backward (implies ``layerwise_capable``); it then has
    ``accumulation_steps``, accepts a ``grad_reducer`` for data parallelism, and counts the
    non-finite pieces its hooks refused in ``nonfinite_refused``."""
    whole_matrices: bool = False
    """Needs each weight with its matrix shape (GaLore projects gradients): flat 1-D ZeRO
    partitions cannot be used."""
    sharding: Sharding = "whole_tensor"
    """How its state may be sharded over data-parallel ranks: by whole tensors (each tensor's
    state on one owner rank) or not at all."""
    rewrites_model: bool = False
    """Building it changes the model in place (Q-GaLore swaps nn.Linear for INT8 layers): it can
    be built once per model, never once per client on a shared model."""
    lowrank_grads: bool = False
    """Gradients of its projected matrices can travel projected (``r x n``): it implements
    :class:`LowRankStep` through ``lowrank_step()``."""
    split_step: bool = False
    """Its low-rank step splits into ``lowrank_direction`` + ``apply_lowrank_direction`` (so an
    owner rank can broadcast the direction instead of the weight)."""
    external_grads: bool = False
    """Some gradients live outside ``.grad`` (Q-GaLore's INT8 weights): ``external_grads()`` lists
    them, and a data-parallel engine must average them before ``step()``."""
    dtensor_params: bool = False
    """Steps correctly on FSDP2's ``DTensor`` shards (element-wise math that torch's DTensor
    dispatch carries, with state created from the shards), so ``dist.engine=fsdp`` can run it."""
    local_shard_state: bool = False
    """Under FSDP2 its per-parameter state holds plain tensors of the local shard (8-bit blocks on
    the shard), not DTensors: checkpoints keep one state file per rank and resume at the same
    world size."""
    changes_trainable: bool = False
    """Switches which tensors train from period to period (LISA toggles ``requires_grad``): an
    engine that registers its gradient hooks once (DDP) cannot follow."""
    replicated_state: tuple[str, ...] = ()
    """State keys (prefixes) every rank keeps for a projected tensor it does not own: projector
    and refresh bookkeeping, so all ranks agree on refresh steps without talking."""

    def with_(self, **changes) -> "OptimizerSpec":
        return dataclasses.replace(self, **changes)


PLAIN = OptimizerSpec()
"""A torch.optim-style optimizer over whole tensors: backprop, shardable, nothing special."""


def lowrank_step_of(optimizer) -> "LowRankStep | None":
    """The :class:`LowRankStep` behind ``optimizer`` (itself, or the optimizer a wrapper such as LISA
    drives) when its spec has ``lowrank_grads``, else None."""
    return optimizer.lowrank_step() if spec_of(optimizer).lowrank_grads else None


def spec_of(optimizer) -> OptimizerSpec:
    """The spec ``optimizer`` declares (``PLAIN`` for optimizers that declare none, like
    ``torch.optim.AdamW`` or bitsandbytes')."""
    spec = getattr(type(optimizer), "spec", None)
    if spec is None:
        return PLAIN
    spec = optimizer.spec  # a property may refine the class's answer for this instance
    if not isinstance(spec, OptimizerSpec):
        raise TypeError(f"{type(optimizer).__name__}.spec must be an OptimizerSpec, got {type(spec).__name__}")
    return spec


def per_parameter_state(state_dict: dict) -> dict:
    """The per-parameter ``state`` mapping (parameter index -> tensors) inside an optimizer's
    ``state_dict()``: torch's layout, or nested one level by a wrapper (LISA keeps its inner
    optimizer's under ``"optimizer"``). Engines merging or splitting shards go through this."""
    if "state" in state_dict and "param_groups" in state_dict:
        return state_dict["state"]
    return per_parameter_state(state_dict["optimizer"])


@runtime_checkable
class LowRankStep(Protocol):
    """What data-parallel code may ask of an optimizer whose spec has ``lowrank_grads``.

    Projection is linear, so each rank may project its own gradient with the shared projector,
    reduce the small result and hand it back. Nothing outside ``slimtrain.optim`` reads or writes
    the optimizer's state: these methods are the whole interface.
    """

    def lowrank_params(self) -> list[tuple[Tensor, dict]]:
        """``(param, group)`` of every projected tensor."""

    def is_projected(self, p: Tensor, group: dict) -> bool:
        """Whether ``p`` (in ``group``) is a projected matrix."""

    def needs_refresh(self, p: Tensor) -> bool:
        """Whether ``p``'s next step recomputes its projector (needs the full gradient)."""

    def refresh_projector(self, p: Tensor, full_grad: Tensor, group: dict) -> None:
        """Recompute ``p``'s projector from its (synchronised) full gradient."""

    def projector_tensors(self, p: Tensor, group: dict) -> list[Tensor]:
        """The tensors that make up ``p``'s projector, allocated if missing, in a fixed order:
        broadcasting them from one rank makes the receivers' projector equal to the sender's."""

    def count_refresh(self, p: Tensor) -> None:
        """Record a refresh computed elsewhere (so per-tensor bookkeeping agrees across ranks)."""

    def project_grad(self, p: Tensor, grad: Tensor) -> Tensor:
        """``grad`` projected with ``p``'s current projector."""

    def set_projected_grad(self, p: Tensor, low_grad: Tensor) -> None:
        """Use ``low_grad`` for ``p``'s next ``step()`` instead of ``p.grad``."""

    def pending_projected_grad(self, p: Tensor) -> Tensor | None:
        """The projected gradient ``step()`` will apply to ``p`` (set by :meth:`set_projected_grad`)."""

    def drop_projected_grad(self, p: Tensor) -> None:
        """Forget a projected gradient handed in for a step that will not be applied."""

    def skip_update(self, p: Tensor) -> None:
        """Advance ``p``'s step count without updating it: another rank owns its update."""

    def projectors(self) -> dict[Tensor, tuple[Tensor | None, Tensor | None]]:
        """``{param: (left, right)}`` of the current projectors (for reuse, e.g. compressed uploads)."""


__all__ = ["LowRankStep", "OptimizerSpec", "PLAIN", "lowrank_step_of", "per_parameter_state", "spec_of"]
