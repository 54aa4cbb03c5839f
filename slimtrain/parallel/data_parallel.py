"""Data parallelism for any slimtrain optimizer: gradient averaging, whole-tensor optimizer-state
sharding (ZeRO-1/2 semantics without flattening) and low-rank sync for GaLore matrices, combined.

Per step, after backward on every rank:

1. :meth:`DataParallelOptimizer.sync_gradients`
   * a GaLore matrix (a tensor in a ``rank`` group of a GaLore-family optimizer) travels
     *projected*: every rank projects its own gradient with the shared projector and the
     (r, n) results are summed (all-reduce at stage 0, reduce to the owner at stages 1/2).
     On a refresh step the full gradient is all-reduced instead; the SVDs are shared out (each
     matrix's projector is computed by one rank and broadcast, r x n), so projectors stay
     replicated (they are small) while the moments live on the owner only, and refresh
     compute per rank falls ~1/N;
   * every other tensor is all-reduced (stages 0/1) or reduced to its owner (stage 2) in flat
     buckets, one collective per bucket as DDP does;
   * tensors without a gradient on this step (LISA's frozen layers) are skipped: all ranks
     freeze the same ones, so every rank joins the same collectives.
2. :meth:`clip_grad_norm_`: the global L2 norm of what the optimizer is about to see (projected
   gradients for GaLore matrices, full gradients otherwise); with sharding each rank adds the
   squares of the tensors it owns and one scalar is all-reduced.
3. :meth:`step`: the wrapped optimizer updates the tensors this rank owns (it skips the
   others: their gradients were freed, so it never creates state for them), then every
   updated tensor is broadcast from its owner, bucketed per owner. For a GaLore matrix whose
   optimizer can split its step (spec `split_step`: ``lowrank_direction`` / ``apply_lowrank_direction``,
   GaLoreAdamW) the owner broadcasts the low-rank *direction* (r x n) instead of the (m x n)
   weight and every rank applies it with its replicated projector and step counter, so the
   weight travels neither as a gradient nor as a parameter: both directions of a sharded
   step cost r/min(m, n) of ZeRO-2's bytes for that matrix.

The wrapped optimizer is built over *all* parameters on every rank (same groups, same LR
schedule), and each rank simply steps its own tensors, so ``state_dict()`` indices agree
across ranks and a checkpoint written at N ranks can be merged for another N
(:func:`merge_sharded_states`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..optim.spec import OptimizerSpec, lowrank_step_of, per_parameter_state, spec_of
from .comm import Comm, all_reduce_bucketed
from .lowrank_sync import broadcast_projector
from .sharded import assign_owners


def _reduce_bucketed(comm: Comm, tensors: list[Tensor], dst: int, bucket_bytes: int) -> None:
    """Sum ``tensors`` onto rank ``dst`` (other ranks' copies are left undefined)."""
    for flat, members in _buckets(tensors, bucket_bytes):
        comm.reduce(flat, dst=dst)
        if comm.rank == dst:
            _unflatten(flat, members)


def _broadcast_bucketed(comm: Comm, tensors: list[Tensor], src: int, bucket_bytes: int) -> None:
    for flat, members in _buckets(tensors, bucket_bytes):
        comm.broadcast(flat, src=src)
        if comm.rank != src:
            _unflatten(flat, members)


def _buckets(tensors: list[Tensor], bucket_bytes: int):
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        bucket, size = [], 0
        for t in group:
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > bucket_bytes:
                yield torch.cat([b.reshape(-1) for b in bucket]), bucket
                bucket, size = [], 0
            bucket.append(t)
            size += nbytes
        if bucket:
            yield torch.cat([b.reshape(-1) for b in bucket]), bucket


def _unflatten(flat: Tensor, members: list[Tensor]) -> None:
    offset = 0
    for t in members:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()


class DataParallelOptimizer:
    """Run ``optimizer`` data-parallel over the ranks of ``comm`` (all ranks call every method).

    ``zero_stage``: 0 replicates optimizer state (every rank steps every tensor on the averaged
    gradient); 1 and 2 give each whole tensor one owner rank, balanced by state size, that
    keeps its optimizer state and updates it (per-rank state ~1/N, shapes kept); at stage 2
    gradients are reduced to the owner only and freed elsewhere. ``lowrank``: GaLore matrices
    exchange projected gradients (``r * max(m, n)`` floats instead of ``m * n``).

    Memory: optimizer state / N per rank at stages 1/2 (plus the replicated GaLore projectors,
    ``r * n`` floats per matrix); no extra gradient copy beyond one bucket.
    """

    def __init__(self, optimizer, *, zero_stage: int = 0, lowrank: bool = True, comm: Comm | None = None,
                 bucket_bytes: int = 25 * 2**20, spec: OptimizerSpec | None = None):
        if zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage={zero_stage!r}: slimtrain's data parallelism covers stages 0, 1 and 2 "
                             "(stage 3 shards parameters; see docs/distributed.md)")
        self.spec = spec if spec is not None else spec_of(optimizer)
        if self.spec.layerwise:
            raise ValueError("a layer-wise optimizer updates inside backward; give it a gradient reducer "
                             "(optimizer.grad_reducer) instead of wrapping it")
        if self.spec.zeroth_order:
            raise ValueError("a zeroth-order optimizer has no gradients to synchronise; average its loss over ranks "
                             "inside the closure instead")
        if zero_stage > 0 and self.spec.sharding == "none":
            raise ValueError(f"zero_stage={zero_stage}: {type(optimizer).__name__} declares that its state cannot be "
                             "sharded; use zero_stage=0")
        self.optimizer = optimizer
        self.comm = comm or Comm()
        self.zero_stage = zero_stage
        self.bucket_bytes = bucket_bytes
        # the optimizer's low-rank interface, when it has one and low-rank sync is wanted
        self.galore = lowrank_step_of(optimizer) if lowrank else None
        self.entries: list[tuple[Tensor, dict]] = [(p, g) for g in optimizer.param_groups for p in g["params"]]
        world = self.comm.world_size
        balanced = [o for own in assign_owners(optimizer.param_groups, world) for o in own]
        if zero_stage == 0 or world == 1:
            self.owners = [None] * len(self.entries)  # None: every rank owns it
        else:
            self.owners = balanced
        # who computes each GaLore matrix's projector on a refresh step (the owner when sharded)
        self.refresh_owners = {id(p): o for (p, _), o in zip(self.entries, balanced)}
        self._updated: list[tuple[Tensor, int | None]] = []
        # GaLore matrices whose direction (not weight) is broadcast: p -> (owner, low-rank buffer)
        self._directions: dict[Tensor, tuple[int, Tensor]] = {}
        self.split_step = self.galore is not None and self.sharded and self.spec.split_step

    # ------------------------------------------------------------------ ownership
    def _mine(self, owner: int | None) -> bool:
        return owner is None or owner == self.comm.rank

    def _is_galore(self, p: Tensor, group: dict) -> bool:
        return self.galore is not None and self.galore.is_projected(p, group)

    # ------------------------------------------------------------------ gradients
    @torch.no_grad()
    def sync_gradients(self) -> None:
        comm, world = self.comm, self.comm.world_size
        self._updated = []
        self._directions = {}
        if self.spec.external_grads:  # gradients outside .grad (INT8 weights): averaged like any other
            external = self.optimizer.external_grads()
            all_reduce_bucketed(comm, external, self.bucket_bytes)
        refresh, low, plain = [], [], []  # (p, group, owner[, tensor])
        for (p, group), owner in zip(self.entries, self.owners):
            if p.grad is None:
                continue
            self._updated.append((p, owner))
            if self._is_galore(p, group):
                if self.galore.needs_refresh(p):
                    refresh.append((p, group, owner))
                else:
                    low.append((p, group, owner, self.galore.project_grad(p, p.grad)))
            else:
                plain.append((p, owner))

        # Refresh steps: the projector needs the averaged full gradient on every rank.
        all_reduce_bucketed(comm, [p.grad for p, _, _ in refresh], self.bucket_bytes)
        # Each rank first computes the projectors it is responsible for (in parallel across
        # ranks), then they are broadcast.
        for p, group, _ in refresh:
            if self.refresh_owners[id(p)] == comm.rank:
                self.galore.refresh_projector(p, p.grad, group)
        for p, group, owner in refresh:
            if world > 1:
                broadcast_projector(self.galore, p, group, comm, src=self.refresh_owners[id(p)])
            low.append((p, group, owner, None))
        # Everything else travels once: low-rank gradients of GaLore matrices, whole gradients
        # of the rest; summed everywhere (stage 0) or on the owner only.
        travelling = [(t, owner) for p, _, owner, t in low if t is not None]
        travelling += [(p.grad, owner) for p, owner in plain]
        if self.zero_stage == 0 or world == 1:
            all_reduce_bucketed(comm, [t for t, _ in travelling], self.bucket_bytes)
        elif self.zero_stage == 1:  # ZeRO-1 keeps full gradients everywhere: all-reduce, owners use them
            all_reduce_bucketed(comm, [t for t, _ in travelling], self.bucket_bytes)
        else:
            for dst in range(world):
                mine = [t for t, owner in travelling if owner == dst]
                _reduce_bucketed(comm, mine, dst, self.bucket_bytes)
                if comm.rank == dst:
                    for t in mine:
                        t /= world
        for p, _, owner, t in low:
            if t is None:  # refresh step: project the averaged full gradient with the new projector
                t = self.galore.project_grad(p, p.grad)
            if self.split_step:
                self._directions[p] = (owner, t)  # owner: the averaged gradient; others: a buffer
            elif self._mine(owner):
                self.galore.set_projected_grad(p, t)
            p.grad = None  # the full gradient of a GaLore matrix is not needed any more
        for p, owner in plain:
            if not self._mine(owner):
                p.grad = None

    def _optimizer_space_grads(self) -> list[Tensor]:
        out = []
        for (p, group), owner in zip(self.entries, self.owners):
            if not self._mine(owner):
                continue
            if p in self._directions:
                out.append(self._directions[p][1])
            elif self._is_galore(p, group) and self.galore.pending_projected_grad(p) is not None:
                out.append(self.galore.pending_projected_grad(p))
            elif p.grad is not None:
                out.append(p.grad)
        return out

    def _global_norm(self, grads: list[Tensor]) -> Tensor:
        sq = torch.zeros((), dtype=torch.float32)
        if grads:
            norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
            sq = (norms**2).sum()
        if self.sharded:
            self.comm.all_reduce(sq)  # owned sets are disjoint: the sum over ranks is the global square
        return sq.sqrt()

    @torch.no_grad()
    def grad_norm(self) -> float:
        """Global L2 norm of what the optimizer will apply (the reduced, optimizer-space gradients;
        every rank gets the same value, so a non-finite one is refused by all ranks alike)."""
        return float(self._global_norm(self._optimizer_space_grads()))

    def discard(self) -> None:
        """Forget the synchronised gradients of a step that will not be applied."""
        for p, _ in self._updated:
            if self.galore is not None:
                self.galore.drop_projected_grad(p)
            p.grad = None
        self._updated = []
        self._directions = {}

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale what the optimizer will apply so its global L2 norm is at most ``max_norm``;
        returns the norm before clipping (as ``torch.nn.utils.clip_grad_norm_``)."""
        grads = self._optimizer_space_grads()
        total = self._global_norm(grads)
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return float(total)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        if all(o is None for o in self.owners):
            return loss
        me = self.comm.rank
        if self._directions:
            self._step_directions()
        for p, owner in self._updated:
            if p in self._directions:
                continue
            if owner != me and self._is_galore(p, self._group(p)):
                # the owner advanced its step counter inside the update; keep ours in lockstep so
                # every rank agrees on the next refresh step
                self.galore.skip_update(p)
        for src in range(self.comm.world_size):
            _broadcast_bucketed(self.comm, [p.data for p, owner in self._updated
                                            if owner == src and p not in self._directions], src, self.bucket_bytes)
        self._updated = []
        self._directions = {}
        return loss

    def _step_directions(self) -> None:
        """Owners turn their averaged low-rank gradient into a direction; it is broadcast and every
        rank (owner included, for bit-identical weights) applies it."""
        me, galore = self.comm.rank, self.galore
        for p, (owner, buf) in self._directions.items():
            if owner == me:
                buf.copy_(galore.lowrank_direction(p, buf))
            else:
                galore.skip_update(p)  # the owner's step counter advanced in lowrank_direction
        for src in range(self.comm.world_size):
            _broadcast_bucketed(self.comm, [buf for owner, buf in self._directions.values() if owner == src], src,
                                self.bucket_bytes)
        for p, (_, buf) in self._directions.items():
            galore.apply_lowrank_direction(p, buf)

    def _group(self, p: Tensor) -> dict:
        for q, group in self.entries:
            if q is p:
                return group
        raise KeyError("parameter not managed here")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ state
    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds."""
        state = self.optimizer.state
        return sum(v.numel() * v.element_size() for s in state.values() for v in s.values() if isinstance(v, Tensor))

    @property
    def sharded(self) -> bool:
        return any(o is not None for o in self.owners)

    def owner_tensor(self) -> Tensor:
        """Owner rank per parameter index (-1: replicated)."""
        return torch.tensor([-1 if o is None else o for o in self.owners], dtype=torch.int64)

    def state_dict(self) -> dict:
        return {"world_size": self.comm.world_size, "zero_stage": self.zero_stage, "owners": self.owner_tensor(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, states: list[dict]) -> None:
        """Load this run's shard from the per-rank ``state_dict()``s of a checkpoint.

        Same world size: each rank loads its own file, exactly. Another world size: the shards
        are merged (each tensor's entry from its old owner) and this rank keeps what it owns now
        (plus the replicated projector bookkeeping of GaLore matrices).
        """
        if len(states) == self.comm.world_size and all(int(s["world_size"]) == self.comm.world_size for s in states) \
                and torch.equal(states[0]["owners"], self.owner_tensor()):
            self.optimizer.load_state_dict(states[self.comm.rank]["optimizer"])
            return
        merged = merge_sharded_states(states)
        per_param = per_parameter_state(merged)
        keep = self.spec.replicated_state
        for index, owner in enumerate(self.owners):
            if index in per_param and not self._mine(owner):
                p, group = self.entries[index]
                if self._is_galore(p, group):
                    per_param[index] = {k: v for k, v in per_param[index].items() if k.startswith(keep)}
                else:
                    del per_param[index]
        self.optimizer.load_state_dict(merged)


def merge_sharded_states(states: list[dict]) -> dict:
    """One full optimizer state dict from per-rank shards (each entry taken from its owner)."""
    import copy

    base = copy.deepcopy(states[0]["optimizer"])
    full = per_parameter_state(base)
    owners = states[0]["owners"].tolist()
    for index, owner in enumerate(owners):
        src = per_parameter_state(states[max(owner, 0)]["optimizer"])
        if index in src:
            full[index] = src[index]
        else:
            full.pop(index, None)
    return base


__all__ = ["DataParallelOptimizer", "merge_sharded_states"]
