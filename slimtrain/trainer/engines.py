"""How an optimizer step runs: the engine, chosen once from the optimizer's declared spec and
the ``dist`` section, and the combinations that are refused (with the alternative).

Engines (``choose_engine``):

- ``zeroth_order`` (spec ``zeroth_order``: MeZO): no backward; the optimizer calls a closure that
  returns the rank-averaged loss. Runs on the plain module under either ``dist.engine``
  (DeepSpeed has nothing to add without a backward).
- ``layerwise`` (spec ``layerwise``): each tensor is updated inside backward; under data
  parallelism its gradient is averaged in the hook first (``optimizer.grad_reducer``).
- ``data_parallel`` (``dist.engine=torch``): at ``dist.zero_stage`` 0 with more than one rank,
  torch's DDP below whenever it can carry the optimizer (:func:`ddp_carries`); otherwise (Q-GaLore,
  whole-tensor ZeRO-1/2 at stages 1/2, one rank)
  :class:`slimtrain.parallel.DataParallelOptimizer` averages gradients after the last
  micro-batch (projected for optimizers with ``lowrank_grads``), clips, and shards state by whole
  tensors at stages 1/2: the sharding FSDP2 cannot give optimizers that need whole matrices on
  one rank (Q-GaLore's INT8 weights, APOLLO, Fira, Natural GaLore).
- ``ddp`` (``dist.engine=ddp``, more than one rank): ``torch.nn.parallel.DistributedDataParallel``
  averages gradients during backward, overlapping communication with compute; for optimizers
  with ``lowrank_grads`` its communication hook
  (:func:`slimtrain.parallel.ddp_hooks.lowrank_allreduce_hook`) sends GaLore matrices' projected
  gradients. Optimizer state is replicated (``dist.zero_stage`` 0).
- ``fsdp`` (``dist.engine=fsdp``): FSDP2 ``fully_shard`` on each decoder layer and the root
  (:func:`slimtrain.parallel.fsdp.shard_model`, applied before the optimizer is built): weights,
  gradients and optimizer state are ``DTensor`` shards. Only optimizers whose spec declares
  ``dtensor_params`` run there; checkpoints are sharded (every rank writes its shards with
  ``torch.distributed.checkpoint``, see :mod:`slimtrain.run.sharded_checkpoint`) and load at any
  world size.
- ``deepspeed`` (``dist.engine=deepspeed``): a DeepSpeed engine wraps model and optimizer. ZeRO
  flattens parameters into 1-D partitions, which an optimizer with ``whole_matrices`` cannot use,
  so at stages 1/2 those take ``data_parallel`` (DeepSpeed still launches and forms the process
  group), and stage 3 with them is refused.

Each engine knows how its state is checkpointed (``checkpoint_parts`` / ``load``), so the loop
never branches on the engine.
"""

from __future__ import annotations

import abc
import contextlib
import gc
import json
import math
import os

import torch

from ..optim.shards import local
from ..optim.spec import OptimizerSpec, lowrank_step_of
from ..parallel.comm import Comm
from ..parallel.data_parallel import DataParallelOptimizer
from ..parallel.ddp_hooks import LowRankHookState, lowrank_allreduce_hook
from ..parallel.lowrank_sync import broadcast_projector
from ..run import checkpoint as ckpt
from ..run.config import Config, ConfigError
from ..run.guard import all_ranks_agree, grads_finite, local_grads_finite
from .distributed import Distributed


def choose_engine(cfg: Config, spec: OptimizerSpec) -> str:
    """The engine for ``cfg`` and an optimizer with ``spec`` (see the module docstring)."""
    if cfg.dist.engine == "fsdp":  # zeroth-order included: its weights are sharded too
        return "fsdp"
    if spec.zeroth_order:
        return "zeroth_order"
    if spec.layerwise:
        return "layerwise"
    if cfg.dist.engine == "deepspeed" and not routes_around_zero(cfg, spec):
        return "deepspeed"
    if cfg.dist.engine in ("ddp", "fsdp"):
        return cfg.dist.engine
    return "data_parallel"


