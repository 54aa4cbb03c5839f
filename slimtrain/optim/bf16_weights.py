"""bf16 weights without an fp32 master copy: the update is computed in fp32 and written back
with stochastic rounding (unbiased, so updates far below a bf16 ulp still move the weight in
expectation), one chunk of the tensor at a time.

Memory: the bf16 weight itself (2 B/param) instead of bf16 + fp32 master (6 B/param); while a
tensor is updated, fp32 copies of one chunk (:data:`CHUNK` elements) of its weight and gradient.
The random stream is a hash of ``(seed, element index)`` (:func:`slimtrain.kernels.stochastic_round_bf16`),
and the seed is derived from the tensor's index and step, so a resumed run rounds exactly as the
uninterrupted one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from . import projector as proj

CHUNK = 1 << 22  # elements per fp32 chunk (a multiple of every 8-bit block size)


def rounding_seed(base_seed: int, param_index: int, step: int) -> int:
    """The stochastic-rounding seed of one tensor's update at ``step`` (31 bits)."""
    return proj.projector_seed(base_seed + 7, param_index, step) & 0x7FFFFFFF


def wants_rounding(param: Tensor, enabled: bool) -> bool:
    return enabled and param.dtype == torch.bfloat16


@torch.no_grad()
def write_rounded_(param: Tensor, value: Tensor, seed: int) -> None:
    """``param`` (bf16) <- ``value`` (fp32, same shape) with stochastic rounding."""
    param.copy_(kernels.stochastic_round_bf16(value, seed))


@torch.no_grad()
def adamw8bit_bf16_(param: Tensor, grad: Tensor, codes1: Tensor, absmax1: Tensor, codes2: Tensor, absmax2: Tensor,
                    skipped: Tensor, *, seed: int, block_size: int, backend: str | None, post_decay: float = 1.0,
                    **coeffs) -> None:
    """:func:`slimtrain.kernels.adamw8bit_update` on a bf16 ``param`` in fp32 arithmetic, written
    back with stochastic rounding, chunk by chunk.

    Chunks are whole 8-bit blocks, so each chunk's moments (codes and absmax slices) are
    exactly the whole tensor's; the rounding of chunk ``c`` uses ``seed + c``. ``post_decay``
    multiplies the result before rounding (GaLore's decay after the update).
    """
    if CHUNK % block_size:
        raise ValueError(f"block_size={block_size} must divide {CHUNK}")
    flat_p, flat_g = param.view(-1), grad.reshape(-1)
    c1, c2 = codes1.view(-1), codes2.view(-1)
    n = flat_p.numel()
    for index, start in enumerate(range(0, n, CHUNK)):
        end = min(n, start + CHUNK)
        b0, b1 = start // block_size, kernels.n_blocks(end, block_size)
        work = flat_p[start:end].float()
        kernels.adamw8bit_update(work, flat_g[start:end].float(), c1[start:end], absmax1[b0:b1], c2[start:end],
                                 absmax2[b0:b1], skipped, block_size=block_size, backend=backend, **coeffs)
        if post_decay != 1.0:
            work.mul_(post_decay)
        flat_p[start:end] = kernels.stochastic_round_bf16(work, (seed + index) & 0x7FFFFFFF)
