"""Optimizer state of FSDP2 row shards, carried to another world size.

Under FSDP2 an optimizer that steps on local shards (8-bit AdamW, the GaLore family, LISA over
them) keeps per-parameter state for the rows its rank holds: moments shaped like the local rows
(or their GaLore projection, ``(rows, r)``), 8-bit codes plus one absmax per block of the local
shard, and replicated pieces (projectors, step counters). A checkpoint keeps one state file per
rank, which resumes bit-exactly at the same world size. At another world size,
:func:`state_for_rows` rebuilds this rank's state from all the saved files:

* row tensors (dim 0 = the saved shard's rows) are concatenated in rank order (FSDP2's
  ``Shard(0)`` puts rank k's rows k-th) and sliced to this rank's rows;
* 8-bit moments are *re-blocked*: where the new rows start on the saved blocks' boundaries (e.g.
  every row a whole number of blocks), codes and scales are copied bit for bit; otherwise each
  saved shard is dequantized with its own blocks, the fp32 rows are joined and sliced, and
  quantized on this rank's blocks (deterministic, within one quantization step of the saved
  values);
* replicated tensors (projectors, ``step``, Adafactor's column moment, counters: 0-d or named
  in ``REPLICATED``) are taken from rank 0; the non-finite counter of 8-bit tensors goes to the new rank 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import Blockwise8bit
from .adamw8bit import EXP_AVG, EXP_AVG_SQ, SKIPPED
from .shards import local, row_range
from .spec import per_parameter_state

# GaLore's projector pieces, every step counter, and Adafactor's column second moment (the
# column means over all rows: the same on every rank)
REPLICATED = ("proj_", "step", "exp_avg_sq_col")
SIGNED = {EXP_AVG: True, EXP_AVG_SQ: False}  # the dynamic map each 8-bit moment uses
_CODES, _ABSMAX = Blockwise8bit.keys("")


def is_replicated(key: str, value) -> bool:
    """Whether per-parameter state entry ``key`` is the same on every rank (not rows of the shard)."""
    return not torch.is_tensor(value) or value.dim() == 0 or key.startswith(REPLICATED)


def _pieces(states: list[dict]) -> dict[str, list]:
    """Every saved rank's per-row tensors of one parameter, by key; an 8-bit moment appears once,
    under its name, as the ranks' ``(codes, absmax)`` pairs."""
    out: dict[str, list] = {}
    for state in states:
        for key, value in state.items():
            if is_replicated(key, value) or key == SKIPPED or key.endswith(_ABSMAX):
                continue
            if key.endswith(_CODES):
                name = key[: -len(_CODES)]
                out.setdefault(name, []).append((state[name + _CODES], state[name + _ABSMAX]))
            else:
                out.setdefault(key, []).append(value)
    return out


def _reblock(pairs: list[tuple[Tensor, Tensor]], signed: bool, block_size: int, first: int, end: int) -> Blockwise8bit:
    """Rows ``first:end`` of the 8-bit tensor whose row shards are ``pairs`` (codes, absmax).

    When every saved shard is a whole number of blocks and the new rows start (and end, or reach
    the end) on a block boundary, the blocks are the same ones: codes and scales are copied, bit
    for bit. Otherwise the fp32 values are rebuilt and quantized on the new blocks."""
    codes = torch.cat([c for c, _ in pairs])
    width = codes[0].numel() if codes.dim() > 1 and len(codes) else 1
    lo, hi, total = first * width, end * width, codes.numel()
    aligned = (all(c.numel() % block_size == 0 for c, _ in pairs[:-1]) and lo % block_size == 0
               and (hi % block_size == 0 or hi == total))
    if aligned:
        absmax = torch.cat([a for _, a in pairs])
        blocks = slice(lo // block_size, -(-hi // block_size))
        return Blockwise8bit(codes[first:end].clone(), absmax[blocks].clone(), signed, block_size)
    values = torch.cat([Blockwise8bit(c, a, signed, block_size).dequantize(backend="torch") for c, a in pairs])
    return Blockwise8bit.quantize(values[first:end], signed=signed, block_size=block_size, backend="torch")


def state_for_rows(optimizer, saved: list[dict]) -> dict:
    """This rank's ``optimizer.state_dict()``-shaped state from the per-rank state dicts ``saved``
    (written at any world size by ranks holding dim-0 shards of the same parameters).

    ``optimizer``'s parameters are this rank's DTensor shards; their row ranges say which rows to
    keep. Parameters are matched by index, as ``load_state_dict`` matches them."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    block_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            block_of[id(p)] = group.get("block_size")
    out = _copy_levels(saved[0])
    state = per_parameter_state(out)
    state.clear()
    indices = sorted({i for s in saved for i in per_parameter_state(s)})
    for index in indices:
        p = params[index]
        per_rank = [per_parameter_state(s)[index] for s in saved if index in per_parameter_state(s)]
        first, end = row_range(p)
        mine = {k: v for k, v in per_rank[0].items() if is_replicated(k, v)}
        block_size = block_of[id(p)]
        for key, rows in _pieces(per_rank).items():
            if key in SIGNED and isinstance(rows[0], tuple):  # an 8-bit moment
                _reblock(rows, SIGNED[key], block_size, first, end).store(mine, key)
            else:
                mine[key] = torch.cat(rows)[first:end].clone().to(local(p).device)
        if any(SKIPPED in s for s in per_rank):
            counted = sum(int(s[SKIPPED].sum()) for s in per_rank if SKIPPED in s)
            mine[SKIPPED] = torch.tensor([counted if first == 0 else 0], dtype=torch.int32)
        state[index] = mine
    return out


def _copy_levels(sd: dict) -> dict:
    """New dicts down to the per-parameter ``state`` mapping (the tensors are shared)."""
    sd = dict(sd)
    if "state" in sd and "param_groups" in sd:
        sd["state"] = dict(sd["state"])
    else:
        sd["optimizer"] = _copy_levels(sd["optimizer"])
    return sd


__all__ = ["is_replicated", "state_for_rows"]