def ddp_carries(spec: OptimizerSpec) -> bool:
    """Whether DDP can average this optimizer's gradients: not when gradients live outside
    parameters (Q-GaLore's INT8 weights). A trained set that changes between steps (LISA) is
    carried by re-wrapping the model when it changes (see :class:`DDPEngine`)."""
    return not (spec.external_grads or spec.zeroth_order or spec.layerwise)


def routes_around_zero(cfg: Config, spec: OptimizerSpec) -> bool:
    """DeepSpeed asked for, but the optimizer needs whole matrices: slimtrain's sharding instead.

    At stage 0 the engine could carry a GaLore optimizer (whole tensors), but it all-reduces full
    gradients; low-rank sync is slimtrain's, so the engine only stays with lowrank_sync off."""
    return (cfg.dist.engine == "deepspeed" and spec.whole_matrices and not spec.zeroth_order and not spec.layerwise
            and (cfg.dist.zero_stage in (1, 2) or cfg.dist.lowrank_sync))


def check_combination(cfg: Config, spec: OptimizerSpec, say) -> None:
    """Refuse what cannot work, naming the alternative; ``say`` prints notes on rank 0."""
    stage, name = cfg.dist.zero_stage, cfg.optim.name
    if stage == 3 and spec.whole_matrices:
        raise ConfigError(
            f"dist.zero_stage=3 with optim.name={name!r}: ZeRO-3 hands the optimizer flat 1-D "
            "partitions of every parameter, but this optimizer needs each weight's matrix shape (GaLore "
            "projects gradients). Use dist.zero_stage=2 (slimtrain shards optimizer state by whole tensors and "
            "syncs projected gradients), or a shape-independent optimizer such as adamw with ZeRO-3. "
            "docs/distributed.md describes how parameter sharding would carry GaLore.")
    if stage >= 1 and spec.sharding == "none" and not spec.zeroth_order:
        raise ConfigError(
            f"dist.zero_stage={stage} with optim.name={name!r}: this optimizer's state is not shardable "
            + ("(its INT8 weights are updated with their group scales outside torch's parameter machinery); "
               if spec.rewrites_model else "; ")
            + "use dist.zero_stage=0 (data parallel, gradients averaged)"
            + (" or galore_adamw8bit" if spec.rewrites_model else ""))
    if routes_around_zero(cfg, spec):
        why = (f"DeepSpeed ZeRO-{stage} would flatten parameters into 1-D partitions, which {name} "
               f"cannot use; slimtrain shards its optimizer state by whole tensors instead (ZeRO-{stage} "
               "semantics)" if stage else
               f"the DeepSpeed engine would all-reduce full gradients; slimtrain syncs {name}'s "
               "projected gradients instead (dist.lowrank_sync=false keeps the engine)")
        say(f"note: {why}; DeepSpeed provides the launch and the process group")
    if cfg.dist.engine == "deepspeed" and spec.zeroth_order:
        say(f"note: {name} is zeroth-order (no backward): it runs on the plain model, DeepSpeed only provides "
            "the process group")
    if cfg.dist.engine == "deepspeed" and cfg.train.nan_policy == "skip" and not spec.zeroth_order:
        raise ConfigError("train.nan_policy='skip' with dist.engine='deepspeed': the engine applies every "
                          "accumulated step; use train.nan_policy=stop or dist.engine=torch")
    if cfg.dist.engine == "ddp" and not spec.zeroth_order and not spec.layerwise:
        if stage > 0:
            raise ConfigError(f"dist.engine='ddp' with dist.zero_stage={stage}: DDP replicates optimizer state; "
                              f"use dist.engine=torch dist.zero_stage={stage} (slimtrain's whole-tensor sharding) "
                              "or dist.engine=deepspeed for a shape-independent optimizer")
        if spec.external_grads:
            raise ConfigError(f"dist.engine='ddp' with optim.name={name!r}: its INT8 weights' gradients live outside "
                              "torch's parameters, where DDP does not reduce them; use dist.engine=torch")
    if cfg.dist.engine == "fsdp":
        if not spec.dtensor_params:
            raise ConfigError(
                f"dist.engine='fsdp' with optim.name={name!r}"
                + (" and optim.args.layerwise=True" if spec.layerwise else "")
                + ": FSDP2 hands the optimizer DTensor shards of every weight, and this optimizer does not declare "
                "that it steps on them (spec dtensor_params; today: adamw, adamw8bit, galore_adamw, "
                "galore_adamw8bit (layer-wise too), lisa over those, mezo). "
                + ("Q-GaLore's INT8 weights are not nn.Parameters FSDP2 can shard: use galore_adamw8bit under "
                   "FSDP2, or qgalore_adamw8bit with dist.engine=torch. " if spec.rewrites_model else "")
                + "Use dist.engine=torch (with dist.zero_stage=1|2 to shard optimizer state by whole tensors) or "
                "dist.engine=ddp")
        if stage > 0:
            raise ConfigError(f"dist.engine='fsdp' with dist.zero_stage={stage}: FSDP2 shards weights, gradients "
                              "and optimizer state itself; leave dist.zero_stage=0")
    if cfg.dist.engine == "ddp" and spec.zeroth_order:
        say(f"note: {name} is zeroth-order (no backward): it runs on the plain model, one loss all-reduce per "
            "evaluation; DDP has nothing to add")
    if spec.layerwise and (cfg.dist.engine in ("deepspeed", "ddp") or stage > 0) and cfg.dist.engine != "fsdp":
        raise ConfigError(f"optim.args.layerwise=True with dist.engine={cfg.dist.engine!r} "
                          f"dist.zero_stage={stage}: the layer-wise mode updates each weight inside "
                          "backward, right after averaging its gradient over ranks itself; use "
                          "dist.engine=torch dist.zero_stage=0 (optimizer state is replicated)")


