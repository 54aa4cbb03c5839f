"""The block-wise dynamic 8-bit state format (Dettmers et al., "8-bit Optimizers via
Block-wise Quantization", ICLR 2022) as one small type.

A tensor of ``n`` fp32 values is stored as ``n`` uint8 codes (indices into the 256-value
dynamic map, signed for values of either sign, unsigned for non-negative ones) plus one fp32
absmax per block of ``block_size`` values: ``1 + 4 / block_size`` bytes per value. The map is
not stored: ``signed`` names it (:func:`slimtrain.kernels.maps.dynamic_map`).

In an optimizer's state the format is two plain tensors, ``{name}_codes`` and
``{name}_absmax`` (:meth:`Blockwise8bit.store` / :meth:`Blockwise8bit.load`), so
``state_dict()`` holds tensors only and loads with ``torch.load(weights_only=True)``; a loaded
:class:`Blockwise8bit` views those tensors, and the kernels update them in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .maps import dynamic_map
from .ops import DEFAULT_BLOCK, dequantize_blockwise, n_blocks, quantize_blockwise

CODES, ABSMAX = "codes", "absmax"  # key suffixes in an optimizer's state


@dataclass(frozen=True)
class Blockwise8bit:
    """One tensor as block-wise dynamic 8-bit codes: ``codes`` (uint8, the tensor's shape),
    ``absmax`` (fp32, one per ``block_size`` values), the map named by ``signed``."""

    codes: Tensor
    absmax: Tensor
    signed: bool
    block_size: int = DEFAULT_BLOCK

    def __post_init__(self):
        if self.codes.dtype != torch.uint8:
            raise ValueError(f"8-bit codes must be uint8, got {self.codes.dtype}")
        if self.absmax.dtype != torch.float32 or self.absmax.numel() != n_blocks(self.codes.numel(), self.block_size):
            raise ValueError(
                f"absmax must be fp32 with one value per block of {self.block_size} "
                f"({n_blocks(self.codes.numel(), self.block_size)}), got {self.absmax.dtype} x {self.absmax.numel()}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def zeros(cls, like: Tensor, *, signed: bool, block_size: int = DEFAULT_BLOCK) -> Blockwise8bit:
        """All zeros, shaped and placed like ``like``: absmax 0 and the code of 0.0 everywhere."""
        # The code comes from the quantizer itself (one element); the rest is a fill rather
        # than quantizing numel zeros.
        zero = torch.zeros(1, dtype=torch.float32, device=like.device)
        code, _ = quantize_blockwise(zero, signed=signed, block_size=block_size, backend="torch")
        codes = code.expand(like.numel()).clone().view(like.shape)
        absmax = torch.zeros(n_blocks(like.numel(), block_size), dtype=torch.float32, device=like.device)
        return cls(codes, absmax, signed, block_size)

    @classmethod
    def quantize(cls, x: Tensor, *, signed: bool, block_size: int = DEFAULT_BLOCK,
                 backend: str | None = None) -> Blockwise8bit:
        """``x`` (any float dtype) quantized to the nearest map value of each block."""
        codes, absmax = quantize_blockwise(x, signed=signed, block_size=block_size, backend=backend)
        return cls(codes, absmax, signed, block_size)

    def dequantize(self, backend: str | None = None) -> Tensor:
        """The fp32 values, shaped like :attr:`codes`."""
        return dequantize_blockwise(self.codes, self.absmax, signed=self.signed, block_size=self.block_size,
                                    backend=backend)

    # ------------------------------------------------------------------ facts
    @property
    def map(self) -> Tensor:
        """The 256 map values a code indexes (on the codes' device)."""
        return dynamic_map(self.signed, self.codes.device)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def nbytes(self) -> int:
        """Bytes held: codes plus absmax (the shared map is not counted)."""
        return self.codes.numel() * self.codes.element_size() + self.absmax.numel() * self.absmax.element_size()

    # ------------------------------------------------------------------ optimizer state
    @staticmethod
    def keys(name: str) -> tuple[str, str]:
        """The state keys of a tensor stored under ``name``: ``(f"{name}_codes", f"{name}_absmax")``."""
        return f"{name}_{CODES}", f"{name}_{ABSMAX}"

    @staticmethod
    def stored(state: dict, name: str) -> bool:
        return Blockwise8bit.keys(name)[0] in state

    def store(self, state: dict, name: str) -> None:
        """Put the tensors into ``state`` (plain tensors, not copies) under :meth:`keys`."""
        codes_key, absmax_key = self.keys(name)
        state[codes_key], state[absmax_key] = self.codes, self.absmax

    @classmethod
    def load(cls, state: dict, name: str, *, signed: bool, block_size: int = DEFAULT_BLOCK) -> Blockwise8bit | None:
        """The tensor stored under ``name`` (``None`` when there is none), viewing ``state``'s
        tensors: in-place updates by the kernels land in the state."""
        if not cls.stored(state, name):
            return None
        codes_key, absmax_key = cls.keys(name)
        return cls(state[codes_key], state[absmax_key], signed, block_size)
