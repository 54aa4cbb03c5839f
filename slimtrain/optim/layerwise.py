"""Layer-wise updates for element-wise optimizers: each tensor is updated inside backward, in
its post-accumulate-grad hook, and its gradient is freed there, so the whole model's gradient
never exists at once (at most the tensors whose hooks have not fired yet).

The GaLore family has its own variant (:class:`slimtrain.optim.galore_base.GaLoreOptimizerBase`,
which also keeps a low-rank accumulation buffer); this mixin is the plain one, used by
:class:`slimtrain.optim.AdamW8bit`. A subclass supplies ``_update_one(p, group)``, the same
per-tensor update its ordinary ``step`` applies, so the two modes give identical trajectories.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LayerwiseUpdates:
    """Mixin for a ``torch.optim.Optimizer``: ``layerwise=True`` moves the update into backward.

    With ``accumulation_steps = k`` a tensor's gradient accumulates in ``p.grad`` over k
    backward passes and is applied and freed after the k-th (between micro-batches the
    gradients of the tensors already seen do exist: only ``k = 1`` never holds them all).
    ``step()`` then applies what the hooks did not (tensors unused in some micro-batch).
    """

    def _setup_layerwise(self, layerwise: bool, accumulation_steps: int) -> None:
        if not isinstance(accumulation_steps, int) or isinstance(accumulation_steps, bool) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps={accumulation_steps!r} must be an integer >= 1")
        self.layerwise = bool(layerwise)
        self.accumulation_steps = accumulation_steps
        # Data parallelism: a callable that averages a tensor over ranks in place (the engine sets
        # it); the hook calls it on each gradient right before its update.
        self.grad_reducer = None
        self.nonfinite_refused = 0  # pieces whose (reduced) gradient was not finite: not applied
        self._hooks: list = []
        self._micro: dict[int, int] = {}
        if self.layerwise:
            for group in self.param_groups:
                self._register_layerwise_hooks(group["params"])

    def _register_layerwise_hooks(self, params) -> None:
        for p in params:
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._layerwise_hook))

    def _group_of(self, p: Tensor) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("parameter is not managed by this optimizer")

    def _param_index(self, p: Tensor) -> int:
        index = getattr(self, "_index_cache", None)
        if index is None or len(index) != sum(len(g["params"]) for g in self.param_groups):
            index = {id(q): i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}
            self._index_cache = index
        return index[id(p)]

    @torch.no_grad()
    def _layerwise_hook(self, p: Tensor) -> None:
        count = self._micro.get(id(p), 0) + 1
        self._micro[id(p)] = count
        if count == self.accumulation_steps:
            self._layerwise_update(p)

    def _layerwise_update(self, p: Tensor) -> None:
        self._micro[id(p)] = 0
        if p.grad is not None:
            if self.grad_reducer is not None:
                self.grad_reducer(p.grad)
            if bool(torch.isfinite(p.grad).all()):
                self._update_one(p, self._group_of(p))
            else:  # every rank sees the same reduced gradient, so every rank refuses it alike
                self.nonfinite_refused += 1
        p.grad = None

    def _flush_layerwise(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if self._micro.get(id(p), 0) > 0:
                    self._layerwise_update(p)

    def remove_hooks(self) -> None:
        """Detach the layer-wise hooks (e.g. before handing the model to another optimizer)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