class Engine(abc.ABC):
    """One optimizer step's mechanics after the loss is known; see the module docstring."""

    name = "base"

    def __init__(self, model, optimizer, spec: OptimizerSpec, dist: Distributed):
        self.model, self.optimizer, self.spec, self.dist = model, optimizer, spec, dist

    @property
    def module(self):
        """What the forward pass runs on."""
        return self.model

    def begin_step(self) -> None:
        """Called before the step's first forward."""

    def before_forward(self, last: bool) -> None:
        """Called before each micro-batch's forward; ``last`` for the step's final micro-batch."""

    def after_forward_without_backward(self) -> None:
        """Called after a zeroth-order loss evaluation, before the optimizer moves the weights in place."""

    def backward(self, loss: torch.Tensor, grad_accum: int) -> None:
        (loss / grad_accum).backward()

    @abc.abstractmethod
    def apply(self, max_grad_norm: float) -> tuple[float, bool]:
        """Synchronise, clip and update, unless a gradient is non-finite (checked on every rank, the
        ranks agreeing): returns the gradient norm before clipping (nan if none) and whether the
        update was applied."""

    def discard(self) -> None:
        """Drop this step's gradients without updating (a skipped step)."""
        self.optimizer.zero_grad(set_to_none=True)

    def eval_ranks(self) -> tuple[int, int]:
        """(rank, world) for sharding the eval set: each rank scores its share by default."""
        return self.dist.rank, self.dist.world

    def export_state(self) -> dict | None:
        """The full model tensors to export (rank 0; every rank calls it), or None: the model's own."""
        return None

    def full_weights(self):
        """A context in which ``self.model``'s parameters are whole on every rank (entered by every
        rank: it may communicate). Only DeepSpeed ZeRO-3 partitions parameters."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_parts(self) -> dict:
        """Keyword arguments of :func:`slimtrain.run.checkpoint.save_checkpoint` for this engine's state."""
        return {"model_state": self.model.state_dict(), "optim_state": self.optimizer.state_dict()}

    def load(self, path: str, saved_cfg: dict) -> None:
        _refuse_fsdp_checkpoint(path, saved_cfg)
        if os.path.isdir(os.path.join(path, "deepspeed")):
            raise ConfigError(f"{path!r} was saved with ZeRO >= 1 (DeepSpeed format); resume it with "
                              f"dist.engine=deepspeed dist.zero_stage={saved_cfg['dist']['zero_stage']}")
        self.model.load_state_dict(ckpt.load_file(path, "model.pt"))
        shards = ckpt.load_rank_files(path, "optim")
        if shards:
            raise ConfigError(f"{path!r} holds optimizer state sharded over {len(shards)} ranks "
                              f"(dist.zero_stage={saved_cfg['dist']['zero_stage']}); resume it with "
                              f"dist.engine=torch and an optimizer that can be sharded (the shards are merged)")
        self.optimizer.load_state_dict(ckpt.load_file(path, "optim.pt"))


