"""slimtrain.kernels: quantized-state kernels, each a Triton kernel with a PyTorch twin.

Operations (see :mod:`.ops`): block-wise dynamic 8-bit quantize / dequantize, the fused
8-bit AdamW step, stochastic rounding (fp32 -> bf16, fp32 -> int8 with group scales) and
INT4 pack / unpack. :mod:`.dispatch` picks the backend (the one decision point);
:mod:`.cpu_fused` is the fast CPU path of the AdamW step (one C++ loop, bit-identical to the
twin). The state formats the optimizers keep are one type each: :class:`Blockwise8bit`
(:mod:`.blockwise_state`) and :class:`PackedInt4` (:mod:`.int4_state`). Nothing here imports
slimtrain.optim.
"""

from .blockwise_state import Blockwise8bit
from .dispatch import BACKENDS, kernel_backend, resolve
from .int4_state import PackedInt4
from .maps import dynamic_map, quant_tables
from .ops import (
    COMPILE_SECONDS,
    DEFAULT_BLOCK,
    adamw8bit_update,
    dequantize_blockwise,
    dequantize_int8,
    n_blocks,
    pack_int4,
    quantize_blockwise,
    quantize_int8_sr,
    stochastic_round_bf16,
    unpack_int4,
)
from .reference import group_view

__all__ = [
    "BACKENDS",
    "Blockwise8bit",
    "COMPILE_SECONDS",
    "DEFAULT_BLOCK",
    "adamw8bit_update",
    "dequantize_blockwise",
    "dequantize_int8",
    "dynamic_map",
    "group_view",
    "kernel_backend",
    "n_blocks",
    "pack_int4",
    "PackedInt4",
    "quant_tables",
    "quantize_blockwise",
    "quantize_int8_sr",
    "resolve",
    "stochastic_round_bf16",
    "unpack_int4",
]
