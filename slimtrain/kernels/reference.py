"""Pure-PyTorch twins of the Triton kernels in :mod:`slimtrain.kernels.triton_kernels`.

Each function computes exactly what its kernel computes, with the same operation order and
fp32 intermediate values, so on CPU the interpreter run of a kernel and its twin agree bit for
bit. They are the CPU backend (eager, or fused by ``torch.compile`` in :mod:`.ops`) and the
oracle of the kernel tests.

Conventions shared with the kernels:

* tensors are processed flat; block ``b`` holds elements ``[b*B, (b+1)*B)``, the last block
  may be short and its padding never influences a scale;
* the random stream of stochastic rounding is a counter-based hash of ``(seed, element
  index)`` (:func:`hash32`), so it needs no generator state and is reproducible on every
  backend and rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------- helpers
def group_view(x: Tensor, group: int, fill: float = 0.0) -> Tensor:
    """Flat ``x`` as ``(n_groups, group)``, the tail padded with ``fill`` (a view when no
    padding is needed): the block / group layout every quantizer here scales by."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % group
    if pad:
        flat = F.pad(flat, (0, pad), value=fill)
    return flat.view(-1, group)


def search_codes(normalized: Tensor, mids: Tensor) -> Tensor:
    """Index of the nearest map value: the count of midpoints strictly below ``normalized``.

    An 8-step branch-free binary search over the 256-entry midpoint table (last entry +inf),
    written with gathers so it is the same algorithm as the Triton kernel and fuses under
    ``torch.compile``.
    """
    idx = torch.zeros_like(normalized, dtype=torch.int64)
    for step in (128, 64, 32, 16, 8, 4, 2, 1):
        cand = mids[idx + (step - 1)]
        idx = torch.where(cand < normalized, idx + step, idx)
    return idx


def search_codes_lut(normalized: Tensor, mids: Tensor, lut: Tensor, refine: int) -> Tensor:
    """Same result as :func:`search_codes`, by table lookup on the top 16 bits of the fp32
    pattern plus ``refine`` compare-and-step gathers (see :func:`slimtrain.kernels.maps.code_lut`).

    Used by the CPU paths: 2 loads per element instead of 8 dependent ones, which is what lets
    the ``torch.compile`` step keep up with memory bandwidth.
    """
    top = (normalized.contiguous().view(torch.int32) >> 16) & 0xFFFF
    idx = lut[top].to(torch.int64)
    for _ in range(refine):
        idx = idx + (mids[idx] < normalized).to(torch.int64)
    return idx