class ZerothOrderEngine(Engine):
    """No backward: the step is ``optimizer.step(closure)`` (see :func:`.steps.zeroth_order_step`)."""

    name = "zeroth_order"

    def apply(self, max_grad_norm: float) -> tuple[float, bool]:
        raise RuntimeError("a zeroth-order optimizer steps with a closure (steps.zeroth_order_step); there is no "
                           "gradient to apply")


class LayerwiseEngine(Engine):
    """Updates happened inside backward; ``step()`` flushes tensors whose hooks fired fewer times.

    The hooks refuse a non-finite piece (after averaging it over ranks, so every rank refuses the
    same) and count it in ``optimizer.nonfinite_refused``: a step with a refused piece counts as
    skipped. Pieces updated earlier in the same backward keep their update (the whole gradient
    never exists at once, so it cannot be checked before the first update)."""

    name = "layerwise"

    def __init__(self, model, optimizer, spec, dist, grad_accum: int):
        super().__init__(model, optimizer, spec, dist)
        if optimizer.accumulation_steps != grad_accum:
            raise ConfigError(f"optim.args.accumulation_steps must equal train.grad_accum={grad_accum} for a "
                              "layer-wise optimizer")
        if dist.world > 1:
            optimizer.grad_reducer = dist.average_in_place
        self._refused_before = 0

    def begin_step(self) -> None:
        self._refused_before = self.optimizer.nonfinite_refused

    def apply(self, max_grad_norm: float) -> tuple[float, bool]:
        # per-tensor clipping (optim.args.max_grad_norm) happened in the hooks: the whole gradient
        # never exists at once, so there is no global norm to report
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float("nan"), self.optimizer.nonfinite_refused == self._refused_before


class DataParallelEngine(Engine):
    """slimtrain's data parallelism (one rank included): average, clip, step, optional sharding."""

    name = "data_parallel"

    def __init__(self, model, optimizer, spec, dist, zero_stage: int, lowrank_sync: bool):
        super().__init__(model, optimizer, spec, dist)
        self.dp = DataParallelOptimizer(optimizer, zero_stage=zero_stage, lowrank=lowrank_sync, spec=spec)

    def apply(self, max_grad_norm: float) -> tuple[float, bool]:
        # every rank's gradients are checked before any communication or projector refresh
        external = self.optimizer.external_grads() if self.spec.external_grads else []
        ok = local_grads_finite(self.model.parameters()) and all(bool(torch.isfinite(g).all()) for g in external)
        if not all_ranks_agree(ok, self.dist.device):
            self.discard()
            return float("nan"), False
        self.dp.sync_gradients()
        norm = self.dp.clip_grad_norm_(max_grad_norm) if max_grad_norm > 0 else self.dp.grad_norm()
        if not math.isfinite(norm):  # the reduced gradients overflowed
            self.dp.discard()
            self.discard()
            return norm, False
        self.dp.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm, True

    def checkpoint_parts(self) -> dict:
        if not self.dp.sharded:
            return super().checkpoint_parts()
        # every rank holds a different part of the state: one file per rank
        return {"model_state": self.model.state_dict(), "optim_state": None,
                "rank_files": {"optim": self.dp.state_dict()}}

    def load(self, path: str, saved_cfg: dict) -> None:
        _refuse_fsdp_checkpoint(path, saved_cfg)
        if os.path.isdir(os.path.join(path, "deepspeed")):
            super().load(path, saved_cfg)  # refuses with the resume command
        self.model.load_state_dict(ckpt.load_file(path, "model.pt"))
        shards = ckpt.load_rank_files(path, "optim")
        if not shards:  # replicated state: one file, valid for any number of ranks
            full = ckpt.load_file(path, "optim.pt")
            if not self.dp.sharded:
                self.optimizer.load_state_dict(full)
                return
            shards = [{"world_size": 1, "zero_stage": 0, "owners": torch.full((len(self.dp.owners),), -1),
                       "optimizer": full}]
        self.dp.load_state_dict(shards)


