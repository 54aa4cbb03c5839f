"""Public kernel operations: each call runs the backend :mod:`.dispatch` resolves for it --
a Triton kernel (launched through one table, :data:`TRITON_LAUNCHES`) or its PyTorch twin."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import reference as ref
from .dispatch import requested, resolve, resolve_step
from .maps import code_lut, quant_tables

DEFAULT_BLOCK = 256


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _rows(n_blocks: int, block: int, cuda: bool) -> int:
    # Elements per program: ~4K on a GPU (enough in flight per SM without spilling registers),
    # ~32K under the interpreter, whose cost is per program rather than per element.
    target = 4096 if cuda else 32768
    return max(1, min(_next_pow2(n_blocks), max(1, target // block)))


def _check_block(block: int, backend: str) -> None:
    if block < 2:
        raise ValueError(f"block_size={block} must be >= 2")
    if backend == "triton" and block & (block - 1):
        raise ValueError(f"block_size={block} must be a power of two for the Triton kernels")


def n_blocks(numel: int, block: int = DEFAULT_BLOCK) -> int:
    return (numel + block - 1) // block


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ---------------------------------------------------------------------------- Triton launches
def _rows_of_groups(width: str, per_program_lane: int = 1) -> Callable[[int, int, bool], tuple[tuple, dict]]:
    """Grid rule of the group-wise kernels: a program owns ``ROWS`` consecutive groups of
    ``group`` elements (``_rows``); the group width reaches the kernel as the constexpr
    ``width``, divided by ``per_program_lane`` (INT4 kernels take half a group: two codes a byte)."""

    def rule(numel: int, group: int, cuda: bool) -> tuple[tuple, dict]:
        groups = n_blocks(numel, group)
        rows = _rows(groups, group, cuda)
        return (triton_cdiv(groups, rows),), {"ROWS": rows, width: group // per_program_lane}

    return rule


def _flat_tiles(numel: int, group: int, cuda: bool) -> tuple[tuple, dict]:
    """Grid rule of the element-wise kernels: one program per tile of 4K (GPU) / 64K
    (interpreter) elements; ``group`` is unused."""
    tile = 4096 if cuda else 65536
    return (triton_cdiv(numel, tile),), {"BLOCK": tile}


@dataclass(frozen=True)
class TritonLaunch:
    """How one operation launches its kernel: the kernel's name in :mod:`.triton_kernels`,
    the grid rule ``(numel, group, cuda) -> (grid, constexprs)`` and fixed launch options
    (``num_warps`` as ``(cpu, cuda)``)."""

    kernel: str
    grid: Callable[[int, int, bool], tuple[tuple, dict]]
    num_warps: tuple[int, int] | None = None


TRITON_LAUNCHES: dict[str, TritonLaunch] = {
    "quantize_blockwise": TritonLaunch("quantize_blockwise_kernel", _rows_of_groups("BLOCK")),
    "dequantize_blockwise": TritonLaunch("dequantize_blockwise_kernel", _rows_of_groups("BLOCK")),
    "adamw8bit": TritonLaunch("adamw8bit_kernel", _rows_of_groups("BLOCK"), num_warps=(4, 8)),
    "stochastic_round_bf16": TritonLaunch("stochastic_round_bf16_kernel", _flat_tiles),
    "quantize_int8_sr": TritonLaunch("quantize_int8_sr_kernel", _rows_of_groups("GROUP")),
    "dequantize_int8": TritonLaunch("dequantize_int8_kernel", _rows_of_groups("GROUP")),
    "pack_int4": TritonLaunch("pack_int4_kernel", _rows_of_groups("HALF", 2)),
    "unpack_int4": TritonLaunch("unpack_int4_kernel", _rows_of_groups("HALF", 2)),
}


def _launch(op: str, *args, numel: int, group: int, cuda: bool, **constexprs) -> None:
    """Launch ``op``'s Triton kernel on ``args`` (pointers and runtime scalars, in the kernel's
    order) with the grid and constexprs of its :data:`TRITON_LAUNCHES` entry plus ``constexprs``."""
    from . import triton_kernels as tk

    spec = TRITON_LAUNCHES[op]
    grid, meta = spec.grid(numel, group, cuda)
    if spec.num_warps is not None:
        meta["num_warps"] = spec.num_warps[int(cuda)]
    getattr(tk, spec.kernel)[grid](*args, **meta, **constexprs)


# ---------------------------------------------------------------------------- block-wise 8-bit
def quantize_blockwise(x: Tensor, *, signed: bool = True, block_size: int = DEFAULT_BLOCK,
                       backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Block-wise dynamic 8-bit quantization: ``(uint8 codes like x, fp32 absmax per block)``."""
    be = resolve(x, backend)
    _check_block(block_size, be)
    values, mids = quant_tables(signed, x.device)
    if be != "triton":
        return ref.quantize_blockwise(x, (values, mids, *code_lut(signed, x.device)), block_size)
    x = x.contiguous()
    n, nb = x.numel(), n_blocks(x.numel(), block_size)
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(nb, dtype=torch.float32, device=x.device)
    _launch("quantize_blockwise", x, codes, absmax, mids, n, nb, numel=n, group=block_size, cuda=x.is_cuda)
    return codes, absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, *, signed: bool = True, block_size: int = DEFAULT_BLOCK,
                         backend: str | None = None) -> Tensor:
    """Inverse of :func:`quantize_blockwise` (fp32, shaped like ``codes``)."""
    be = resolve(codes, backend)
    _check_block(block_size, be)
    values, _ = quant_tables(signed, codes.device)
    if be != "triton":
        return ref.dequantize_blockwise(codes, absmax, values, block_size)
    codes = codes.contiguous()
    n, nb = codes.numel(), n_blocks(codes.numel(), block_size)
    out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    _launch("dequantize_blockwise", codes, absmax, values, out, n, nb, numel=n, group=block_size, cuda=codes.is_cuda)
    return out