def _mul32(h: Tensor, c: int) -> Tensor:
    # (h * c) mod 2^32 for 0 <= h, c < 2^32 in int64 without overflow: split h into 16-bit halves.
    lo = (h & 0xFFFF) * c
    hi = ((h >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _MASK32


def hash32(seed: int, index: Tensor) -> Tensor:
    """32 random bits per element: murmur3's finaliser of ``index * golden + seed`` (as int64)."""
    h = (_mul32(index.to(torch.int64) & _MASK32, 0x9E3779B1) + (seed & _MASK32)) & _MASK32
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def uniform01(seed: int, index: Tensor) -> Tensor:
    """U[0, 1) in fp32 with 24 random bits (exactly representable)."""
    return (hash32(seed, index) >> 8).to(torch.float32) * (2.0**-24)


# ---------------------------------------------------------------------------- block-wise 8-bit
def quantize_blockwise(x: Tensor, tables: tuple, block: int) -> tuple[Tensor, Tensor]:
    """fp32 ``x`` -> (uint8 codes shaped like ``x``, fp32 absmax per block).

    ``tables`` is ``(values, mids, lut, refine)`` of the map (:mod:`slimtrain.kernels.maps`).
    """
    _, mids, lut, refine = tables
    xb = group_view(x.float(), block)  # (n_blocks, block)
    absmax = xb.abs().amax(dim=1)
    normalized = xb / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    codes = search_codes_lut(normalized, mids, lut, refine).to(torch.uint8)
    return codes.reshape(-1)[: x.numel()].view(x.shape), absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, values: Tensor, block: int) -> Tensor:
    """uint8 codes + absmax -> fp32 tensor shaped like ``codes``."""
    cb = group_view(codes, block)
    out = values[cb.long()] * absmax[:, None]
    return out.reshape(-1)[: codes.numel()].view(codes.shape)


def adamw8bit_step(
    param: Tensor,
    grad: Tensor,
    codes1: Tensor,
    absmax1: Tensor,
    codes2: Tensor,
    absmax2: Tensor,
    tables1: tuple,
    tables2: tuple,
    skipped: Tensor,
    out: Tensor | None,
    *,
    block: int,
    step_size: float,
    beta1: float,
    one_minus_beta1: float,
    beta2: float,
    one_minus_beta2: float,
    inv_sqrt_bc2: float,
    eps: float,
    decay: float,
) -> None:
    """One AdamW step on 8-bit moments, in place (twin of ``_adamw8bit_kernel``).

    Per element with a finite gradient ``g`` (others keep param and moments, and are counted
    in ``skipped``)::

        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
        u = step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps)
        param = param * decay - u        (or, with ``out``: out = u, param untouched)

    then both moments are re-quantized block-wise with fresh absmax. ``param`` may be fp32,
    bf16 or fp16 (the arithmetic is fp32).
    """
    values1, mids1, lut1, refine1 = tables1  # signed map of m
    values2, mids2, lut2, refine2 = tables2  # unsigned map of v
    n = grad.numel()
    g = group_view(grad.float(), block)
    ok = torch.isfinite(g)
    valid = group_view(torch.ones(n, dtype=torch.bool, device=grad.device), block, fill=False)
    m0 = values1[group_view(codes1, block).long()] * absmax1[:, None]
    v0 = values2[group_view(codes2, block).long()] * absmax2[:, None]
    g = torch.where(ok, g, torch.zeros_like(g))
    m = torch.where(ok, beta1 * m0 + one_minus_beta1 * g, m0)
    v = torch.where(ok, beta2 * v0 + one_minus_beta2 * (g * g), v0)
    m = torch.where(valid, m, torch.zeros_like(m))
    v = torch.where(valid, v, torch.zeros_like(v))
    # torch's vectorised fp32 sqrt on CPU is not correctly rounded (1 ulp off for ~20% of
    # inputs); the kernel's sqrt_rn is. An fp64 sqrt rounded once to fp32 is exact.
    u = step_size * (m / (torch.sqrt(v.double()).float() * inv_sqrt_bc2 + eps))
    keep = ok & valid
    if out is None:
        p = group_view(param.float(), block)
        p_new = torch.where(keep, p * decay - u, p)
        param.copy_(p_new.reshape(-1)[:n].view(param.shape))
    else:
        out.copy_(torch.where(keep, u, torch.zeros_like(u)).reshape(-1)[:n].view(out.shape))
    a1 = m.abs().amax(dim=1)
    a2 = v.abs().amax(dim=1)
    # A block whose absmax is 0 is all zeros: divide by 1 so it stays finite (code of 0).
    c1 = search_codes_lut(m / torch.where(a1 > 0, a1, torch.ones_like(a1))[:, None], mids1, lut1, refine1)
    c2 = search_codes_lut(v / torch.where(a2 > 0, a2, torch.ones_like(a2))[:, None], mids2, lut2, refine2)
    codes1.copy_(c1.to(torch.uint8).reshape(-1)[:n].view(codes1.shape))
    codes2.copy_(c2.to(torch.uint8).reshape(-1)[:n].view(codes2.shape))
    absmax1.copy_(a1)
    absmax2.copy_(a2)
    skipped.add_((valid & ~ok).sum().to(skipped.dtype))


# ---------------------------------------------------------------------------- stochastic rounding
def stochastic_round_bf16(x: Tensor, seed: int, start: int = 0) -> Tensor:
    """fp32 -> bf16, rounding up with probability equal to the dropped fraction (unbiased).

    Adds 16 random bits below the kept mantissa and truncates; non-finite inputs convert as
    usual (NaN -> canonical quiet NaN). ``start``: the flat index of ``x[0]`` in the tensor it
    is a chunk of (the random stream is indexed by element, so chunks give the whole's result).
    """
    flat = x.reshape(-1).float()
    idx = torch.arange(flat.numel(), device=x.device) + start
    bits = flat.view(torch.int32).to(torch.int64) & _MASK32
    rounded = ((bits + (hash32(seed, idx) & 0xFFFF)) & _MASK32) >> 16
    plain = bits >> 16
    finite = torch.isfinite(flat)
    upper = torch.where(finite, rounded, torch.where(torch.isnan(flat), torch.full_like(plain, 0x7FC0), plain))
    upper = torch.where(upper >= 0x8000, upper - 0x10000, upper).to(torch.int16)
    return upper.view(torch.bfloat16).view(x.shape)


def quantize_int8_sr(x: Tensor, group: int, seed: int, start: int = 0) -> tuple[Tensor, Tensor]:
    """fp32 -> (int8 codes shaped like ``x``, fp32 scale per group), symmetric, stochastic.

    ``scale = absmax / 127``; ``q = clamp(floor(x / scale + U), -127, 127)`` with ``U ~ U[0,1)``,
    so ``E[q * scale] = x``. A group of zeros gets scale 0 and codes 0. ``start`` (a multiple
    of ``group``): the flat index of ``x[0]`` when ``x`` is a chunk of a larger tensor.
    """
    n = x.numel()
    xb = group_view(x.float(), group)
    scale = xb.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    u = group_view(uniform01(seed, torch.arange(n, device=x.device) + start), group)
    q = torch.floor(xb / safe[:, None] + u).clamp(-127.0, 127.0)
    return q.to(torch.int8).reshape(-1)[:n].view(x.shape), scale


def dequantize_int8(codes: Tensor, scales: Tensor, group: int) -> Tensor:
    cb = group_view(codes, group)
    # in place: one fp32 copy of the weight in flight, not two
    return cb.float().mul_(scales[:, None]).reshape(-1)[: codes.numel()].view(codes.shape)


# ---------------------------------------------------------------------------- INT4
def pack_int4(x: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 -> (uint8 bytes holding two 4-bit codes, fp32 scale and minimum per group).

    Asymmetric: ``scale = (max - min) / 15``, ``q = clamp(floor((x - min) / scale + 0.5), 0,
    15)``; element ``2i`` goes to the low nibble of byte ``i``, ``2i + 1`` to the high nibble.
    ``group`` must be even; the tail is padded by repeating the last element (so it never
    widens a group's range).
    """
    n = x.numel()
    flat = x.reshape(-1).float()
    pad = (-n) % group
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    xb = flat.view(-1, group)
    lo = xb.amin(dim=1)
    scale = (xb.amax(dim=1) - lo) / 15.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.floor((xb - lo[:, None]) / safe[:, None] + 0.5).clamp(0.0, 15.0).to(torch.uint8)
    q = q.view(-1, group // 2, 2)
    packed = (q[..., 0] | (q[..., 1] << 4)).reshape(-1)[: (n + 1) // 2]
    return packed.contiguous(), scale, lo


def unpack_int4(packed: Tensor, scales: Tensor, mins: Tensor, numel: int, group: int) -> Tensor:
    """Inverse of :func:`pack_int4`: a flat fp32 tensor of ``numel`` elements."""
    q = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:numel].float()
    qb = group_view(q, group)
    return (qb * scales[:, None] + mins[:, None]).reshape(-1)[:numel]