class DDPEngine(Engine):
    """``DistributedDataParallel``: gradients are averaged inside backward (the last micro-batch's;
    the others run with ``require_backward_grad_sync`` off, as ``no_sync()`` does), projected for
    GaLore matrices by :func:`~slimtrain.parallel.ddp_hooks.lowrank_allreduce_hook`. After backward:
    projector refreshes (computed on rank 0 from the averaged full gradient and broadcast, so every
    rank holds the same projector), the finite check, clipping of what the optimizer will apply
    (projected gradients for GaLore matrices, as ``dist.engine=torch``), and the step.

    DDP builds its gradient buckets once, from the parameters that require gradients. An
    optimizer that changes the trained set (spec ``changes_trainable``: LISA every period) gets a
    new DDP wrapper over the same module when the set changes, before the next forward: frozen
    layers are in no bucket and send nothing. The re-wrap skips DDP's initial broadcast
    (``init_sync=False``): every rank applied the same averaged updates, so the weights agree."""

    name = "ddp"

    def __init__(self, model, optimizer, spec, dist, lowrank_sync: bool):
        super().__init__(model, optimizer, spec, dist)
        self.lowrank = lowrank_step_of(optimizer) if lowrank_sync else None
        self.hook = LowRankHookState(self.lowrank) if self.lowrank is not None else None
        self.comm = Comm()
        self.ddp, self._trained = None, None
        self._wrap(init_sync=True)

    def _trained_set(self) -> tuple[bool, ...]:
        return tuple(p.requires_grad for p in self.model.parameters())

    def _wrap(self, init_sync: bool) -> None:
        from torch.nn.parallel import DistributedDataParallel

        if self.ddp is not None:  # its reducer (and the autograd hooks it registered) goes with it
            self.ddp = None
            gc.collect()
        device_ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.model, device_ids=device_ids, gradient_as_bucket_view=True,
                                           init_sync=init_sync)
        if self.hook is not None:
            self.ddp.register_comm_hook(self.hook, lowrank_allreduce_hook)
        self._trained = self._trained_set()

    @property
    def module(self):
        return self.ddp

    def before_forward(self, last: bool) -> None:
        if self.spec.changes_trainable and self._trained_set() != self._trained:
            self._wrap(init_sync=False)
        self.ddp.require_backward_grad_sync = last  # what no_sync() toggles: only the last micro-batch syncs

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @torch.no_grad()
    def apply(self, max_grad_norm: float) -> tuple[float, bool]:
        projected = self.hook.take() if self.hook is not None else {}
        # every value here is already averaged over ranks, so every rank reaches the same verdict
        ok = local_grads_finite(self._params()) and all(bool(torch.isfinite(t).all()) for t in projected.values())
        if not all_ranks_agree(ok, self.dist.device):
            self.discard()
            return float("nan"), False
        if self.lowrank is not None:
            for p, group in self.lowrank.lowrank_params():
                if p.grad is None or p in projected:
                    continue
                # a refresh step: the full gradient travelled; one rank computes the projector
                if self.dist.rank == 0:
                    self.lowrank.refresh_projector(p, p.grad, group)
                broadcast_projector(self.lowrank, p, group, self.comm, src=0)
                projected[p] = self.lowrank.project_grad(p, p.grad)
            for p, low in projected.items():
                self.lowrank.set_projected_grad(p, low)
                p.grad = None
        grads = [p.grad for p in self._params() if p.grad is not None] + list(projected.values())
        norm = (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
                if grads else torch.zeros(()))
        if max_grad_norm > 0:
            coef = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm), True

    def discard(self) -> None:
        if self.hook is not None:
            self.hook.take()
        if self.lowrank is not None:
            for p, _ in self.lowrank.lowrank_params():
                self.lowrank.drop_projected_grad(p)
        super().discard()


