"""MeZO and Sparse MeZO: zeroth-order fine-tuning with in-place, seed-replayed perturbations.

Malladi et al., "Fine-Tuning Language Models with Just Forward Passes" (MeZO), NeurIPS 2023.
Liu et al., "Sparse MeZO: Less Parameters for Better Performance in Zeroth-Order LLM
Fine-Tuning", 2024.

The functional pieces (:func:`perturb_`, :func:`spsa_grad`, :func:`zo_update_`,
:func:`noise_like`, :func:`magnitude_thresholds`) are public so a trainer or a distributed
wrapper can compose them; :class:`MeZO` and :class:`SparseMeZO` are thin ``torch.optim``
classes over them.

Exact restore. A naive ``p += eps z; p -= 2 eps z; p += eps z`` does not give ``p`` back:
each step rounds to the parameter dtype, and in fp16/bf16 those roundings are a sizeable
fraction of ``eps z``, so the weights random-walk by an ulp or more per step (the fp16
"collapse" reported for MeZO). Here every move instead *reconstructs the unperturbed value*
from the perturbed one and the replayed noise, in fp32 arithmetic (also for fp16/bf16
weights; z is always drawn in fp32), and then applies the next offset to it:

    w = unperturb(x, d)   # the w with round(w + d) == x: round(x - d) or one of its neighbours
    x' = round(w + d')

Rounding can only lose information where ``w + d`` lands in a coarser binade than ``w``
(|w| much smaller than eps |z|, or just below a power of two). Those elements are detected
while ``w`` is still known and their values are kept in a small per-step *fix list* (int32
index + value, a few percent of the elements: 3.8% for all-MiniLM-L6-v2 in fp32 and ~6% for a
bf16/fp16 Llama at eps=1e-3, i.e. ~0.3-0.5 bytes per parameter held during the two forward
passes), so the walk 0 -> +eps -> -eps -> 0 returns the bit-identical weights. Nothing else is
stored: no parameter copy, no mask, no gradient.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .shards import is_sharded
from .spec import OptimizerSpec
from .state_checks import FORMAT_KEY, check_params_supported, check_state_dict, mark

# Elements per chunk of noise / perturbation temporaries: the only transient memory of a
# perturbation is a few chunks (z in fp32 plus the wide-dtype working copy).
DEFAULT_CHUNK_SIZE = 1 << 16

Fixes = dict  # (param index, chunk start) -> (local indices LongTensor, original values Tensor)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # half weights: fp32 arithmetic (24 vs 8/11 mantissa bits); fp32/fp64 weights: their own
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _param_seed(seed: int, index: int) -> int:
    # distinct, reproducible stream per (step seed, tensor); independent of the dtype
    return (int(seed) * 1_000_003 + int(index) * 7_919 + 1) % (1 << 63)


def _noise_chunks(numel: int, seed: int, index: int, chunk_size: int):
    """Yield ``(start, end, z)`` with z ~ N(0, 1) in fp32, the same on every replay."""
    g = torch.Generator().manual_seed(_param_seed(seed, index))
    for start in range(0, numel, chunk_size):
        end = min(start + chunk_size, numel)
        yield start, end, torch.randn(end - start, generator=g, dtype=torch.float32)


def _local_flat(p: Tensor) -> tuple[Tensor, int, int]:
    """``(flat, start, numel)``: the flat view of the elements this process holds and where they
    sit in the whole tensor. A plain tensor holds everything; an FSDP2 ``DTensor`` holds a dim-0
    shard (contiguous rows), whose global offset gives the flat start."""
    if not is_sharded(p):
        flat = p.data.view(-1)
        return flat, 0, flat.numel()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = p.data.to_local()
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if any(o != 0 for o in offset[1:]):
        raise ValueError(f"zeroth-order perturbation of a DTensor sharded on a dim other than 0 ({p.placements})")
    row = math.prod(p.shape[1:]) if p.dim() > 1 else 1
    return local.view(-1), int(offset[0]) * row if p.dim() > 0 else 0, p.numel()


def _shard_chunks(p: Tensor, seed: int, index: int, chunk_size: int):
    """Yield ``(key, x, z)``: the held elements ``x`` (a view) of each noise chunk and their noise.

    The noise stream is the whole tensor's, drawn by global element index, so a sharded run
    perturbs every element exactly as one process does (each rank draws the stream up to the end
    of its shard and keeps its part; memory stays one chunk). ``key`` (the chunk's global start)
    names the chunk in fix lists."""
    flat, lo, numel = _local_flat(p)
    hi = lo + flat.numel()
    for start, end, z in _noise_chunks(numel, seed, index, chunk_size):
        if end <= lo:
            continue
        if start >= hi:
            break
        a, b = max(start, lo), min(end, hi)
        # drawn on the CPU generator (the same numbers on every device), used where the weights are
        yield start, flat[a - lo: b - lo], z[a - start: b - start].to(flat.device, non_blocking=True)


def noise_like(param: Tensor, seed: int, index: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """The full fp32 perturbation direction z used for ``param`` (tensor ``index``) under ``seed``.

    Materialises the whole tensor; for tests and analysis only, the optimizers never call it.
    """
    parts = [z for _, _, z in _noise_chunks(param.numel(), seed, index, chunk_size)]
    return torch.cat(parts).view_as(param) if parts else torch.zeros_like(param, dtype=torch.float32)


_INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _kth_smallest_abs(p: Tensor, k: int, chunk_size: int) -> Tensor:
    """Exact k-th smallest ``|w|`` of ``p`` (1-based) without materialising ``|w|``.

    Non-negative floats order like their bit patterns read as integers, so a bisection over
    bit patterns with a chunked count ``#{|w| <= t}`` per probe finds the exact value in at most
    ``8 * element_size`` passes, with one chunk of temporaries.
    """
    flat = p.detach().reshape(-1)
    itype = _INT_VIEW[p.element_size()]

    def as_float(bits: int) -> Tensor:
        return torch.tensor(bits, dtype=itype).view(p.dtype)

    def count_le(t: Tensor) -> int:
        return sum(int((flat[i:i + chunk_size].abs() <= t).sum()) for i in range(0, flat.numel(), chunk_size))

    hi = max(float(flat[i:i + chunk_size].abs().max()) for i in range(0, flat.numel(), chunk_size))
    lo_bits, hi_bits = 0, int(torch.tensor(hi, dtype=p.dtype).view(itype))
    while lo_bits < hi_bits:  # smallest bit pattern t with #{|w| <= t} >= k
        mid = (lo_bits + hi_bits) // 2
        if count_le(as_float(mid)) >= k:
            hi_bits = mid
        else:
            lo_bits = mid + 1
    return as_float(lo_bits).float()


def magnitude_thresholds(params: Sequence[Tensor], sparsity: float,
                         chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[Tensor]:
    """Per-tensor magnitude threshold: ``|w| <= t`` selects the ``1 - sparsity`` smallest weights.

    Exact (``t`` is the ``ceil((1 - sparsity) n)``-th smallest ``|w|``), computed chunk by chunk:
    no ``|w|`` copy of the tensor is made.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r} must lie in [0, 1): it is the fraction of weights left untouched")
    out = []
    for p in params:
        _check_param(p)
        keep = max(1, math.ceil((1.0 - sparsity) * p.numel()))
        out.append(_kth_smallest_abs(p, keep, chunk_size))
    return out


