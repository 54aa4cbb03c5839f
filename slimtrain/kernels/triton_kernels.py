"""Triton kernels for quantized optimizer states; :mod:`.reference` holds their PyTorch twins.

Layout common to all kernels: a program owns ``ROWS`` consecutive blocks of ``BLOCK``
elements, loaded as a (ROWS, BLOCK) tile, so a per-block scale is one ``tl.max`` along axis 1
and one program covers several 256-blocks (fewer, larger programs: on a GPU that keeps loads
wide, under ``TRITON_INTERPRET=1`` it keeps the per-program cost of ~12 ms rare).

Hyperparameters (learning rate, betas, eps, decay, bias corrections, seeds) are ordinary
runtime arguments, never ``tl.constexpr``: a learning-rate schedule does not recompile.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _search(x, mids_ptr):
    # Count of midpoints < x: 8-step branch-free binary search over the 256-entry table.
    idx = tl.zeros(x.shape, dtype=tl.int32)
    for s in tl.static_range(8):
        step: tl.constexpr = 128 >> s
        cand = tl.load(mids_ptr + idx + (step - 1))
        idx = tl.where(cand < x, idx + step, idx)
    return idx


@triton.jit
def _hash32(seed, offs):
    # murmur3 finaliser of offs * golden + seed in uint32 arithmetic (wraps mod 2^32).
    h = offs.to(tl.uint32) * 0x9E3779B1 + seed.to(tl.uint32)
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    h = h ^ (h >> 16)
    return h


@triton.jit
def _tile(pid, n, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = pid * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    return rows, offs, offs < n


@triton.jit
def quantize_blockwise_kernel(x_ptr, codes_ptr, absmax_ptr, mids_ptr, n, n_blocks,
                              ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows, offs, mask = _tile(tl.program_id(0), n, ROWS, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=1)
    normalized = x / tl.where(absmax > 0, absmax, 1.0)[:, None]  # an all-zero block maps to code(0)
    codes = _search(normalized, mids_ptr)
    tl.store(codes_ptr + offs, codes.to(tl.uint8), mask=mask)
    tl.store(absmax_ptr + rows, absmax, mask=rows < n_blocks)


@triton.jit
def dequantize_blockwise_kernel(codes_ptr, absmax_ptr, values_ptr, out_ptr, n, n_blocks,
                                ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows, offs, mask = _tile(tl.program_id(0), n, ROWS, BLOCK)
    codes = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    absmax = tl.load(absmax_ptr + rows, mask=rows < n_blocks, other=0.0)
    tl.store(out_ptr + offs, tl.load(values_ptr + codes) * absmax[:, None], mask=mask)


@triton.jit
def adamw8bit_kernel(p_ptr, g_ptr, c1_ptr, a1_ptr, c2_ptr, a2_ptr,
                     values1_ptr, mids1_ptr, values2_ptr, mids2_ptr, skipped_ptr, out_ptr,
                     n, n_blocks,
                     step_size, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_sqrt_bc2, eps, decay,
                     WRITE_OUT: tl.constexpr, PARAM_BF16: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """One pass: read param, grad, codes, absmax; write param (or ``out``), codes, absmax.

    The moments exist in fp32 only in registers. Elements whose gradient is not finite keep
    their param and moments and are counted in ``skipped``; a block whose new absmax is 0
    quantizes to the code of 0 instead of dividing by zero.
    """
    rows, offs, mask = _tile(tl.program_id(0), n, ROWS, BLOCK)
    row_mask = rows < n_blocks
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ok = (g == g) & (tl.abs(g) < float("inf"))
    g = tl.where(ok, g, 0.0)
    c1 = tl.load(c1_ptr + offs, mask=mask, other=0).to(tl.int32)
    c2 = tl.load(c2_ptr + offs, mask=mask, other=0).to(tl.int32)
    a1 = tl.load(a1_ptr + rows, mask=row_mask, other=0.0)
    a2 = tl.load(a2_ptr + rows, mask=row_mask, other=0.0)
    m0 = tl.load(values1_ptr + c1) * a1[:, None]
    v0 = tl.load(values2_ptr + c2) * a2[:, None]
    m = tl.where(ok, beta1 * m0 + one_minus_beta1 * g, m0)
    v = tl.where(ok, beta2 * v0 + one_minus_beta2 * (g * g), v0)
    m = tl.where(mask, m, 0.0)
    v = tl.where(mask, v, 0.0)
    u = step_size * (m / (tl.sqrt_rn(v) * inv_sqrt_bc2 + eps))
    keep = ok & mask
    if WRITE_OUT:
        tl.store(out_ptr + offs, tl.where(keep, u, 0.0), mask=mask)
    else:
        if PARAM_BF16:
            # bf16 parameters arrive as their int16 bit patterns: widening is a shift, and the
            # narrowing is an explicit round-to-nearest-even (what torch's .to(bfloat16) does;
            # the interpreter's own cast truncates).
            bits16 = tl.load(p_ptr + offs, mask=mask, other=0)
            p = ((bits16.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
            p = tl.where(keep, p * decay - u, p)
            b = p.to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            b = tl.where(p == p, b, 0x7FC0)
            tl.store(p_ptr + offs, b.to(tl.int16), mask=mask)
        else:
            p_raw = tl.load(p_ptr + offs, mask=mask, other=0.0)
            p = tl.where(keep, p_raw.to(tl.float32) * decay - u, p_raw.to(tl.float32))
            tl.store(p_ptr + offs, p.to(p_raw.dtype), mask=mask)
    new_a1 = tl.max(tl.abs(m), axis=1)
    new_a2 = tl.max(tl.abs(v), axis=1)
    # A block whose absmax is 0 is all zeros: divide by 1 so it stays finite (code of 0).
    n1 = m / tl.where(new_a1 > 0, new_a1, 1.0)[:, None]
    n2 = v / tl.where(new_a2 > 0, new_a2, 1.0)[:, None]
    tl.store(c1_ptr + offs, _search(n1, mids1_ptr).to(tl.uint8), mask=mask)
    tl.store(c2_ptr + offs, _search(n2, mids2_ptr).to(tl.uint8), mask=mask)
    tl.store(a1_ptr + rows, new_a1, mask=row_mask)
    tl.store(a2_ptr + rows, new_a2, mask=row_mask)
    bad = tl.sum(tl.sum((mask & ~ok).to(tl.int32), axis=1), axis=0)
    tl.atomic_add(skipped_ptr, bad)


@triton.jit
def stochastic_round_bf16_kernel(x_ptr, out_ptr, n, seed, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (_hash32(seed, offs) & 0xFFFF)) >> 16
    plain = bits >> 16
    finite = (x == x) & (tl.abs(x) < float("inf"))
    upper = tl.where(finite, rounded, tl.where(x == x, plain, 0x7FC0))
    # The upper 16 bits are the bf16 pattern; stored as int16 and viewed as bf16 by the caller.
    tl.store(out_ptr + offs, upper.to(tl.int16), mask=mask)


@triton.jit
def quantize_int8_sr_kernel(x_ptr, codes_ptr, scales_ptr, n, n_groups, seed, start,
                            ROWS: tl.constexpr, GROUP: tl.constexpr):
    rows, offs, mask = _tile(tl.program_id(0), n, ROWS, GROUP)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.max(tl.abs(x), axis=1) / 127.0
    safe = tl.where(scale > 0, scale, 1.0)
    # start: flat index of x[0] in the tensor it is a chunk of (the draw is indexed by element)
    u = (_hash32(seed, offs + start) >> 8).to(tl.float32) * (2.0**-24)
    q = tl.floor(x / safe[:, None] + u)
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    tl.store(codes_ptr + offs, q.to(tl.int8), mask=mask)
    tl.store(scales_ptr + rows, scale, mask=rows < n_groups)


@triton.jit
def dequantize_int8_kernel(codes_ptr, scales_ptr, out_ptr, n, n_groups, ROWS: tl.constexpr, GROUP: tl.constexpr):
    rows, offs, mask = _tile(tl.program_id(0), n, ROWS, GROUP)
    q = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.float32)
    s = tl.load(scales_ptr + rows, mask=rows < n_groups, other=0.0)
    tl.store(out_ptr + offs, q * s[:, None], mask=mask)


@triton.jit
def pack_int4_kernel(x_ptr, packed_ptr, scales_ptr, mins_ptr, n, n_groups,
                     ROWS: tl.constexpr, HALF: tl.constexpr):
    # Group g = elements [2*HALF*g, 2*HALF*(g+1)): even elements -> low nibbles, odd -> high.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    byte = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    even = 2 * byte
    odd = even + 1
    last = tl.load(x_ptr + (n - 1)).to(tl.float32)  # tail padding repeats the last element
    xe = tl.load(x_ptr + even, mask=even < n, other=0.0).to(tl.float32)
    xo = tl.load(x_ptr + odd, mask=odd < n, other=0.0).to(tl.float32)
    xe = tl.where(even < n, xe, last)
    xo = tl.where(odd < n, xo, last)
    lo = tl.minimum(tl.min(xe, axis=1), tl.min(xo, axis=1))
    scale = (tl.maximum(tl.max(xe, axis=1), tl.max(xo, axis=1)) - lo) / 15.0
    safe = tl.where(scale > 0, scale, 1.0)
    qe = tl.minimum(tl.maximum(tl.floor((xe - lo[:, None]) / safe[:, None] + 0.5), 0.0), 15.0).to(tl.uint8)
    qo = tl.minimum(tl.maximum(tl.floor((xo - lo[:, None]) / safe[:, None] + 0.5), 0.0), 15.0).to(tl.uint8)
    tl.store(packed_ptr + byte, qe | (qo << 4), mask=even < n)
    row_mask = rows < n_groups
    tl.store(scales_ptr + rows, scale, mask=row_mask)
    tl.store(mins_ptr + rows, lo, mask=row_mask)


@triton.jit
def unpack_int4_kernel(packed_ptr, scales_ptr, mins_ptr, out_ptr, n, n_groups,
                       ROWS: tl.constexpr, HALF: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    byte = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
    even = 2 * byte
    b = tl.load(packed_ptr + byte, mask=even < n, other=0)
    s = tl.load(scales_ptr + rows, mask=rows < n_groups, other=0.0)[:, None]
    lo = tl.load(mins_ptr + rows, mask=rows < n_groups, other=0.0)[:, None]
    tl.store(out_ptr + even, (b & 0xF).to(tl.float32) * s + lo, mask=even < n)
    tl.store(out_ptr + even + 1, (b >> 4).to(tl.float32) * s + lo, mask=even + 1 < n)