class FSDPEngine(Engine):
    """FSDP2: the model was sharded by :func:`slimtrain.parallel.fsdp.shard_model` before the
    optimizer was built, so the optimizer steps on local shards. Gradients are reduce-scattered
    (averaged) during the last micro-batch's backward; clipping uses torch's DTensor-aware
    ``clip_grad_norm_`` (the global norm over all shards). For GaLore matrices the gradient rows are projected before clipping (refreshing projectors where due, a
    collective, see :mod:`slimtrain.optim.row_shards`), so clipping sees what the optimizer will
    apply, as on ``dist.engine=torch`` and ``ddp``.

    A layer-wise optimizer updates each shard in its post-accumulate-grad hook, which FSDP2 runs
    on the sharded parameter right after the reduce-scatter: every micro-batch syncs then (the
    optimizer accumulates, projected for GaLore matrices, and counts micro-batches itself), so
    no unsharded gradient outlives its layer's backward. Clipping is then the optimizer's
    per-tensor ``max_grad_norm`` (the whole gradient never exists)."""

    name = "fsdp"

    def __init__(self, model, optimizer, spec, dist, grad_accum: int):
        super().__init__(model, optimizer, spec, dist)
        if spec.layerwise and optimizer.accumulation_steps != grad_accum:
            raise ConfigError(f"optim.args.accumulation_steps must equal train.grad_accum={grad_accum} for a "
                              "layer-wise optimizer")
        self._refused_before = 0
        self.lowrank = lowrank_step_of(optimizer) if not spec.layerwise else None

    def begin_step(self) -> None:
        if self.spec.layerwise:
            self._refused_before = self.optimizer.nonfinite_refused

    def before_forward(self, last: bool) -> None:
        # earlier micro-batches accumulate locally; a layer-wise optimizer consumes every one
        self.model.set_requires_gradient_sync(last or self.spec.layerwise)

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @torch.no_grad()
    def apply(self, max_grad_norm: float) -> tuple[float, bool]:
        if self.spec.layerwise:  # updated inside backward; step() flushes stragglers
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan"), self.optimizer.nonfinite_refused == self._refused_before
        grads = [p.grad for p in self._params() if p.grad is not None]
        ok = all(bool(torch.isfinite(local(g)).all()) for g in grads)
        if not all_ranks_agree(ok, self.dist.device):
            self.discard()
            return float("nan"), False
        # GaLore matrices: project each rank's gradient rows first (refreshing the projector where
        # due, a collective on the shards), so clipping sees what the optimizer applies, as on
        # dist.engine=torch and ddp; the step then needs no communication
        projected = {}
        if self.lowrank is not None:
            for p, group in self.lowrank.lowrank_params():
                if p.grad is None:
                    continue
                if self.lowrank.needs_refresh(p):
                    self.lowrank.refresh_projector(p, p.grad, group)
                projected[p] = self.lowrank.project_grad(p, local(p.grad))
                p.grad = None
        if not projected:  # torch's DTensor-aware clipping: the global norm over every shard
            norm = torch.nn.utils.clip_grad_norm_(self._params(), max_grad_norm if max_grad_norm > 0 else float("inf"))
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        else:
            norm = self._clip_with_projected(list(projected.values()), max_grad_norm)
        for p, low in projected.items():
            self.lowrank.set_projected_grad(p, low)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm), True

    def _clip_with_projected(self, projected: list[torch.Tensor], max_grad_norm: float) -> torch.Tensor:
        """Clip the full gradients' shards and the projected rows together; returns the norm."""
        pieces = [local(p.grad) for p in self._params() if p.grad is not None] + projected
        # every tensor is a dim-0 shard: each tensor's squared norm is the sum of its shards' (one
        # all-reduce of a vector), then the norm of the per-tensor norms, as torch computes it
        sq = torch.stack([torch.linalg.vector_norm(t.float()) ** 2 for t in pieces]).to(self.dist.device)
        if self.dist.world > 1:
            torch.distributed.all_reduce(sq)
        norm = torch.linalg.vector_norm(sq.sqrt())
        if max_grad_norm > 0:
            coef = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            for t in pieces:
                t.mul_(coef.to(t.device, t.dtype))
        return norm

    def after_forward_without_backward(self) -> None:
        # a no-grad forward may leave modules unsharded (the root, the last layer); the optimizer
        # is about to move the sharded weights, so the next forward must all-gather them afresh
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def eval_ranks(self) -> tuple[int, int]:
        # every forward is collective under FSDP2, so every rank must run the same batches:
        # each rank scores the whole eval set (no per-rank shares that could differ by a batch)
        return 0, 1

    def export_state(self) -> dict | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # the whole tensors, gathered shard by shard into rank 0's host memory
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def checkpoint_parts(self) -> dict:
        # every rank writes its own shards (torch.distributed.checkpoint): nothing is gathered
        from ..run.sharded_checkpoint import sharded_state

        if self.spec.zeroth_order:  # seeds and a generator, the same on every rank: no per-tensor state
            tensors, _ = sharded_state(self.model, None, self.dist.rank, row_state=False)
            return {"sharded_state": tensors, "optim_state": self.optimizer.state_dict()}
        tensors, skeleton = sharded_state(self.model, self.optimizer, self.dist.rank,
                                          row_state=self.spec.local_shard_state)
        return {"sharded_state": tensors, "rank_files": {"optim": skeleton}}

    def load(self, path: str, saved_cfg: dict) -> None:
        from ..run.sharded_checkpoint import has_sharded_state, load_sharded_state

        if saved_cfg["dist"]["engine"] != "fsdp" or not has_sharded_state(path):
            raise ConfigError(f"{path!r} was written by dist.engine={saved_cfg['dist']['engine']!r}; an FSDP2 run "
                              "resumes checkpoints of dist.engine=fsdp (at any world size)")
        if self.spec.zeroth_order:
            load_sharded_state(path, self.model, None, None, self.dist.rank)
            self.optimizer.load_state_dict(ckpt.load_file(path, "optim.pt"))
        else:
            load_sharded_state(path, self.model, self.optimizer, ckpt.load_rank_files(path, "optim"), self.dist.rank)


