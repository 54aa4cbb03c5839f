"""Compression of client deltas for the upload: low-rank, top-k with error feedback, 8-bit,
ternary (ComPEFT: top-k signs times one scale, with error feedback).

A compressor maps a delta (``dict[str, Tensor]``) to a *payload*, a flat ``dict[str, Tensor]``
whose keys are ``"<param name>|<part>"`` (``|`` never occurs in a parameter name); the payload
is what travels, and :meth:`Compressor.nbytes` counts exactly its tensors' bytes. The server
calls :meth:`Compressor.decompress` to get a delta back.

Per-client state (top-k's error-feedback residual) is kept per client id and can be moved to
disk between rounds with :meth:`Compressor.client_state` / :meth:`Compressor.load_client_state`
/ :meth:`Compressor.drop_client_state`, so memory stays O(active clients).

With DP (:mod:`.privacy`) the server clips and noises *after* decompression: the sensitivity
argument is about the decompressed delta that enters the sum, so the guarantee holds whatever
the compressor did (error feedback included: the residual never leaves the client).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import math

import torch
from torch import Tensor

from slimtrain.kernels import dequantize_blockwise, quantize_blockwise
from slimtrain.optim.projector import (
    as_matrix,
    compute_projector,
    effective_rank,
    project,
    project_back,
    projection_side,
    projector_seed,
)

Params = dict[str, Tensor]
SEP = "|"


def _key(name: str, part: str) -> str:
    if SEP in name:
        raise ValueError(f"parameter name {name!r} contains {SEP!r}, which compressed payload keys reserve")
    return f"{name}{SEP}{part}"


def _split(payload: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    out: dict[str, dict[str, Tensor]] = {}
    for key, t in payload.items():
        name, _, part = key.rpartition(SEP)
        out.setdefault(name, {})[part] = t
    return out


class Compressor(ABC):
    """Base class; subclasses implement ``compress`` and ``decompress``. Stateless by default."""

    @abstractmethod
    def compress(self, client_id: int, delta: Params, context: dict | None = None) -> dict[str, Tensor]:
        """The payload a client uploads for ``delta`` (tensors only)."""

    @abstractmethod
    def decompress(self, payload: dict[str, Tensor]) -> Params:
        """The delta the server reconstructs from ``payload``."""

    @staticmethod
    def nbytes(payload: dict[str, Tensor]) -> int:
        """Bytes on the wire: the sum of the payload tensors' element bytes."""
        return sum(t.numel() * t.element_size() for t in payload.values())

    # Per-client state: none for stateless compressors.
    def client_state(self, client_id: int) -> dict[str, Tensor]:
        return {}

    def load_client_state(self, client_id: int, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no per-client state, got keys {sorted(state)[:5]}")

    def drop_client_state(self, client_id: int) -> None:
        return None

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)[:5]}")


class NoCompression(Compressor):
    """The delta itself (fp32): 4 bytes per parameter."""

    def compress(self, client_id: int, delta: Params, context: dict | None = None) -> dict[str, Tensor]:
        return {_key(k, "full"): t.float() for k, t in delta.items()}

    def decompress(self, payload: dict[str, Tensor]) -> Params:
        return {name: parts["full"] for name, parts in _split(payload).items()}