# ---------------------------------------------------------------------------- fused AdamW step
_COMPILED: dict[str, object] = {}
COMPILE_SECONDS: dict[str, float] = {}  # wall time of the first (compiling) call, per variant


def _compiled_step(write_out: bool):
    key = "out" if write_out else "param"
    if key not in _COMPILED:
        # Shapes are marked dynamic per call (only the number of blocks varies), so the block
        # size stays a compile-time constant and the inner loop vectorises; hyperparameters
        # arrive as 0-d tensors, so a learning-rate schedule never recompiles.
        _COMPILED[key] = torch.compile(ref.adamw8bit_step, dynamic=False)
    return _COMPILED[key]


def _compiled_update(param, grad, codes1, absmax1, codes2, absmax2, r1, r2, skipped, out, block, coeffs):
    # Whole blocks go through the compiled graph as (n_blocks * block,) views whose length is
    # the one dynamic dimension; a short tail block (if any) takes the eager twin. Blocks are
    # independent, so the split changes nothing.
    n = grad.numel()
    full = (n // block) * block
    nbf = full // block
    flat = lambda t: t.reshape(-1)  # noqa: E731 -- contiguous: a view
    target = param if out is None else out
    parts = [flat(target), flat(grad), flat(codes1), absmax1, flat(codes2), absmax2]
    hyper = {k: torch.tensor(v, dtype=torch.float32) for k, v in coeffs.items()}
    if full:
        body = [parts[0][:full], parts[1][:full], parts[2][:full], parts[3][:nbf], parts[4][:full], parts[5][:nbf]]
        for t in body:
            torch._dynamo.mark_dynamic(t, 0)
        p_body, o_body = (body[0], None) if out is None else (grad.reshape(-1)[:full], body[0])
        key = "out" if out is not None else "param"
        start = time.perf_counter()
        _compiled_step(out is not None)(p_body, body[1], body[2], body[3], body[4], body[5], r1, r2, skipped,
                                        o_body, block=block, **hyper)
        COMPILE_SECONDS.setdefault(key, time.perf_counter() - start)
    if full < n:
        tail = [parts[0][full:], parts[1][full:], parts[2][full:], parts[3][nbf:], parts[4][full:], parts[5][nbf:]]
        p_tail, o_tail = (tail[0], None) if out is None else (grad.reshape(-1)[full:], tail[0])
        ref.adamw8bit_step(p_tail, tail[1], tail[2], tail[3], tail[4], tail[5], r1, r2, skipped, o_tail,
                           block=block, **coeffs)


def adamw8bit_update(
    param: Tensor,
    grad: Tensor,
    codes1: Tensor,
    absmax1: Tensor,
    codes2: Tensor,
    absmax2: Tensor,
    skipped: Tensor,
    *,
    step_size: float,
    beta1: float,
    beta2: float,
    inv_sqrt_bc2: float,
    eps: float,
    decay: float,
    out: Tensor | None = None,
    block_size: int = DEFAULT_BLOCK,
    backend: str | None = None,
) -> None:
    """Fused AdamW step on block-wise 8-bit moments (in place on param / codes / absmax).

    For every element with a finite gradient::

        m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
        u = step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps)
        param = param * decay - u          (or out = u when ``out`` is given)

    ``codes1``/``absmax1`` hold m with the signed dynamic map, ``codes2``/``absmax2`` v with
    the unsigned one. Elements with a non-finite gradient keep param and moments; their count
    is added to ``skipped`` (an int32 tensor of one element). With torch.optim.AdamW's rule,
    ``step_size = lr / (1 - b1^t)``, ``inv_sqrt_bc2 = 1 / sqrt(1 - b2^t)``,
    ``decay = 1 - lr * wd``.
    """
    be = resolve_step(param, backend, grad=grad, out=out)  # the one decision (see dispatch)
    _check_block(block_size, be)
    dev = grad.device
    t1, t2 = quant_tables(True, dev), quant_tables(False, dev)
    r1, r2 = (*t1, *code_lut(True, dev)), (*t2, *code_lut(False, dev))
    coeffs = dict(step_size=step_size, beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2,
                  one_minus_beta2=1.0 - beta2, inv_sqrt_bc2=inv_sqrt_bc2, eps=eps, decay=decay)
    if be == "cpp":
        from . import cpu_fused

        cpu_fused.adamw8bit_step(param, grad, codes1, absmax1, codes2, absmax2, r1, r2, skipped, out,
                                 block=block_size, **coeffs)
        return
    if be == "torch":
        ref.adamw8bit_step(param, grad, codes1, absmax1, codes2, absmax2, r1, r2, skipped, out,
                           block=block_size, **coeffs)
        return
    if be == "compile":
        _compiled_update(param, grad, codes1, absmax1, codes2, absmax2, r1, r2, skipped, out, block_size, coeffs)
        return
    for name, t in (("grad", grad), ("codes1", codes1), ("codes2", codes2)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the Triton kernel")
    n, nb = grad.numel(), n_blocks(grad.numel(), block_size)
    target = param if out is None else out
    if not target.is_contiguous():
        raise ValueError("param/out must be contiguous for the Triton kernel")
    bf16 = out is None and param.dtype == torch.bfloat16
    _launch(
        "adamw8bit",
        (param.view(torch.int16) if bf16 else param) if out is None else grad, grad, codes1, absmax1, codes2, absmax2,
        t1[0], t1[1], t2[0], t2[1], skipped, grad if out is None else out,
        n, nb, *coeffs.values(),
        numel=n, group=block_size, cuda=grad.is_cuda, WRITE_OUT=out is not None, PARAM_BF16=bf16,
    )


# ---------------------------------------------------------------------------- stochastic rounding
SR_CHUNK = 1 << 20  # elements per call of the PyTorch twins of the rounding kernels


def _compiled_twin(name: str, x: Tensor, backend: str | None):
    """The ``torch.compile``d twin ``name`` for full chunks of a large CPU tensor, or None.

    The eager twin spends ~75 ns per element on its int64 hash; compiled into one loop it is
    memory-bound. Same operations, so the same bits; one compile per process (fixed chunk
    shape, seed and offset passed as tensors so they never recompile). Explicit "torch" keeps
    the eager twin.
    """
    if x.is_cuda or requested(backend) not in ("auto", "compile", "cpp") or x.numel() < SR_CHUNK // 4:
        return None
    key = f"sr_{name}"
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(getattr(ref, name), dynamic=False)
    return _COMPILED[key]


def stochastic_round_bf16(x: Tensor, seed: int, *, backend: str | None = None) -> Tensor:
    """fp32 -> bf16 with stochastic rounding (unbiased: ``E[out] = x``); ``seed`` picks the draw."""
    be = resolve(x, backend)
    seed = int(seed) & 0x7FFFFFFF
    if be != "triton":
        if x.numel() <= SR_CHUNK and _compiled_twin("stochastic_round_bf16", x, backend) is None:
            return ref.stochastic_round_bf16(x, seed)
        # The twin's hash works in int64 (~40 bytes per element of transients): chunked, a
        # large weight's rounding costs a few MiB; the result is the same element for element.
        flat, out = x.reshape(-1), torch.empty(x.numel(), dtype=torch.bfloat16, device=x.device)
        fast = _compiled_twin("stochastic_round_bf16", x, backend)
        for s in range(0, flat.numel(), SR_CHUNK):
            chunk = flat[s:s + SR_CHUNK]
            if fast is not None:  # the tail padded to a full chunk (element-wise: the pad is dropped)
                full = torch.nn.functional.pad(chunk.float(), (0, SR_CHUNK - chunk.numel()))
                out[s:s + SR_CHUNK] = fast(full, torch.tensor(seed), torch.tensor(s))[:chunk.numel()]
            else:
                out[s:s + SR_CHUNK] = ref.stochastic_round_bf16(chunk, seed, start=s)
        return out.view(x.shape)
    x = x.contiguous().float()
    out = torch.empty(x.shape, dtype=torch.int16, device=x.device)
    _launch("stochastic_round_bf16", x, out, x.numel(), seed, numel=x.numel(), group=1, cuda=x.is_cuda)
    return out.view(torch.bfloat16)


def quantize_int8_sr(x: Tensor, group_size: int = DEFAULT_BLOCK, seed: int = 0, *, start: int = 0,
                     backend: str | None = None) -> tuple[Tensor, Tensor]:
    """fp32 -> (int8 codes like ``x``, fp32 scale per group), symmetric, stochastic rounding.

    ``start``: the flat index of ``x[0]`` when ``x`` is a piece of a larger tensor (a multiple of
    ``group_size``, so the pieces' groups are the whole's): the random stream is indexed by
    element, so quantizing the pieces gives exactly the codes and scales of the whole.
    """
    be = resolve(x, backend)
    _check_block(group_size, be)
    start = int(start)
    if start < 0 or start % group_size:
        raise ValueError(f"start={start} must be a non-negative multiple of group_size={group_size}")
    seed = int(seed) & 0x7FFFFFFF
    if be != "triton":
        chunk = max(group_size, SR_CHUNK // group_size * group_size)
        if x.numel() <= chunk and _compiled_twin("quantize_int8_sr", x, backend) is None:
            return ref.quantize_int8_sr(x, group_size, seed, start=start)
        flat = x.reshape(-1)
        codes = torch.empty(x.numel(), dtype=torch.int8, device=x.device)
        scales = torch.empty(n_blocks(x.numel(), group_size), dtype=torch.float32, device=x.device)
        fast = _compiled_twin("quantize_int8_sr", x, backend)
        for s in range(0, flat.numel(), chunk):  # whole groups per chunk: same result as one call
            part = flat[s:s + chunk]
            if fast is not None:  # the tail padded with zero groups, which are dropped
                full = torch.nn.functional.pad(part.float(), (0, chunk - part.numel()))
                c, sc = fast(full, group_size, torch.tensor(seed), torch.tensor(start + s))
                c, sc = c[:part.numel()], sc[:n_blocks(part.numel(), group_size)]
            else:
                c, sc = ref.quantize_int8_sr(part, group_size, seed, start=start + s)
            codes[s:s + chunk] = c
            scales[s // group_size:s // group_size + sc.numel()] = sc
        return codes.view(x.shape), scales
    x = x.contiguous()
    n, ng = x.numel(), n_blocks(x.numel(), group_size)
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scales = torch.empty(ng, dtype=torch.float32, device=x.device)
    _launch("quantize_int8_sr", x, codes, scales, n, ng, seed, start, numel=n, group=group_size, cuda=x.is_cuda)
    return codes, scales


def dequantize_int8(codes: Tensor, scales: Tensor, group_size: int = DEFAULT_BLOCK, *,
                    backend: str | None = None) -> Tensor:
    be = resolve(codes, backend)
    _check_block(group_size, be)
    if be != "triton":
        return ref.dequantize_int8(codes, scales, group_size)
    codes = codes.contiguous()
    n, ng = codes.numel(), n_blocks(codes.numel(), group_size)
    out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    _launch("dequantize_int8", codes, scales, out, n, ng, numel=n, group=group_size, cuda=codes.is_cuda)
    return out


# ---------------------------------------------------------------------------- INT4
def pack_int4(x: Tensor, group_size: int = 128, *, backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 -> (uint8 bytes with two 4-bit codes each, fp32 scale, fp32 min per group)."""
    be = resolve(x, backend)
    _check_block(group_size, be)
    if group_size % 2:
        raise ValueError(f"group_size={group_size} must be even to pack two codes per byte")
    if x.numel() == 0:
        raise ValueError("cannot pack an empty tensor")
    if be != "triton":
        return ref.pack_int4(x, group_size)
    x = x.contiguous()
    n, ng = x.numel(), n_blocks(x.numel(), group_size)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(ng, dtype=torch.float32, device=x.device)
    mins = torch.empty(ng, dtype=torch.float32, device=x.device)
    _launch("pack_int4", x, packed, scales, mins, n, ng, numel=n, group=group_size, cuda=x.is_cuda)
    return packed, scales, mins


def unpack_int4(packed: Tensor, scales: Tensor, mins: Tensor, numel: int, group_size: int = 128, *,
                backend: str | None = None) -> Tensor:
    """Inverse of :func:`pack_int4`: a flat fp32 tensor of ``numel`` elements."""
    be = resolve(packed, backend)
    _check_block(group_size, be)
    if be != "triton":
        return ref.unpack_int4(packed, scales, mins, numel, group_size)
    ng = n_blocks(numel, group_size)
    out = torch.empty(numel, dtype=torch.float32, device=packed.device)
    _launch("unpack_int4", packed, scales, mins, out, numel, ng, numel=numel, group=group_size, cuda=packed.is_cuda)
    return out