def _refuse_fsdp_checkpoint(path: str, saved_cfg: dict) -> None:
    # FSDP2 checkpoints hold the optimizer state keyed by parameter name (torch.distributed.checkpoint)
    if saved_cfg.get("dist", {}).get("engine") == "fsdp":
        raise ConfigError(f"{path!r} was written by dist.engine=fsdp; resume it with dist.engine=fsdp (any number "
                          "of ranks, one included), or export it with slimtrain export")


class DeepSpeedEngine(Engine):
    """A DeepSpeed engine: it scales for accumulation, all-reduces, clips and (ZeRO >= 1) partitions."""

    name = "deepspeed"

    def __init__(self, model, optimizer, spec, dist, cfg: Config):
        super().__init__(model, optimizer, spec, dist)
        import deepspeed

        self.grad_accum = cfg.train.grad_accum
        self.partitioned = cfg.dist.zero_stage >= 1
        self.engine, self.ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, dist.world))

    @property
    def module(self):
        return self.engine

    def backward(self, loss: torch.Tensor, grad_accum: int) -> None:
        self.engine.backward(loss)  # the engine divides by grad_accum

    def apply(self, max_grad_norm: float) -> tuple[float, bool]:
        # ZeRO >= 1 keeps gradients in the engine's partitions: only stage 0 exposes p.grad to check
        if not grads_finite(self.model.parameters(), self.dist.device):
            return float("nan"), False
        for _ in range(self.grad_accum):  # the engine counts micro-steps; only the last one updates
            self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return (float(norm) if norm is not None else float("nan")), True

    def full_weights(self):
        if self.engine.zero_optimization_partition_weights():
            import deepspeed

            # gathers every partition for the duration (read-only: modifier_rank=None)
            return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)
        return super().full_weights()

    def checkpoint_parts(self) -> dict:
        if not self.partitioned:
            return super().checkpoint_parts()
        return {"model_state": None, "optim_state": None, "engine": self.engine}

    def load(self, path: str, saved_cfg: dict) -> None:
        if not os.path.isdir(os.path.join(path, "deepspeed")):
            return super().load(path, saved_cfg)
        if not self.partitioned:
            raise ConfigError(f"{path!r} was saved with ZeRO >= 1 (DeepSpeed format); resume it with "
                              f"dist.engine=deepspeed dist.zero_stage={saved_cfg['dist']['zero_stage']}")
        self.engine.load_checkpoint(os.path.join(path, "deepspeed"), tag="state", load_lr_scheduler_states=False)