class LowRankCompressor(Compressor):
    """Each matrix delta ``D`` (m, n) (conv weights as (out, in*kh*kw)) is projected onto a rank-r
    subspace, the way GaLore projects gradients (Zhao et al., ICML 2024), and sent as the
    projected (m, r) or (r, n) block plus the projector: ``r (m + n)`` floats instead of ``m n``.
    1-D tensors (norms, biases) are sent whole.

    The projector is the client's own GaLore projector when ``context["projectors"][name] =
    (left, right)`` is given (one of them may be ``None``; no extra computation), else the top-r
    singular subspace of ``D`` from the randomized range finder of
    :func:`slimtrain.optim.projector.randomized_range`, seeded per (seed, tensor, client), which
    is the best rank-r approximation up to the finder's error. Lossless when ``rank(D) <= r``.
    Costs O(m n r) per matrix on the client; no state.
    """

    def __init__(self, rank: int, seed: int = 0, proj_type: str = "std", oversample: int = 8, power_iters: int = 2):
        if rank < 1:
            raise ValueError(f"rank={rank} must be >= 1")
        projection_side((2, 1), proj_type)  # validates proj_type with a clear error
        self.rank, self.seed, self.proj_type = int(rank), int(seed), proj_type
        self.oversample, self.power_iters = int(oversample), int(power_iters)

    def compress(self, client_id: int, delta: Params, context: dict | None = None) -> dict[str, Tensor]:
        given = (context or {}).get("projectors", {})
        payload: dict[str, Tensor] = {}
        for index, name in enumerate(sorted(delta)):
            d = delta[name].float()
            if d.dim() < 2:
                payload[_key(name, "full")] = d
                continue
            matrix = as_matrix(d)
            if name in given:
                left, right = given[name]
                self._check_projector(name, matrix.shape, left, right)
            else:
                side = projection_side(tuple(matrix.shape), self.proj_type)
                rank = effective_rank(self.rank, tuple(matrix.shape), side)
                gen = torch.Generator(device=matrix.device).manual_seed(projector_seed(self.seed, index, client_id))
                found = compute_projector(matrix, rank, side, method="randomized", oversample=self.oversample,
                                          power_iters=self.power_iters, generator=gen)
                if found is None:  # failed decomposition (non-finite delta): send it whole
                    payload[_key(name, "full")] = d
                    continue
                left, right = found
            payload[_key(name, "low")] = project(matrix, left, right).contiguous()
            payload[_key(name, "shape")] = torch.tensor(d.shape, dtype=torch.int64)
            if left is not None:
                payload[_key(name, "left")] = left.float().contiguous()
            if right is not None:
                payload[_key(name, "right")] = right.float().contiguous()
        return payload

    @staticmethod
    def _check_projector(name: str, shape, left, right) -> None:
        m, n = shape
        if left is None and right is None:
            raise ValueError(f"projector for {name!r} has neither a left nor a right matrix")
        if left is not None and (left.dim() != 2 or left.shape[0] != m):
            raise ValueError(f"left projector for {name!r} has shape {tuple(left.shape)}, expected ({m}, r)")
        if right is not None and (right.dim() != 2 or right.shape[1] != n):
            raise ValueError(f"right projector for {name!r} has shape {tuple(right.shape)}, expected (r, {n})")

    def decompress(self, payload: dict[str, Tensor]) -> Params:
        out: Params = {}
        for name, parts in _split(payload).items():
            if "full" in parts:
                out[name] = parts["full"]
                continue
            full = project_back(parts["low"], parts.get("left"), parts.get("right"), 1.0)
            out[name] = full.reshape(torch.Size(parts["shape"].tolist()))
        return out


