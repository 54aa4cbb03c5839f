"""Q-GaLore: GaLore with INT8 weights, INT4 projectors, 8-bit moments and adaptive refresh.

Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank
Gradients", 2024 (arXiv:2407.08296); GaLore: Zhao et al., ICML 2024.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..kernels import PackedInt4
from . import projector as proj
from .adamw8bit import SKIPPED, has_8bit_moments, init_8bit_moments, load_8bit_moments
from .galore_adamw8bit import GaLoreAdamW8bit
from .spec import OptimizerSpec

# Attributes a quantized weight (an int8 nn.Parameter) carries: its group scales (the module's
# buffer, so they travel in model.state_dict()), its group size, and the fp32 gradient that
# backward leaves for the optimizer (int8 tensors cannot hold a .grad).
SCALES_ATTR, GROUP_ATTR, GRAD_ATTR = "quant_scales", "quant_group_size", "float_grad"
# A layer-wise optimizer's hook for an INT8 weight: called by backward right after it
# accumulated ``float_grad`` (what a post-accumulate-grad hook is for a ``requires_grad`` tensor).
HOOK_ATTR = "float_grad_hook"
# Elements of an INT8 weight updated at a time (dequantize, subtract the back-projected update,
# re-quantize): the fp32 transients are then a few MiB instead of three copies of the matrix
# (0.5 GiB for Llama-7B's 11008 x 4096). 1M = one call of the compiled rounding twin.
INT8_UPDATE_CHUNK = 1 << 20


class _QuantLinearFn(torch.autograd.Function):
    """y = x W^T + b with W dequantized on the fly; dL/dW goes to ``weight.float_grad``."""

    @staticmethod
    def forward(ctx, x, codes, scales, bias, group_size):
        weight = kernels.dequantize_int8(codes, scales, group_size).to(x.dtype)
        ctx.save_for_backward(x, scales)
        ctx.codes, ctx.group_size, ctx.has_bias = codes, group_size, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, scales = ctx.saved_tensors
        codes = ctx.codes
        weight = kernels.dequantize_int8(codes, scales, ctx.group_size).to(grad_out.dtype)
        grad_x = grad_out @ weight
        del weight  # the dequantized copy is not needed for dL/dW (nor by the update the hook may run)
        go = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, out)
        grad_w = (go.T @ x.reshape(-1, x.shape[-1])).float()  # (out, in)
        previous = getattr(codes, GRAD_ATTR, None)
        setattr(codes, GRAD_ATTR, grad_w if previous is None else previous.add_(grad_w))
        grad_b = go.sum(0) if ctx.has_bias else None
        hook = getattr(codes, HOOK_ATTR, None)
        if hook is not None:  # layer-wise: update this weight now and free its gradient
            hook(codes)
        return grad_x, None, None, grad_b, None


def quantize_rtn(weight: Tensor, group_size: int = 256) -> tuple[Tensor, Tensor]:
    """Dense ``weight`` -> (INT8 codes shaped like it, fp32 scale per ``group_size`` values),
    symmetric, round to nearest: how a weight enters INT8 storage (training updates then
    re-quantize stochastically)."""
    w = weight.float()
    groups = kernels.group_view(w, group_size)
    scales = groups.abs().amax(1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(groups / safe[:, None]).clamp(-127, 127).to(torch.int8).reshape(-1)[: w.numel()]
    return codes.view(w.shape), scales


class QuantLinear(nn.Module):
    """``nn.Linear`` whose weight is stored as INT8 codes with one fp32 scale per group.

    Memory: 1 byte per weight plus ``4 / group_size`` bytes of scale (1.016 at 256). The
    forward pass dequantizes the weight (a transient copy in the activation dtype); backward
    leaves the fp32 weight gradient in ``weight.float_grad`` for :class:`QGaLoreAdamW8bit`.
    """

    def __init__(self, linear: nn.Linear, group_size: int = 256):
        super().__init__()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        codes, scales = quantize_rtn(linear.weight.detach(), group_size)
        self.weight = nn.Parameter(codes.to(linear.weight.device), requires_grad=False)
        self.register_buffer("weight_scales", scales.to(linear.weight.device))
        self.bias = linear.bias
        self._tag()

    @classmethod
    def from_codes(cls, codes: Tensor, scales: Tensor, bias: nn.Parameter | None, group_size: int) -> "QuantLinear":
        """A QuantLinear around INT8 ``codes`` (out, in) and their group ``scales`` (no dense copy)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.out_features, self.in_features = codes.shape
        self.group_size = group_size
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.register_buffer("weight_scales", scales)
        self.bias = bias
        self._tag()
        return self

    def _tag(self) -> None:
        setattr(self.weight, SCALES_ATTR, self.weight_scales)
        setattr(self.weight, GROUP_ATTR, self.group_size)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._tag()  # load copies into the same tensors; keep the tags even if they were replaced

    def forward(self, x: Tensor) -> Tensor:
        return _QuantLinearFn.apply(x, self.weight, self.weight_scales, self.bias, self.group_size)

    def dequantized_weight(self) -> Tensor:
        return kernels.dequantize_int8(self.weight, self.weight_scales, self.group_size)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, group_size={self.group_size}"