def _round_to(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(dtype)


def _within(w: Tensor, threshold: Tensor) -> Tensor:
    return w.abs() <= threshold.to(w.dtype)


def _unperturb(x: Tensor, d: Tensor, threshold: Tensor | None, cd: torch.dtype) -> Tensor:
    """Return w with ``round(w + d * mask(w)) == x``: the unperturbed reading of ``x``.

    ``x`` is in the parameter dtype, ``d`` the full offset in ``cd``. Rounding moved
    ``w + d`` by at most one ulp of the result, so w is ``round(x - d)`` (almost always) or one
    of its neighbours. For SparseMeZO an element that is not consistent as "perturbed" and
    has ``|x| > threshold`` is read as "not perturbed", i.e. ``x`` itself. The rule is
    deterministic; elements it reads wrongly are caught by the caller's fix list.
    """
    dtype = x.dtype
    w = _round_to(x.to(cd) - d, dtype)
    ok = _round_to(w.to(cd) + d, dtype) == x
    if threshold is not None:
        ok &= _within(w, threshold)
        outside = ~ok & ~_within(x, threshold)
        w = torch.where(outside, x, w)
        ok |= outside
    if bool(ok.all()):
        return w
    # the rare rest: try the two neighbours of round(x - d)
    idx = (~ok).nonzero().view(-1)
    xs, ds, c0 = x[idx], d[idx], w[idx]
    inf = torch.tensor(float("inf"), dtype=dtype, device=x.device)
    best = xs if threshold is not None else c0
    for cand in (torch.nextafter(c0, inf), torch.nextafter(c0, -inf)):
        good = _round_to(cand.to(cd) + ds, dtype) == xs
        if threshold is not None:
            good &= _within(cand, threshold)
        best = torch.where(good, cand, best)
    w[idx] = best
    return w


def _offset(w: Tensor, z: Tensor, scale: float, threshold: Tensor | None, cd: torch.dtype) -> Tensor:
    d = z.to(cd) * scale
    if threshold is not None:
        d = torch.where(_within(w, threshold), d, torch.zeros((), dtype=cd))
    return d


def _check_param(p: Tensor) -> None:
    if not p.is_floating_point():
        raise ValueError(f"zeroth-order perturbation needs floating-point parameters, got {p.dtype}")
    if not p.is_contiguous():
        raise ValueError(f"parameter of shape {tuple(p.shape)} is not contiguous; call .contiguous() on it first")


@torch.no_grad()
def _move_(
    params: Sequence[Tensor],
    seed: int,
    from_scale: float,
    to_scale: float,
    thresholds: Sequence[Tensor | None] | None,
    fixes_in: Fixes | None,
    record: bool,
    chunk_size: int,
) -> Fixes:
    """Move every parameter from offset ``from_scale * z`` to ``to_scale * z`` in place.

    Returns the fix list for the *new* offset when ``record`` is set (elements whose
    unperturbed value could not be read back from the new weights).
    """
    fixes_out: Fixes = {}
    for i, p in enumerate(params):
        _check_param(p)
        thr = thresholds[i] if thresholds is not None else None
        cd = _compute_dtype(p.dtype)
        for start, x, z in _shard_chunks(p, seed, i, chunk_size):
            zc = z.to(cd)
            if from_scale == 0.0:
                w = x.clone()
            else:
                w = _unperturb(x, zc * from_scale, thr, cd)
                fix = None if fixes_in is None else fixes_in.get((i, start))
                if fix is not None:
                    w[fix[0].long()] = fix[1]
            if to_scale == 0.0:
                x.copy_(w)
                continue
            d = _offset(w, zc, to_scale, thr, cd)
            y = _round_to(w.to(cd) + d, p.dtype)
            if record:
                back = _unperturb(y, zc * to_scale, thr, cd)
                bad = back != w  # (NaN != NaN: a NaN weight is always kept in the fix list)
                if bool(bad.any()):
                    idx = bad.nonzero().view(-1)
                    # int32 chunk-local indices: the fix list is the only per-element record
                    fixes_out[(i, start)] = (idx.to(torch.int32), w[idx].clone())
            x.copy_(y)
    return fixes_out


def perturb_(
    params: Sequence[Tensor],
    seed: int,
    scale: float,
    *,
    thresholds: Sequence[Tensor | None] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> None:
    """``p += scale * z(seed)`` in place for every parameter, in fp32 arithmetic (fp64 for fp64 weights).

    ``z`` is regenerated from ``seed`` chunk by chunk (never stored); with ``thresholds``, only
    elements with ``|p| <= threshold`` move (the mask is recomputed per chunk). A single call
    rounds once to the parameter dtype; use :func:`spsa_grad` for the exactly restoring
    +eps / -eps / 0 walk.
    """
    if not params:
        return
    _move_(params, seed, 0.0, scale, thresholds, None, False, chunk_size)


@torch.no_grad()
def spsa_grad(
    closure: Callable[[], Tensor | float],
    params: Sequence[Tensor],
    seed: int,
    eps: float,
    *,
    thresholds: Sequence[Tensor | None] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[float, float]:
    """Two-point SPSA along z(seed): ``((f(w + eps z) - f(w - eps z)) / (2 eps), f(w + eps z))``.

    The parameters are moved in place to ``w + eps z``, then ``w - eps z``, then back to the
    bit-identical ``w`` (see the module docstring). ``closure`` is called twice under
    ``torch.no_grad()`` and must not call backward.
    """
    if not eps > 0.0:
        raise ValueError(f"eps={eps!r} must be > 0")
    fixes = _move_(params, seed, 0.0, eps, thresholds, None, True, chunk_size)
    loss_pos = float(closure())
    fixes = _move_(params, seed, eps, -eps, thresholds, fixes, True, chunk_size)
    loss_neg = float(closure())
    _move_(params, seed, -eps, 0.0, thresholds, fixes, False, chunk_size)
    return (loss_pos - loss_neg) / (2.0 * eps), loss_pos


@torch.no_grad()
def zo_update_(
    params: Sequence[Tensor],
    seeds: Sequence[int],
    projected_grads: Sequence[float],
    *,
    lr: float,
    weight_decays: Sequence[float],
    thresholds: Sequence[Tensor | None] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> None:
    """MeZO update by seed replay: ``w -= lr * (mean_k g_k z_k + wd * w)`` on the masked elements.

    ``projected_grads[k]`` is the SPSA estimate along ``z(seeds[k])``; ``weight_decays[i]`` is
    tensor ``i``'s decay (the optimizers pass 0 for biases and norms). Arithmetic is in the
    wide dtype, rounded once when written back.
    """
    n = len(seeds)
    if n == 0 or n != len(projected_grads):
        raise ValueError(f"need one projected gradient per seed, got {len(projected_grads)} for {n} seeds")
    for i, p in enumerate(params):
        _check_param(p)
        thr = thresholds[i] if thresholds is not None else None
        cd = _compute_dtype(p.dtype)
        streams = [_shard_chunks(p, s, i, chunk_size) for s in seeds]
        for chunks in zip(*streams):
            x = chunks[0][1]
            w = x.to(cd)
            direction = torch.zeros_like(w)
            for (_, _, z), g in zip(chunks, projected_grads):
                direction.add_(z.to(cd), alpha=g / n)
            if weight_decays[i] != 0.0:
                direction.add_(w, alpha=weight_decays[i])
            if thr is not None:
                direction = torch.where(_within(x, thr), direction, torch.zeros((), dtype=cd))
            x.copy_(w.sub_(direction, alpha=lr))


@contextmanager
def _eval_mode(model: nn.Module | None):
    """Dropout off for the two evaluations (MeZO evaluates in eval mode), modes restored after."""
    if model is None:
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class MeZO(Optimizer):
    """Memory-efficient zeroth-order SGD (MeZO): SPSA gradient estimates from two forward passes.

    Algorithm: Malladi et al., *Fine-Tuning Language Models with Just Forward Passes*
    (NeurIPS 2023), Alg. 1. Per step and per perturbation k, draw a seed s_k, move the weights
    in place to ``w + eps z_k`` and ``w - eps z_k`` (z_k ~ N(0, I) regenerated from s_k, never
    stored), evaluate the loss at both, restore ``w`` exactly and set
    ``g_k = (L+ - L-) / (2 eps)``; then, replaying the seeds,
    ``w -= lr * (mean_k g_k z_k + wd * w)``. Weight decay is skipped for 1-D tensors
    (biases and norm weights).

    Memory per parameter: **zero** bytes of optimizer state (no moments, no ``.grad``); the
    step's peak is that of one inference-mode forward plus a few ``chunk_size`` temporaries
    and a small fix list for exact restore. State is the seed generator, the step count and
    the last step's seeds and projected gradients, all tensors.

    ``step(closure)`` requires a closure that returns the loss and never calls backward (a
    trainer reads ``spec.zeroth_order``). Pass ``model=`` so dropout is off during the
    two evaluations; otherwise the closure's own mode applies. Perturbation arithmetic is in
    fp32 whatever the parameter dtype, and the +eps / -eps / 0 walk is
    bit-exact (module docstring). All ranks that build the optimizer with the same ``seed``
    draw the same perturbations; the closure must return the same (e.g. all-reduced) loss on
    every rank for data parallel training.
    """

    # no backward: the engine calls step(closure); no per-parameter state to shard
    # the noise is drawn by global element index, so each FSDP2 rank perturbs its own dim-0 shard
    spec = OptimizerSpec(zeroth_order=True, sharding="none", dtensor_params=True)

    def __init__(
        self,
        params,
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        n_perturbations: int = 1,
        seed: int = 0,
        model: nn.Module | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ):
        if not lr >= 0.0:
            raise ValueError(f"lr={lr!r} must be >= 0")
        if not eps > 0.0:
            raise ValueError(f"eps={eps!r} must be > 0 (MeZO uses 1e-3)")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay={weight_decay!r} must be >= 0")
        if not isinstance(n_perturbations, int) or n_perturbations < 1:
            raise ValueError(f"n_perturbations={n_perturbations!r} must be an integer >= 1")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size!r} must be an integer >= 1")
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay))
        check_params_supported(self)
        self.n_perturbations = n_perturbations
        self.chunk_size = chunk_size
        self.model = model
        self._seed_gen = torch.Generator().manual_seed(int(seed))
        self._zo_step = torch.tensor(0, dtype=torch.int64)
        self.nonfinite_refused = 0  # steps whose projected gradient was NaN/Inf (not applied)
        self._last_seeds = torch.zeros(0, dtype=torch.int64)
        self._last_grads = torch.zeros(0, dtype=torch.float64)

    # ------------------------------------------------------------------ hooks for SparseMeZO
    def _thresholds(self, params: list[Tensor]) -> list[Tensor | None] | None:
        return None

    # ------------------------------------------------------------------ step
    def _params(self) -> tuple[list[Tensor], list[float]]:
        params, decays, eps = [], [], set()
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    params.append(p)
                    decays.append(group["weight_decay"] if p.dim() >= 2 else 0.0)
            eps.add(group["eps"])
        if len(eps) > 1:
            raise ValueError(f"all param groups must share one eps (the perturbation is global), got {sorted(eps)}")
        return params, decays

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor | float] | None = None):  # type: ignore[override]
        if closure is None:
            raise ValueError(
                f"{type(self).__name__}.step needs a closure returning the loss (no backward): "
                "optimizer.step(lambda: model(**batch).loss)"
            )
        params, decays = self._params()
        eps = self.param_groups[0]["eps"]
        thresholds = self._thresholds(params)
        seeds = torch.randint(0, 1 << 62, (self.n_perturbations,), generator=self._seed_gen)
        grads = torch.zeros(self.n_perturbations, dtype=torch.float64)
        first_loss = None

        def evaluate():
            loss = closure()
            if isinstance(loss, Tensor) and loss.requires_grad:
                raise ValueError(
                    "the MeZO closure returned a loss that requires grad; compute it under torch.no_grad()")
            return loss

        with _eval_mode(self.model):
            for k in range(self.n_perturbations):
                grads[k], loss = spsa_grad(evaluate, params, int(seeds[k]), eps, thresholds=thresholds,
                                           chunk_size=self.chunk_size)
                first_loss = loss if first_loss is None else first_loss
        if not bool(torch.isfinite(grads).all()):
            # A NaN/Inf loss gives a NaN projected gradient: the perturbations were already undone
            # bit-exactly, so refusing the update leaves the weights exactly as they were.
            self.nonfinite_refused += 1
            return torch.tensor(first_loss)
        # one update per param group so per-group lr / weight decay apply
        offset = 0
        for group in self.param_groups:
            n = sum(1 for p in group["params"] if p.requires_grad)
            gp = params[offset:offset + n]
            if gp:
                zo_update_(gp, [int(s) for s in seeds], grads.tolist(), lr=group["lr"],
                           weight_decays=decays[offset:offset + n],
                           thresholds=None if thresholds is None else thresholds[offset:offset + n],
                           chunk_size=self.chunk_size)
            offset += n
        self._zo_step += 1
        self._last_seeds, self._last_grads = seeds, grads
        return torch.tensor(first_loss)

    # ------------------------------------------------------------------ state
    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: MeZO never allocates gradients (kept so trainer loops can call it)."""

    def state_dict(self):
        sd = mark(super().state_dict(), self)
        sd["zo"] = {
            "generator": self._seed_gen.get_state(),
            "step": self._zo_step.clone(),
            "seeds": self._last_seeds.clone(),
            "projected_grads": self._last_grads.clone(),
        }
        return sd

    def load_state_dict(self, state_dict) -> None:
        check_state_dict(self, state_dict)
        state_dict = dict(state_dict)
        state_dict.pop(FORMAT_KEY, None)
        zo = state_dict.pop("zo", None)
        if zo is None:
            raise ValueError(f"state_dict has no 'zo' entry; it was not saved by {type(self).__name__}")
        super().load_state_dict(state_dict)
        self._seed_gen.set_state(zo["generator"])
        self._zo_step = zo["step"].clone()
        self._last_seeds = zo["seeds"].clone()
        self._last_grads = zo["projected_grads"].clone()


class SparseMeZO(MeZO):
    """MeZO that perturbs and updates only the small-magnitude weights of each tensor.

    Algorithm: Liu et al., *Sparse MeZO* (2024): the SPSA estimate and the update are
    restricted to ``|w| <= t``, where ``t`` is the per-tensor ``(1 - sparsity)`` quantile of
    ``|w|``. ``sparsity`` is the fraction of each tensor left untouched: ``sparsity=0.75``
    perturbs and updates the 25% smallest-magnitude weights.

    Threshold schedule: ``mask_interval=None`` (default) fixes ``t`` at the first step;
    ``mask_interval=k`` recomputes it every ``k`` steps from the current weights. The mask
    itself is never stored: each chunk recomputes ``|w| <= t`` from the exactly
    reconstructed unperturbed weights. Memory per parameter: zero, plus one fp32 scalar
    threshold per tensor (in ``state[p]["threshold"]``); the exact quantile is found by a
    chunked bisection (no ``|w|`` copy), at the cost of up to 32 passes over an fp32 tensor
    per refresh.
    """

    # the per-tensor magnitude threshold is computed from the whole tensor (not from shards yet)
    spec = OptimizerSpec(zeroth_order=True, sharding="none")

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, weight_decay: float = 0.0, *,
                 sparsity: float = 0.75, mask_interval: int | None = None, **kwargs):
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity={sparsity!r} must lie in [0, 1): the fraction of each tensor left untouched")
        if mask_interval is not None and (not isinstance(mask_interval, int) or mask_interval < 1):
            raise ValueError(f"mask_interval={mask_interval!r} must be None (fixed threshold) or an integer >= 1")
        super().__init__(params, lr, eps, weight_decay, **kwargs)
        self.sparsity = sparsity
        self.mask_interval = mask_interval

    def _thresholds(self, params: list[Tensor]) -> list[Tensor | None]:
        step = int(self._zo_step)
        refresh = self.mask_interval is not None and step % self.mask_interval == 0
        stale = [p for p in params if refresh or "threshold" not in self.state[p]]
        for p, t in zip(stale, magnitude_thresholds(stale, self.sparsity, self.chunk_size)):
            self.state[p]["threshold"] = t
        return [self.state[p]["threshold"] for p in params]


def zo_param_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict]:
    """Trainable parameters of ``model`` (tied weights once) in one group with ``weight_decay``.

    The optimizers already skip decay for 1-D tensors (biases, norms).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (all requires_grad=False)")
    return [{"params": params, "weight_decay": weight_decay}]


__all__ = [
    "MeZO",
    "SparseMeZO",
    "perturb_",
    "spsa_grad",
    "zo_update_",
    "noise_like",
    "magnitude_thresholds",
    "zo_param_groups",
]