class TopKCompressor(Compressor):
    """Top-k sparsification with error feedback (Stich, Cordonnier & Jaggi, NeurIPS 2018,
    "Sparsified SGD with Memory"; Karimireddy et al., ICML 2019, "Error Feedback Fixes SignSGD").

    Per tensor, the client sends the ``ceil(fraction * numel)`` largest-magnitude entries of
    ``delta + residual`` (values fp32, indices int32 when they fit) and keeps what it did not
    send as its new residual, so nothing is lost, only delayed: the sum of what was sent over
    rounds equals the sum of the deltas minus the current residual, and the residual stays
    bounded by ``sqrt(1 - k/d) / (1 - sqrt(1 - k/d))`` times the largest delta norm.
    Cost: one fp32 model-sized residual per client (on disk between rounds).
    """

    def __init__(self, fraction: float, error_feedback: bool = True):
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction={fraction} must be in (0, 1] (share of entries sent, e.g. 0.01)")
        self.fraction, self.error_feedback = float(fraction), bool(error_feedback)
        self._residuals: dict[int, Params] = {}

    def compress(self, client_id: int, delta: Params, context: dict | None = None) -> dict[str, Tensor]:
        residual = self._residuals.get(client_id, {})
        new_residual: Params = {}
        payload: dict[str, Tensor] = {}
        for name, d in delta.items():
            acc = (d.float() + residual[name] if name in residual else d.float().clone()).contiguous()
            flat = acc.reshape(-1)
            k = max(1, math.ceil(self.fraction * flat.numel()))
            idx = self._select(flat, k)
            sent = self._encode(name, flat, idx, payload)
            payload[_key(name, "shape")] = torch.tensor(d.shape, dtype=torch.int64)
            if self.error_feedback:
                flat[idx] -= sent  # what the server will not see is kept for the next round
                new_residual[name] = acc
        if self.error_feedback:
            self._residuals[client_id] = new_residual
        return payload

    @staticmethod
    def _select(flat: Tensor, k: int) -> Tensor:
        """Indices of the ``k`` largest-magnitude entries."""
        return torch.topk(flat.abs(), k, sorted=False).indices

    def _encode(self, name: str, flat: Tensor, idx: Tensor, payload: dict[str, Tensor]) -> Tensor:
        """Write entries ``idx`` of ``flat`` into ``payload``; return what the server will
        reconstruct there (error feedback keeps the difference)."""
        idx_dtype = torch.int32 if flat.numel() <= torch.iinfo(torch.int32).max else torch.int64
        payload[_key(name, "values")] = flat[idx].clone()
        payload[_key(name, "indices")] = idx.to(idx_dtype)
        return payload[_key(name, "values")]

    def decompress(self, payload: dict[str, Tensor]) -> Params:
        out: Params = {}
        for name, parts in _split(payload).items():
            shape = torch.Size(parts["shape"].tolist())
            flat = torch.zeros(shape.numel(), dtype=torch.float32, device=parts["values"].device)
            flat[parts["indices"].long()] = parts["values"]
            out[name] = flat.view(shape)
        return out

    def client_state(self, client_id: int) -> dict[str, Tensor]:
        return dict(self._residuals.get(client_id, {}))

    def load_client_state(self, client_id: int, state: dict[str, Tensor]) -> None:
        self._residuals[client_id] = {k: t.float().clone() for k, t in state.items()}

    def drop_client_state(self, client_id: int) -> None:
        self._residuals.pop(client_id, None)

    def state_dict(self) -> dict[str, Tensor]:
        return {_key(str(cid), name): t for cid, res in self._residuals.items() for name, t in res.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self._residuals = {}
        for key, t in state.items():
            cid, _, name = key.partition(SEP)
            self._residuals.setdefault(int(cid), {})[name] = t.float().clone()


class QuantizedCompressor(Compressor):
    """Block-wise dynamic 8-bit quantization (Dettmers et al., ICLR 2022, "8-bit Optimizers via
    Block-wise Quantization") with slimtrain.kernels' quantizer: one uint8 code per entry plus
    one fp32 absmax per ``block_size`` entries, ``1 + 4 / block_size`` bytes per parameter. Each
    entry is rounded to the nearest of 256 map values times its block's absmax, so its error is
    at most half the gap between the two map values around it, times the absmax. No state."""

    def __init__(self, block_size: int = 256):
        if block_size < 2:
            raise ValueError(f"block_size={block_size} must be >= 2 (256 is the kernels' default)")
        self.block_size = int(block_size)

    def compress(self, client_id: int, delta: Params, context: dict | None = None) -> dict[str, Tensor]:
        payload: dict[str, Tensor] = {}
        for name, d in delta.items():
            codes, absmax = quantize_blockwise(d.float().contiguous(), signed=True, block_size=self.block_size)
            payload[_key(name, "codes")] = codes
            payload[_key(name, "absmax")] = absmax
        return payload

    def decompress(self, payload: dict[str, Tensor]) -> Params:
        return {
            name: dequantize_blockwise(parts["codes"], parts["absmax"], signed=True, block_size=self.block_size)
            for name, parts in _split(payload).items()
        }


def _pack_bits(bits: Tensor, width: int) -> Tensor:
    """Little-endian packing of ``width``-bit codes (uint8 values < 2**width) into uint8 bytes."""
    per = 8 // width
    codes = torch.nn.functional.pad(bits.to(torch.uint8), (0, (-bits.numel()) % per)).view(-1, per)
    out = torch.zeros(codes.shape[0], dtype=torch.uint8, device=bits.device)
    for j in range(per):
        out |= codes[:, j] << (j * width)
    return out


def _unpack_bits(packed: Tensor, width: int, count: int) -> Tensor:
    per, mask = 8 // width, (1 << width) - 1
    codes = torch.stack([(packed >> (j * width)) & mask for j in range(per)], dim=1).reshape(-1)
    return codes[:count]


class TernaryCompressor(TopKCompressor):
    """ComPEFT uploads (Yadav et al., "ComPEFT: Compression for Communicating Parameter Efficient
    Updates via Sparsification and Quantization", 2023): per tensor, keep the ``ceil(fraction *
    numel)`` largest-magnitude entries of ``delta + residual`` and send only their signs and one
    fp32 scale, so the server reconstructs ``scale * sign(x_i)`` on the kept support, 0 elsewhere.

    Scale: ``"mean"`` (default) is the mean magnitude of the kept entries, the least-squares
    optimal single scale for those signs (``argmin_s sum (x_i - s sign x_i)^2``), parameter-free;
    ``"std"`` is ComPEFT's ``alpha * std(x)`` over the whole tensor, whose ``alpha`` the paper tunes
    on validation data (a federated upload has none). With ``error_feedback`` (default, as top-k)
    the client keeps ``x - decompressed`` (the unsent entries *and* the kept entries' rounding) as
    its residual, so nothing is lost, only delayed.

    Encoding, per tensor the smaller of: ``dense`` 2-bit codes (0, +, -; four per byte:
    ``ceil(numel / 4)`` bytes) or ``sparse`` int32 indices plus one sign bit per kept entry
    (``4 k + ceil(k / 8)`` bytes); plus the 4-byte scale and the int64 shape, as top-k sends it.
    Sparse wins below ~6% density. (ComPEFT's Golomb-coded positions would be smaller still; not
    done.) Cost: one fp32 model-sized residual per client, as top-k.
    """

    SCALES = ("mean", "std")

    def __init__(self, fraction: float, error_feedback: bool = True, scale: str = "mean", alpha: float = 1.0):
        super().__init__(fraction, error_feedback)
        if scale not in self.SCALES:
            raise ValueError(f"scale={scale!r} is not one of {self.SCALES}")
        if not alpha > 0:
            raise ValueError(f"alpha={alpha!r} must be > 0 (ComPEFT's multiplier of the std, e.g. 1.0)")
        self.scale, self.alpha = scale, float(alpha)

    @staticmethod
    def _select(flat: Tensor, k: int) -> Tensor:
        return torch.topk(flat.abs(), k, sorted=False).indices.sort().values  # sorted: the sparse encoding

    def _encode(self, name: str, flat: Tensor, idx: Tensor, payload: dict[str, Tensor]) -> Tensor:
        d_numel, k = flat.numel(), idx.numel()
        kept = flat[idx]
        if self.scale == "mean":
            scale = kept.abs().mean()
        else:
            scale = self.alpha * (flat.std() if d_numel > 1 else flat.abs()[0])
        negative = kept < 0
        if 4 * k + math.ceil(k / 8) < math.ceil(d_numel / 4):
            idx_dtype = torch.int32 if d_numel <= torch.iinfo(torch.int32).max else torch.int64
            payload[_key(name, "indices")] = idx.to(idx_dtype)
            payload[_key(name, "signs")] = _pack_bits(negative, 1)
        else:
            codes = torch.zeros(d_numel, dtype=torch.uint8, device=flat.device)
            codes[idx] = 1 + negative.to(torch.uint8)  # 1: +scale, 2: -scale
            payload[_key(name, "codes")] = _pack_bits(codes, 2)
        payload[_key(name, "scale")] = scale.reshape(1).float()
        return torch.where(negative, -scale, scale)

    def decompress(self, payload: dict[str, Tensor]) -> Params:
        out: Params = {}
        for name, parts in _split(payload).items():
            shape = torch.Size(parts["shape"].tolist())
            scale = parts["scale"][0]
            if "codes" in parts:
                codes = _unpack_bits(parts["codes"], 2, shape.numel())
                zero = torch.zeros((), device=scale.device)
                flat = torch.where(codes == 1, scale, torch.where(codes == 2, -scale, zero))
            else:
                flat = torch.zeros(shape.numel(), dtype=torch.float32, device=scale.device)
                count = parts["indices"].numel()
                negative = _unpack_bits(parts["signs"], 1, count).bool()
                flat[parts["indices"].long()] = torch.where(negative, -scale, scale)
            out[name] = flat.view(shape)
        return out


COMPRESSORS = {
    "none": lambda **kw: NoCompression(**kw),
    "lowrank": lambda rank=8, **kw: LowRankCompressor(rank, **kw),
    "topk": lambda fraction=0.01, **kw: TopKCompressor(fraction, **kw),
    "int8": lambda **kw: QuantizedCompressor(**kw),
    "ternary": lambda fraction=0.01, **kw: TernaryCompressor(fraction, **kw),
}


def build_compressor(name: str, **kw) -> Compressor:
    """``name`` in :data:`COMPRESSORS`; ``kw`` go to the class (``rank``, ``fraction``, ``block_size``)."""
    if name not in COMPRESSORS:
        raise ValueError(f"compressor={name!r} is not one of {sorted(COMPRESSORS)}")
    return COMPRESSORS[name](**kw)


__all__ = [
    "COMPRESSORS",
    "Compressor",
    "LowRankCompressor",
    "NoCompression",
    "QuantizedCompressor",
    "TernaryCompressor",
    "TopKCompressor",
    "build_compressor",
]