def quantize_weights(model: nn.Module, bits: int = 8, group_size: int = 256,
                     exclude: Iterable[str] = ("lm_head",)) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a :class:`QuantLinear`.

    Modules whose name ends with an entry of ``exclude`` (the output head by default, as in
    Q-GaLore) stay in full precision. Returns the names of the replaced modules.
    """
    if bits != 8:
        raise ValueError(f"bits={bits!r}: only INT8 weight storage is implemented")
    if group_size < 2 or group_size & (group_size - 1):
        raise ValueError(f"group_size={group_size!r} must be a power of two >= 2 (e.g. 256)")
    exclude = tuple(exclude)
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not any(full == e or full.endswith("." + e) for e in exclude):
                setattr(module, child_name, QuantLinear(child, group_size))
                replaced.append(full)
    if not replaced:
        raise ValueError("quantize_weights found no nn.Linear to quantize")
    return replaced


def qgalore_param_groups(model: nn.Module, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25,
                         proj_type: str = "std", **galore_kwargs) -> list[dict]:
    """``[regular_group, galore_group]``: INT8 weights of :class:`QuantLinear` modules are
    projected; every other trainable parameter is a plain (8-bit AdamW) tensor."""
    quant = [m.weight for m in model.modules() if isinstance(m, QuantLinear)]
    if not quant:
        raise ValueError("the model has no QuantLinear; call slimtrain.optim.quantize_weights(model) first")
    ids = {id(p) for p in quant}
    regular = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    galore = dict(params=quant, rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                  **galore_kwargs)
    return [dict(params=regular), galore] if regular else [galore]


def _grad_of(p: Tensor) -> Tensor | None:
    return p.grad if p.grad is not None else getattr(p, GRAD_ATTR, None)


class _AttrHook:
    """Removable handle of a hook stored on an INT8 weight (see ``HOOK_ATTR``)."""

    def __init__(self, p: Tensor):
        self.p = p

    def remove(self) -> None:
        if hasattr(self.p, HOOK_ATTR):
            delattr(self.p, HOOK_ATTR)


class QGaLoreAdamW8bit(GaLoreAdamW8bit):
    """GaLoreAdamW8bit for INT8 weights, with INT4 projectors and adaptive projector refresh.

    Algorithm: Q-GaLore (Zhang et al., 2024). Weights made by :func:`quantize_weights` are
    INT8 with fp32 group scales; each step dequantizes one weight, applies the GaLore update
    (8-bit low-rank Adam moments, :class:`GaLoreAdamW8bit`) and re-quantizes it with
    stochastic rounding (unbiased, so updates smaller than a quantization step still count in
    expectation; the random stream is seeded by ``proj_seed``, tensor and step, identical on
    every rank). Projectors are stored as packed INT4 (two codes per byte, asymmetric scales
    per ``proj_group_size`` values).

    Adaptive refresh: after every SVD the leading singular vector is compared with the
    previous one as ``|cos|`` (a singular vector's sign is arbitrary); the last ``queue_size``
    similarities are kept, and when their mean reaches ``cos_threshold`` the tensor's gap
    doubles (``gap_growth``) up to ``max_proj_gap`` (default 16 x ``update_proj_gap``).
    :meth:`svd_count` reports the SVDs done.

    Memory per (m, n) quantized matrix, m >= n, rank r: weight ``m n (1 + 4/g)`` bytes,
    moments ``2 m r (1 + 4/256)``, projector ``r n (1/2 + 8/proj_group_size)``; plus one
    transient fp32 piece of the weight being updated: ``int8_update_chunk`` elements (whole
    rows and quantization groups; default 1M) are dequantized, updated with their rows of the
    back-projected update and re-quantized at a time, bit-identical to updating the whole matrix
    at once (``int8_update_chunk=None``; same group scales, same per-element random stream).
    Other tensors: AdamW8bit.

    Data parallel: the fp32 gradients of the INT8 weights are not ``.grad`` of a
    ``requires_grad`` parameter, so DDP does not see them; :meth:`external_grads` lists them and
    the engine averages them (slimtrain's :class:`~slimtrain.parallel.DataParallelOptimizer`
    does; with your own DDP, average them yourself before :meth:`step`). The optimizer itself
    never communicates. State is not sharded (stage 0 only).

    Layer-wise mode (``layerwise=True``): every tensor is updated inside backward and its
    gradient freed there -- INT8 weights from :class:`QuantLinear`'s backward (which calls the
    hook it finds on the weight), the others from their post-accumulate-grad hooks -- so the
    model's whole gradient never exists. ``stochastic_rounding=True`` also rounds the bf16
    tensors (embeddings, head, norms) stochastically (INT8 weights always are).
    """

    REPLICATED_STATE = ("proj_", "step", "next_refresh", "sim_")

    @classmethod
    def spec_for(cls, layerwise: bool = False) -> OptimizerSpec:
        return OptimizerSpec(layerwise_capable=True, layerwise=bool(layerwise), whole_matrices=True, sharding="none",
                             rewrites_model=True, external_grads=True, replicated_state=cls.REPLICATED_STATE)

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        min_8bit_size: int = 4096,
        *,
        cos_threshold: float = 0.4,
        queue_size: int = 5,
        gap_growth: int = 2,
        max_proj_gap: int | None = None,
        proj_group_size: int = 128,
        block_size: int = kernels.DEFAULT_BLOCK,
        backend: str | None = None,
        layerwise: bool = False,
        accumulation_steps: int = 1,
        stochastic_rounding: bool = False,
        int8_update_chunk: int | None = INT8_UPDATE_CHUNK,
    ):
        if int8_update_chunk is not None and (not isinstance(int8_update_chunk, int) or int8_update_chunk < 1):
            raise ValueError(f"int8_update_chunk={int8_update_chunk!r} must be a positive integer (elements) or None")
        self.int8_update_chunk = int8_update_chunk
        if not 0.0 <= cos_threshold <= 1.0:
            raise ValueError(f"cos_threshold={cos_threshold!r} must lie in [0, 1]")
        if not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size={queue_size!r} must be a positive integer")
        if not isinstance(gap_growth, int) or gap_growth < 1:
            raise ValueError(f"gap_growth={gap_growth!r} must be an integer >= 1")
        if max_proj_gap is not None and (not isinstance(max_proj_gap, int) or max_proj_gap < 1):
            raise ValueError(f"max_proj_gap={max_proj_gap!r} must be a positive integer or None")
        if proj_group_size < 2 or proj_group_size & (proj_group_size - 1):
            raise ValueError(f"proj_group_size={proj_group_size!r} must be a power of two >= 2")
        self._qgalore = dict(cos_threshold=cos_threshold, queue_size=queue_size, gap_growth=gap_growth,
                             max_proj_gap=max_proj_gap, proj_group_size=proj_group_size)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                         min_8bit_size=min_8bit_size, block_size=block_size, backend=backend, layerwise=layerwise,
                         accumulation_steps=accumulation_steps, stochastic_rounding=stochastic_rounding)

    # ------------------------------------------------------------------ layer-wise hooks
    def _grad(self, p: Tensor) -> Tensor | None:
        return getattr(p, GRAD_ATTR, None) if p.dtype == torch.int8 else p.grad

    def _set_grad(self, p: Tensor, value: Tensor | None) -> None:
        if p.dtype == torch.int8:
            setattr(p, GRAD_ATTR, value)
        else:
            p.grad = value

    def _register_layerwise_hooks(self, params=None) -> None:
        params = params if params is not None else [p for g in self.param_groups for p in g["params"]]
        dense = [p for p in params if p.dtype != torch.int8]
        super()._register_layerwise_hooks(dense)
        for p in params:
            if p.dtype == torch.int8:
                setattr(p, HOOK_ATTR, self._layerwise_hook)
                self._hooks.append(_AttrHook(p))

    def add_param_group(self, param_group: dict) -> None:
        if "rank" in param_group:
            for key, value in self._qgalore.items():
                param_group.setdefault(key, value)
        # INT8 weights are leaves that do not require grad; torch.optim accepts them as params.
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ INT4 projectors
    def _projectors(self, state: dict, group: dict) -> tuple[Tensor | None, Tensor | None]:
        if "rank" not in group:
            return None, None
        out = []
        for key in ("proj_left", "proj_right"):
            packed = PackedInt4.load(state, key, group["proj_group_size"])
            out.append(None if packed is None else packed.unpack(backend=self._aux_backend()))
        return out[0], out[1]

    def _aux_backend(self) -> str | None:
        # INT4 / INT8 kernels follow the optimizer's backend; "compile" and "cpp" exist only for
        # the Adam step, so those take the default.
        return None if self.backend in ("compile", "cpp") else self.backend

    def _needs_refresh(self, state: dict, group: dict) -> bool:
        return "step" not in state or int(state["step"]) >= int(state["next_refresh"])

    def to_optimizer_space(self, p: Tensor, grad: Tensor, group: dict) -> Tensor:
        if "rank" not in group:
            return grad
        self._check_shape(p, group)
        state = self.state[p]
        if "next_refresh" not in state or self._needs_refresh(state, group):
            self.refresh_projector(p, grad, group)
        left, right = self._projectors(state, group)
        return proj.project(grad, left, right)

    def refresh_projector(self, p: Tensor, full_grad: Tensor, group: dict) -> None:
        state = self.state[p]
        previous = self._projectors(state, group)
        for key, value in zip(("proj_left", "proj_right"), previous):
            if value is not None:
                state[key] = value  # lets the base keep it if the new SVD fails
        svds_before = int(state.get("proj_refreshes", 0))
        super().refresh_projector(p, full_grad, group)
        new = (state.pop("proj_left", None), state.pop("proj_right", None))
        for key, value in zip(("proj_left", "proj_right"), new):
            if value is not None:
                PackedInt4.pack(value, group["proj_group_size"], backend=self._aux_backend()).store(state, key)
        step = int(state["step"]) if "step" in state else 0
        if "proj_gap" not in state:
            state["proj_gap"] = torch.tensor(group["update_proj_gap"], dtype=torch.int64)
            state["sim_queue"] = torch.zeros(group["queue_size"], dtype=torch.float32)
            state["sim_count"] = torch.tensor(0, dtype=torch.int64)
        did_svd = int(state.get("proj_refreshes", 0)) > svds_before
        if did_svd and any(v is not None for v in previous):
            self._record_similarity(state, group, previous, new)
        state["next_refresh"] = torch.tensor(step + int(state["proj_gap"]), dtype=torch.int64)

    @staticmethod
    def _leading(left: Tensor | None, right: Tensor | None) -> Tensor:
        # Leading singular vector: first column of the left projector or first row of the right.
        return left[:, 0] if left is not None else right[0, :]

    def _record_similarity(self, state, group, previous, new) -> None:
        a, b = self._leading(*previous).float(), self._leading(*new).float()
        cos = (a @ b).abs() / (a.norm() * b.norm()).clamp_min(1e-12)  # |cos|: sign-flip invariant
        queue = state["sim_queue"]
        queue.copy_(torch.roll(queue, 1))
        queue[0] = cos
        state["sim_count"] += 1
        k = queue.numel()
        if int(state["sim_count"]) >= k and float(queue.mean()) >= group["cos_threshold"]:
            cap = group["max_proj_gap"] or 16 * group["update_proj_gap"]
            state["proj_gap"].fill_(min(int(state["proj_gap"]) * group["gap_growth"], cap))

    # ------------------------------------------------------------------ INT8 weights
    def _update(self, p: Tensor, low_grad: Tensor, state: dict, group: dict) -> None:
        if p.dtype != torch.int8:
            super()._update(p, low_grad, state, group)
            return
        scales, gs = getattr(p, SCALES_ATTR), getattr(p, GROUP_ATTR)
        rows = self._chunk_rows(p, gs)
        left, right = self._projectors(state, group) if rows < p.shape[0] else (None, None)
        if left is not None or right is not None:
            # the same moment-initialisation rule as GaLoreAdamW8bit._update; small low-rank
            # gradients keep fp32 moments and take the whole-matrix path below
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
            if not has_8bit_moments(state) and "exp_avg" not in state and low_grad.numel() >= group["min_8bit_size"]:
                init_8bit_moments(state, low_grad, group["block_size"])
            if has_8bit_moments(state):
                self._update_int8_by_rows(p, low_grad, state, group, left, right, rows)
                return
        weight = kernels.dequantize_int8(p, scales, gs)  # transient fp32 copy of this one weight
        super()._update(weight, low_grad, state, group)
        codes, new_scales = kernels.quantize_int8_sr(weight, gs, self._int8_seed(p, state, group),
                                                     backend=self._aux_backend())
        p.copy_(codes)
        scales.copy_(new_scales)

    def _int8_seed(self, p: Tensor, state: dict, group: dict) -> int:
        """Seed of the stochastic rounding of ``p`` at the step just taken (``state['step']``)."""
        return proj.projector_seed(group["proj_seed"] + 1, self._param_index(p), int(state["step"])) & 0x7FFFFFFF

    def _chunk_rows(self, p: Tensor, group_size: int) -> int:
        """Rows of ``p`` per piece of the INT8 update: about ``int8_update_chunk`` elements, and a
        multiple of the rows that hold whole quantization groups (so every piece but the last
        starts on a group boundary and the pieces' scales are the whole matrix's)."""
        if self.int8_update_chunk is None or p.dim() != 2:
            return p.shape[0]  # one piece: the whole matrix
        cols = p.shape[1]
        align = group_size // math.gcd(cols, group_size)  # rows * cols % group_size == 0
        return max(align, self.int8_update_chunk // max(cols, 1) // align * align)

    def _update_int8_by_rows(self, p: Tensor, low_grad: Tensor, state: dict, group: dict, left: Tensor | None,
                             right: Tensor | None, rows: int) -> None:
        """GaLoreAdamW8bit's step on an INT8 matrix, ``rows`` rows at a time.

        What ``galore_adamw8bit`` does on the whole dequantized weight W, split: the 8-bit Adam
        step writes the low-rank direction D (small) once; then for each row block B,
        ``W[B] -= project_back(D)[B]`` (rows of ``left @ D`` are ``left[B] @ D``; with a right
        projector only, they are ``D[B] @ right``), the decoupled decay, and stochastic INT8
        rounding with the element offset of B. Element for element the same arithmetic, so the
        same codes and scales as the unchunked path (tested); only one block is ever fp32.
        """
        scales, gs = getattr(p, SCALES_ATTR), getattr(p, GROUP_ATTR)
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        # the 8-bit moment step of galore_adamw8bit, in its "out" mode (param is not read there)
        state["step"] += 1
        step = float(state["step"])
        bc1 = 1.0 - beta1**step if group["correct_bias"] else 1.0
        sqrt_bc2 = math.sqrt(1.0 - beta2**step) if group["correct_bias"] else 1.0
        grad = low_grad.float().contiguous()
        m, v = load_8bit_moments(state, group["block_size"])
        direction = torch.empty_like(grad, dtype=torch.float32)
        kernels.adamw8bit_update(grad, grad, m.codes, m.absmax, v.codes, v.absmax, state[SKIPPED], decay=1.0,
                                 out=direction, block_size=m.block_size, backend=self.backend, step_size=lr / bc1,
                                 beta1=beta1, beta2=beta2, inv_sqrt_bc2=1.0 / sqrt_bc2, eps=group["eps"] / sqrt_bc2)
        del grad
        seed, cols, backend = self._int8_seed(p, state, group), p.shape[1], self._aux_backend()
        for r0 in range(0, p.shape[0], rows):
            r1 = min(r0 + rows, p.shape[0])
            first, last = r0 * cols, r1 * cols
            block_scales = scales[first // gs:(last + gs - 1) // gs]
            weight = kernels.dequantize_int8(p[r0:r1], block_scales, gs)
            if left is not None:
                update = proj.project_back(direction, left[r0:r1], right, group["scale"])
            else:
                update = proj.project_back(direction[r0:r1], None, right, group["scale"])
            weight.sub_(update.view_as(weight))
            del update
            if wd > 0.0:
                weight.add_(weight, alpha=-lr * wd)
            codes, new_scales = kernels.quantize_int8_sr(weight, gs, seed, start=first, backend=backend)
            p[r0:r1].copy_(codes)
            block_scales.copy_(new_scales)

    # ------------------------------------------------------------------ step
    def external_grads(self) -> list[Tensor]:
        """The gradients kept outside ``.grad`` (the fp32 gradients of the INT8 weights), for a
        data-parallel engine to average before :meth:`step`."""
        return [g for group in self.param_groups for p in group["params"]
                if p.dtype == torch.int8 and (g := getattr(p, GRAD_ATTR, None)) is not None]

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
                grad = _grad_of(p)
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("QGaLoreAdamW8bit does not support sparse gradients")
                self._apply(p, grad, group)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.layerwise:
            return  # the hooks consume (and free) every gradient
        super().zero_grad(set_to_none=set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                if getattr(p, GRAD_ATTR, None) is not None:
                    setattr(p, GRAD_ATTR, None)

    def svd_count(self) -> int:
        """Projector SVDs done so far, over all tensors."""
        return int(sum(int(s.get("proj_refreshes", 0)) for s in self.state.values()))