def deepspeed_config(cfg: Config, world: int) -> dict:
    """The DeepSpeed JSON slimtrain runs: the user's file (if any) under our batch sizes, clipping
    and ZeRO stage."""
    user = {}
    if cfg.dist.deepspeed_config:
        with open(cfg.dist.deepspeed_config) as fh:
            user = json.load(fh)
    for key in ("fp16", "bf16"):
        if user.get(key, {}).get("enabled"):
            raise ConfigError(f"dist.deepspeed_config enables {key}: slimtrain keeps fp32 parameters and "
                              "optimizer state and autocasts instead; remove it and set train.bf16=true")
    zero = {**user.get("zero_optimization", {}), "stage": cfg.dist.zero_stage}
    return {**user, "train_micro_batch_size_per_gpu": cfg.train.batch_size,
            "gradient_accumulation_steps": cfg.train.grad_accum,
            "train_batch_size": cfg.train.batch_size * cfg.train.grad_accum * world,
            "gradient_clipping": cfg.train.max_grad_norm, "zero_optimization": zero,
            "steps_per_print": user.get("steps_per_print", 10**9)}


def build_engine(cfg: Config, model, optimizer, spec: OptimizerSpec, dist: Distributed) -> Engine:
    kind = choose_engine(cfg, spec)
    if kind == "zeroth_order":
        return ZerothOrderEngine(model, optimizer, spec, dist)
    if kind == "layerwise":
        return LayerwiseEngine(model, optimizer, spec, dist, cfg.train.grad_accum)
    if kind == "deepspeed":
        return DeepSpeedEngine(model, optimizer, spec, dist, cfg)
    if kind == "fsdp":
        return FSDPEngine(model, optimizer, spec, dist, cfg.train.grad_accum)
    if kind == "ddp" and dist.world > 1:  # one rank: nothing to synchronise, the plain path is the same
        return DDPEngine(model, optimizer, spec, dist, cfg.dist.lowrank_sync)
    if kind == "data_parallel" and dist.world > 1 and cfg.dist.zero_stage == 0 and ddp_carries(spec):
        # replicated state: torch's DDP (with the low-rank hook) averages the gradients during
        # backward; slimtrain's own data parallelism stays for what DDP cannot carry
        return DDPEngine(model, optimizer, spec, dist, cfg.dist.lowrank_sync)
    return DataParallelEngine(model, optimizer, spec, dist, cfg.dist.zero_stage, cfg.dist.lowrank_sync)


__all__ = ["DDPEngine", "Engine", "FSDPEngine", "build_engine", "check_combination", "choose_engine", "ddp_carries",
           "deepspeed_config", "routes_around_zero"]
