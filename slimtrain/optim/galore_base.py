"""What every GaLore-family optimizer shares: param-group validation, projector refresh,
projection, optional per-tensor clipping and the layer-wise (update-in-backward) mode.

A subclass supplies only ``_init_state`` (its moments, shaped like the gradient it sees) and
``_update`` (one tensor's step, delegating to its functional step). Everything here keeps
``optimizer.state`` as plain tensors, so ``state_dict()`` survives
``torch.load(weights_only=True)`` and resumes exactly.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import projector as proj
from . import row_shards
from .natural import NATURAL_DEFAULT_DAMPING, check_natural_args, natural_gradient
from .shards import is_sharded, local
from .spec import OptimizerSpec
from .state_checks import check_params_supported, check_state_dict, mark
from .state_dtypes import restore_state_dtypes

# Keys a GaLore group may carry, with the values galore-torch's projector assumes when a
# group gives ``rank`` only. ``proj_method`` and friends are slimtrain additions.
GALORE_GROUP_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200,
    "scale": 1.0,
    "proj_type": "std",
    "proj_method": "svd",
    "oversample": 8,
    "power_iters": 2,
    "proj_seed": 0,
}

ZERO_HINT = (
    "DeepSpeed ZeRO stage >= 1 hands the optimizer flat 1-D partitions instead of matrices; "
    "run with zero_stage=0, or use slimtrain's shape-preserving sharding (slimtrain.parallel), "
    "and keep biases / norms in a group without `rank`"
)


class GaLoreOptimizerBase(Optimizer):
    """Base class; see :class:`slimtrain.optim.GaLoreAdamW` for the user-facing contract.

    Subclasses define ``_update(p, low_grad, state, group)``: one tensor's step on the
    optimizer-space gradient, creating its moments on first use and advancing
    ``state["step"]`` (a float tensor, as in torch.optim).

    Declared capabilities (:mod:`slimtrain.optim.spec`): needs whole matrices, offers the
    layer-wise mode, shards by whole tensors, and implements
    :class:`~slimtrain.optim.spec.LowRankStep` so data-parallel engines can sync projected
    gradients without touching the state.
    """

    # What every rank keeps for a projected tensor whose update another rank owns: the
    # projector and the step count that decides when it is refreshed.
    REPLICATED_STATE: tuple[str, ...] = ("proj_", "step")
    SPLIT_STEP = False  # subclasses whose step splits into direction + apply say so
    # Subclasses whose ``_update`` steps on a plain local tensor (element-wise moments on the
    # projected rows) run on FSDP2's row-sharded DTensors (see slimtrain.optim.row_shards)
    ROW_SHARDS = False

    @classmethod
    def spec_for(cls, layerwise: bool = False, natural: bool = False) -> OptimizerSpec:
        """The spec of an instance built with ``layerwise`` (and Natural GaLore's history when
        ``natural``); the registry declares it before building."""
        # Natural GaLore's Fisher solve needs the whole low-rank gradient: no row shards
        row_shards = cls.ROW_SHARDS and not natural
        return OptimizerSpec(layerwise_capable=True, layerwise=bool(layerwise), whole_matrices=True,
                             lowrank_grads=True, split_step=cls.SPLIT_STEP, replicated_state=cls.REPLICATED_STATE,
                             dtensor_params=row_shards, local_shard_state=row_shards)

    @property
    def spec(self) -> OptimizerSpec:
        if any(g.get("natural_history", 0) for g in self.param_groups):
            return self.spec_for(self.layerwise, natural=True)
        return self.spec_for(self.layerwise)  # subclasses without Natural GaLore take layerwise only

    def lowrank_step(self) -> "GaLoreOptimizerBase":
        """The object implementing :class:`~slimtrain.optim.spec.LowRankStep`: this optimizer."""
        return self

    def __init__(self, params, defaults: dict, *, layerwise: bool = False, accumulation_steps: int = 1):
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps={accumulation_steps!r} must be an integer >= 1")
        # natural_history > 0 turns a rank group into Natural GaLore (slimtrain.optim.natural)
        defaults = {"max_grad_norm": None, "natural_history": 0, "natural_damping": NATURAL_DEFAULT_DAMPING,
                    **defaults}
        super().__init__(params, defaults)
        check_params_supported(self)
        self.layerwise = layerwise
        self.accumulation_steps = accumulation_steps
        self._hooks: list = []
        self._micro: dict[int, int] = {}  # id(param) -> micro-batches seen since its last update
        # Data parallelism in layer-wise mode: a callable that averages a tensor over ranks in
        # place (slimtrain's trainer sets it). The hooks call it on each tensor's gradient right
        # before its update, after the last micro-batch: projected (r x n) for GaLore matrices
        # except on refresh steps, when the full gradient is averaged so every rank computes
        # the same projector.
        self.grad_reducer: Callable[[Tensor], None] | None = None
        # Layer-wise mode: tensors whose (reduced) gradient was NaN/Inf and so were not updated;
        # a trainer compares it before and after a step to know the step was not whole.
        self.nonfinite_refused = 0
        if layerwise:
            self._register_layerwise_hooks()

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict) -> None:
        if "rank" in param_group:
            for key, value in GALORE_GROUP_DEFAULTS.items():
                param_group.setdefault(key, value)
            self._validate_galore_group(param_group)
        super().add_param_group(param_group)
        check_natural_args(self.param_groups[-1]["natural_history"], self.param_groups[-1]["natural_damping"])
        if "rank" in param_group:
            index = len(self.param_groups) - 1
            for i, p in enumerate(self.param_groups[-1]["params"]):
                if p.dim() < 2:
                    raise ValueError(
                        f"GaLore projects matrices, but parameter {i} of param group {index} has shape "
                        f"{tuple(p.shape)} (1-D). {ZERO_HINT}."
                    )
        if getattr(self, "layerwise", False):
            self._register_layerwise_hooks(self.param_groups[-1]["params"])

    @staticmethod
    def _validate_galore_group(group: dict) -> None:
        rank = group["rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank={rank!r} must be a positive integer (e.g. rank=128)")
        gap = group["update_proj_gap"]
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
            raise ValueError(f"update_proj_gap={gap!r} must be a positive integer (steps between SVDs, e.g. 200)")
        if group["proj_type"] not in proj.PROJ_TYPES:
            raise ValueError(f"proj_type={group['proj_type']!r} is not one of {proj.PROJ_TYPES}")
        if group["proj_method"] not in proj.PROJ_METHODS:
            raise ValueError(f"proj_method={group['proj_method']!r} is not one of {proj.PROJ_METHODS}")
        if not isinstance(group["scale"], (int, float)) or not 0.0 < group["scale"] < float("inf"):
            raise ValueError(f"scale={group['scale']!r} must be a positive number (GaLore's alpha, e.g. 0.25)")

    # ------------------------------------------------------------------ state dtype policy
    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but state keeps the dtype it was saved with.

        torch casts every floating state tensor to its parameter's dtype on load; our moments and
        projectors are fp32 on purpose for bf16/fp16 parameters (and quantized states have their
        own dtypes), so a resume must not round them down.
        """
        check_state_dict(self, state_dict)  # shapes, dtypes, format: before anything is replaced
        super().load_state_dict(state_dict)
        restore_state_dtypes(self, state_dict)

    def state_dict(self) -> dict:
        return mark(super().state_dict(), self)

    # ------------------------------------------------------------------ per-tensor pieces
    def _param_index(self, p: Tensor) -> int:
        index = getattr(self, "_index_cache", None)
        if index is None or len(index) != sum(len(g["params"]) for g in self.param_groups):
            index = {id(q): i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}
            self._index_cache = index
        return index[id(p)]

    def _check_shape(self, p: Tensor, group: dict) -> None:
        if p.dim() < 2:
            raise ValueError(
                f"GaLore got a 1-D tensor of shape {tuple(p.shape)} in a group with rank={group['rank']}. "
                f"{ZERO_HINT}."
            )

    def _needs_refresh(self, state: dict, group: dict) -> bool:
        return "step" not in state or int(state["step"]) % group["update_proj_gap"] == 0

    def refresh_projector(self, p: Tensor, full_grad: Tensor, group: dict) -> None:
        """Recompute the projector of ``p`` from its full gradient (keeps the old one on failure)."""
        state = self.state[p]
        shape = _matrix_shape(p)
        side = self._projection_side(p, group)
        rank = proj.effective_rank(group["rank"], shape, side)
        if rank < group["rank"] and "proj_rank_clamped" not in state:
            proj.warn_rank_clamped(group["rank"], rank, shape)
            state["proj_rank_clamped"] = torch.tensor(rank)
        step = int(state["step"]) if "step" in state else 0
        seed = proj.projector_seed(group["proj_seed"], self._param_index(p), step)
        if is_sharded(p):  # FSDP2 row shards: a collective, every rank gets the same projector
            right = row_shards.right_projector_of_rows(full_grad, rank, method=group["proj_method"],
                                                       oversample=group["oversample"],
                                                       power_iters=group["power_iters"], seed=seed)
            result = None if right is None else (None, right)
        else:
            generator = None
            if group["proj_method"] == "randomized":
                generator = torch.Generator(device=full_grad.device)
                generator.manual_seed(seed)
            result = proj.compute_projector(
                full_grad,
                rank,
                side,
                method=group["proj_method"],
                oversample=group["oversample"],
                power_iters=group["power_iters"],
                generator=generator,
            )
        if result is None:
            if "proj_left" in state or "proj_right" in state:
                warnings.warn(
                    f"GaLore projector refresh failed for a {shape} matrix at step {step} "
                    "(SVD error or non-finite values); keeping the previous projector",
                    stacklevel=3,
                )
                return
            warnings.warn(
                f"GaLore projector could not be computed for a {shape} matrix at step {step}; "
                "starting from a coordinate projector",
                stacklevel=3,
            )
            result = proj.fallback_projector(shape, rank, side, local(full_grad).device)
        left, right = result
        for key, value in (("proj_left", left), ("proj_right", right)):
            if value is not None:
                state[key] = value
        self.count_refresh(p)

    def _projection_side(self, p: Tensor, group: dict) -> str:
        if not is_sharded(p):
            return proj.projection_side(_matrix_shape(p), group["proj_type"])
        # a row shard: only a right projector (r x n, applied from the right) keeps every step
        # row-local; "std" means "the usual side", and on row shards that is the right one
        if group["proj_type"] not in ("std", "right"):
            raise ValueError(
                f"proj_type={group['proj_type']!r} on an FSDP2 row-sharded weight of shape {tuple(p.shape)}: a left "
                "projector mixes the rows other ranks hold. Use proj_type='right' (or 'std', which takes the right "
                "projector on row shards)")
        return "right"

    def to_optimizer_space(self, p: Tensor, grad: Tensor, group: dict) -> Tensor:
        """The gradient the moments see: projected for rank groups (refreshing if due). For an
        FSDP2 shard, the local rows' part (the refresh is collective)."""
        if "rank" not in group:
            return local(grad)
        self._check_shape(p, group)
        state = self.state[p]
        if self._needs_refresh(state, group) or ("proj_left" not in state and "proj_right" not in state):
            self.refresh_projector(p, grad, group)
        return proj.project(local(grad), state.get("proj_left"), state.get("proj_right"))

    @staticmethod
    def _clip(grad: Tensor, max_norm: float | None, like: Tensor | None = None) -> Tensor:
        # Per-tensor clipping of the gradient the optimizer state sees. A global norm would need
        # every gradient before any update, which layer-wise mode cannot have; per-tensor clipping
        # is identical in both modes, so the two trajectories stay equal. On an FSDP2 shard the
        # norm is the whole tensor's (one scalar all-reduce), so N ranks clip as one process.
        if max_norm is None:
            return grad
        if like is not None and is_sharded(like):
            norm = row_shards.global_norm(grad, like)
        else:
            norm = torch.linalg.vector_norm(grad.float())
        return grad * (max_norm / (norm + 1e-6)).clamp(max=1.0).to(grad.dtype)

    def _precondition(self, p: Tensor, low: Tensor, group: dict) -> Tensor:
        """Clip, then (Natural GaLore, rank groups with ``natural_history > 0``) apply the inverse
        empirical Fisher of the last ``natural_history`` low-rank gradients: what the moments see."""
        low = self._clip(low, group["max_grad_norm"], p)
        history = group.get("natural_history", 0)  # .get: checkpoints from before the option
        if "rank" not in group or not history:
            return low
        if is_sharded(p):
            raise ValueError("natural_history > 0 (Natural GaLore) on an FSDP2 row-sharded weight: its Fisher "
                             "solve needs the whole low-rank gradient on one rank; use dist.engine=torch or ddp")
        state = self.state[p]
        if "nat_history" not in state:
            dtype = torch.float32 if low.dtype in (torch.float16, torch.bfloat16) else low.dtype
            state["nat_history"] = torch.zeros(history, low.numel(), dtype=dtype, device=low.device)
            state["nat_count"] = torch.zeros((), dtype=torch.int64)
        return natural_gradient(low, state["nat_history"], state["nat_count"],
                                group.get("natural_damping", NATURAL_DEFAULT_DAMPING))

    def _apply(self, p: Tensor, grad: Tensor, group: dict) -> None:
        """Project (if GaLore), clip, precondition (if Natural GaLore), and update one tensor."""
        low = self.to_optimizer_space(p, grad, group)
        self._update(p, self._precondition(p, low, group), self.state[p], group)

    # ------------------------------------------------------------------ step
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
            for p in group["params"]:
                state = self.state[p]
                if "grad_acc" in state:  # projected gradient handed in by set_projected_grad
                    self._update(p, self._precondition(p, state.pop("grad_acc"), group), state, group)
                    continue
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                self._apply(p, p.grad, group)
        return loss

    # ------------------------------------------------------------------ external gradient sync
    # Projection is linear, so data-parallel code may project each rank's gradient locally,
    # all-reduce the small (r, n) result, and hand it back here (slimtrain.parallel does).
    def galore_params(self):
        """``(param, group)`` for every tensor in a group with ``rank``."""
        return [(p, g) for g in self.param_groups if "rank" in g for p in g["params"]]

    lowrank_params = galore_params

    @staticmethod
    def is_projected(p: Tensor, group: dict) -> bool:
        return "rank" in group and p.dim() >= 2

    def projector_tensors(self, p: Tensor, group: dict) -> list[Tensor]:
        """``p``'s projector tensors (left and/or right, allocated if missing), in a fixed order."""
        state = self.state[p]
        shape = tuple(proj.as_matrix(p).shape)
        side = proj.projection_side(shape, group["proj_type"])
        rank = proj.effective_rank(group["rank"], shape, side)
        m, n = shape
        out = []
        if side in ("left", "full"):
            out.append(state.setdefault("proj_left", torch.empty(m, rank, device=p.device)))
        if side in ("right", "full"):
            out.append(state.setdefault("proj_right", torch.empty(rank, n, device=p.device)))
        return out

    def count_refresh(self, p: Tensor) -> None:
        state = self.state[p]
        state["proj_refreshes"] = state.get("proj_refreshes", torch.tensor(0)) + 1

    def pending_projected_grad(self, p: Tensor) -> Tensor | None:
        return self.state.get(p, {}).get("grad_acc")

    def drop_projected_grad(self, p: Tensor) -> None:
        self.state.get(p, {}).pop("grad_acc", None)

    def skip_update(self, p: Tensor) -> None:
        state = self.state[p]
        state["step"] = state.get("step", torch.tensor(0.0)) + 1

    def projectors(self) -> dict[Tensor, tuple[Tensor | None, Tensor | None]]:
        return {p: (st.get("proj_left"), st.get("proj_right")) for p, st in self.state.items()
                if "proj_left" in st or "proj_right" in st}

    def needs_refresh(self, p: Tensor) -> bool:
        """Whether the next step of ``p`` recomputes its projector (needs the full gradient)."""
        state = self.state[p]
        has_projector = "proj_left" in state or "proj_right" in state
        return not has_projector or self._needs_refresh(state, self._group_of(p))

    def project_grad(self, p: Tensor, grad: Tensor) -> Tensor:
        """Project ``grad`` with ``p``'s current projector (no refresh)."""
        state = self.state[p]
        return proj.project(grad, state.get("proj_left"), state.get("proj_right"))

    def set_projected_grad(self, p: Tensor, low_grad: Tensor) -> None:
        """Use ``low_grad`` (already projected, e.g. all-reduced across ranks) for ``p``'s next
        ``step()`` instead of ``p.grad``."""
        state = self.state[p]
        if "proj_left" not in state and "proj_right" not in state:
            raise RuntimeError(
                "this tensor has no projector yet: call refresh_projector(p, full_grad, group) with the "
                "full (synchronised) gradient first (needs_refresh(p) says when)"
            )
        self.state[p]["grad_acc"] = low_grad

    # ------------------------------------------------------------------ layer-wise mode
    def _group_of(self, p: Tensor) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("parameter is not managed by this optimizer")

    def _register_layerwise_hooks(self, params=None) -> None:
        params = params if params is not None else [p for g in self.param_groups for p in g["params"]]
        for p in params:
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._layerwise_hook))

    def _grad(self, p: Tensor) -> Tensor | None:
        """Where backward left ``p``'s gradient (``p.grad``; INT8 weights override this)."""
        return p.grad

    def _set_grad(self, p: Tensor, value: Tensor | None) -> None:
        p.grad = value

    @torch.no_grad()
    def _layerwise_hook(self, p: Tensor) -> None:
        """Runs right after ``p.grad`` was accumulated by backward.

        Between micro-batches a GaLore matrix keeps only its *projected* gradient (the
        accumulation buffer is low-rank); its full gradient is freed at once. On a projector
        refresh step the full gradient must survive until the last micro-batch (the SVD needs the
        whole batch's gradient), so it accumulates in ``p.grad`` as usual: one step in
        ``update_proj_gap``. Non-GaLore tensors accumulate in ``p.grad``.
        """
        group = self._group_of(p)
        count = self._micro.get(id(p), 0) + 1
        self._micro[id(p)] = count
        state = self.state[p]
        lowrank_accumulate = (
            "rank" in group
            and self.accumulation_steps > 1
            and not self._needs_refresh(state, group)
            and ("proj_left" in state or "proj_right" in state)
        )
        if lowrank_accumulate:
            self._check_shape(p, group)
            low = proj.project(local(self._grad(p)), state.get("proj_left"), state.get("proj_right"))
            if "grad_acc" in state:
                state["grad_acc"].add_(low)
            else:
                state["grad_acc"] = low
            self._set_grad(p, None)
        if count == self.accumulation_steps:
            self._layerwise_update(p, group)

    def _layerwise_update(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        self._micro[id(p)] = 0
        acc = state.pop("grad_acc", None)
        if self.grad_reducer is not None:
            has_projector = "proj_left" in state or "proj_right" in state
            if "rank" in group and has_projector and not self._needs_refresh(state, group) and self._grad(p) is not None:
                # project before communicating: r x n travels instead of m x n
                low = proj.project(self._grad(p), state.get("proj_left"), state.get("proj_right"))
                acc = low if acc is None else acc + low
                self._set_grad(p, None)
            for t in (acc, self._grad(p)):
                if t is not None:
                    self.grad_reducer(t)
        finite = all(bool(torch.isfinite(local(t)).all()) for t in (acc, p.grad) if t is not None)
        if is_sharded(p):  # a NaN lands in one rank's rows: every rank must refuse the tensor alike
            flag = torch.tensor([float(finite)], device=local(p).device)
            finite = bool(row_shards.all_reduce_sum(flag, p) == row_shards.shard_count(p))
        if not finite:
            # a NaN/Inf piece (already reduced over ranks, so every rank decides alike) is refused,
            # never applied; the trainer reads the counter and treats the step as skipped
            self.nonfinite_refused += 1
            p.grad = None
            return
        if acc is not None:
            if self._grad(p) is not None:  # mixed: an earlier micro-batch was full-rank
                acc = acc + proj.project(local(self._grad(p)), state.get("proj_left"), state.get("proj_right"))
            self._update(p, self._precondition(p, acc, group), state, group)
        elif self._grad(p) is not None:
            self._apply(p, self._grad(p), group)
        self._set_grad(p, None)

    def _flush_layerwise(self) -> None:
        # Tensors whose hooks fired fewer than accumulation_steps times (unused in some
        # micro-batch) are updated with what they accumulated, so nothing is silently dropped.
        for group in self.param_groups:
            for p in group["params"]:
                if self._micro.get(id(p), 0) > 0:
                    self._layerwise_update(p, group)

    def remove_hooks(self) -> None:
        """Detach the layer-wise hooks (e.g. before handing the model to another optimizer)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.layerwise:
            # Gradients are consumed by the hooks; clearing here would drop the accumulation.
            return
        super().zero_grad(set_to_none=set_to_none)


def _matrix_shape(p: Tensor) -> tuple[int, int]:
    """(m, n) of ``p`` seen as a matrix (conv weights: (out, in*kh*kw)); a DTensor's global shape."""
    return p.shape[0], math.prod(p.shape[1:])
