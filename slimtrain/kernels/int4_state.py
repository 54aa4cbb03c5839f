"""The packed INT4 format (Q-GaLore's projector storage, Zhang et al. 2024) as one small type.

A matrix of ``n`` fp32 values is stored as ``ceil(n / 2)`` bytes holding two 4-bit codes each
(element ``2i`` in the low nibble of byte ``i``), with an asymmetric fp32 ``scale`` and ``min``
per group of ``group_size`` values: ``1/2 + 8 / group_size`` bytes per value, plus the shape.

In an optimizer's state the format is four plain tensors, ``{name}_int4``, ``{name}_scales``,
``{name}_mins`` and ``{name}_shape`` (int64), so ``state_dict()`` holds tensors only and loads
with ``torch.load(weights_only=True)``. The group size is a hyperparameter (the param group's),
not part of the state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .ops import n_blocks, pack_int4, unpack_int4

SUFFIXES = ("int4", "scales", "mins", "shape")  # key suffixes in an optimizer's state


@dataclass(frozen=True)
class PackedInt4:
    """A tensor as packed 4-bit codes: ``packed`` (uint8, two codes a byte), ``scales`` and
    ``mins`` (fp32, one per ``group_size`` values), ``shape`` (the original shape)."""

    packed: Tensor
    scales: Tensor
    mins: Tensor
    shape: tuple[int, ...]
    group_size: int = 128

    def __post_init__(self):
        numel = self.numel
        groups = n_blocks(numel, self.group_size)
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (numel + 1) // 2:
            raise ValueError(f"packed INT4 codes of a {tuple(self.shape)} tensor must be {(numel + 1) // 2} uint8 "
                             f"bytes, got {self.packed.dtype} x {self.packed.numel()}")
        if self.scales.numel() != groups or self.mins.numel() != groups:
            raise ValueError(f"INT4 scales/mins must hold one value per group of {self.group_size} ({groups}), "
                             f"got {self.scales.numel()} / {self.mins.numel()}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def pack(cls, x: Tensor, group_size: int = 128, *, backend: str | None = None) -> PackedInt4:
        """``x`` rounded to the nearest of 16 levels between its group's min and max."""
        packed, scales, mins = pack_int4(x.contiguous(), group_size, backend=backend)
        return cls(packed, scales, mins, tuple(x.shape), group_size)

    def unpack(self, backend: str | None = None) -> Tensor:
        """The fp32 values, in the original shape."""
        flat = unpack_int4(self.packed, self.scales, self.mins, self.numel, self.group_size, backend=backend)
        return flat.view(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held by codes, scales and mins (the shape's few bytes not counted)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.mins))

    # ------------------------------------------------------------------ optimizer state
    @staticmethod
    def keys(name: str) -> tuple[str, ...]:
        """The state keys of a tensor stored under ``name``: ``{name}_int4``, ``_scales``, ``_mins``, ``_shape``."""
        return tuple(f"{name}_{suffix}" for suffix in SUFFIXES)

    @staticmethod
    def stored(state: dict, name: str) -> bool:
        return PackedInt4.keys(name)[0] in state

    def store(self, state: dict, name: str) -> None:
        packed_key, scales_key, mins_key, shape_key = self.keys(name)
        state[packed_key], state[scales_key], state[mins_key] = self.packed, self.scales, self.mins
        state[shape_key] = torch.tensor(self.shape, dtype=torch.int64)

    @classmethod
    def load(cls, state: dict, name: str, group_size: int = 128) -> PackedInt4 | None:
        """The tensor stored under ``name``, or ``None`` when there is none."""
        if not cls.stored(state, name):
            return None
        packed_key, scales_key, mins_key, shape_key = cls.keys(name)
        shape = tuple(int(s) for s in state[shape_key])
        return cls(state[packed_key], state[scales_key], state[mins_key], shape, group_size)
