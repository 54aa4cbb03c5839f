"""Checks every slimtrain optimizer runs in ``load_state_dict`` before touching its state.

torch's ``Optimizer.load_state_dict`` only checks the number of parameter groups and of
parameters per group. A state saved for other shapes, by another optimizer, or in another
layout would then either crash later with a ``KeyError`` or, worse, keep stepping with
wrong-sized 8-bit codes. Here, before anything is loaded:

- the dict must be a torch-style optimizer state (``state`` + ``param_groups``); a LISA or
  MeZO dict handed to another class is named as such;
- a ``slimtrain_format`` marker (every slimtrain class writes its class name into its
  ``state_dict``) must name this class;
- each parameter's state must fit the parameter: moments (``exp_avg``, ``exp_avg_sq``, 8-bit
  codes) shaped like the gradient the optimizer sees (the parameter, or its GaLore projection),
  block scales counted for that many elements, factored Adafactor rows / columns, projectors
  whose outer dimension matches the weight, 8-bit codes stored as 8-bit integers, floating
  moments as floating point; a tensor that this class keeps in 8 bits must not arrive with
  fp32 moments (a ``torch.optim.AdamW`` state).

Errors are ``ValueError`` naming the class, the parameter (index in ``param_groups`` order, and
its shape) and what differs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .shards import local

FORMAT_KEY = "slimtrain_format"

# moment-like keys: shaped like the gradient the optimizer sees
_MOMENTS = ("exp_avg", "exp_avg_sq", "exp_avg_codes", "exp_avg_sq_codes")
_CODES = ("exp_avg_codes", "exp_avg_sq_codes")
_ABSMAX = ("exp_avg_absmax", "exp_avg_sq_absmax")


def mark(state_dict: dict, optimizer) -> dict:
    """Add this optimizer's format marker (its class name) to its ``state_dict``."""
    state_dict[FORMAT_KEY] = type(optimizer).__name__
    return state_dict


def check_params_supported(optimizer) -> None:
    """Refuse complex parameters (the update math treats tensors as real: an imaginary part would
    never move), naming the parameter index."""
    name = type(optimizer).__name__
    for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        if p.is_complex():
            raise ValueError(f"{name}: parameter {i} (shape {tuple(p.shape)}) is complex ({p.dtype}); {name} "
                             "supports real floating-point parameters only (torch.view_as_real(p) gives a real view)")


def _proj_shape(st: dict, key: str) -> tuple[int, ...] | None:
    """A projector's shape: the tensor's, or the recorded one of a packed (INT4) projector."""
    if torch.is_tensor(st.get(key)):
        return tuple(st[key].shape)
    if torch.is_tensor(st.get(f"{key}_shape")):
        return tuple(int(s) for s in st[f"{key}_shape"].tolist())
    return None


def _seen_shape(p: Tensor, group: dict, st: dict) -> tuple[int, ...]:
    """Shape of the gradient the optimizer keeps moments for: the GaLore projection if any."""
    left, right = _proj_shape(st, "proj_left"), _proj_shape(st, "proj_right")
    if "rank" not in group or p.dim() < 2 or (left is None and right is None):
        return tuple(local(p).shape)  # an FSDP2 shard keeps moments for the rows it holds
    m, n = local(p).shape[0], math.prod(p.shape[1:])  # an FSDP2 shard: its own rows
    rows = left[1] if left is not None else m
    cols = right[0] if right is not None else n
    return (rows, cols)


def _param_problem(p: Tensor, group: dict, st: dict, block_size: int | None, min_8bit_size: int | None) -> str | None:
    for key, value in st.items():
        if torch.is_tensor(value) and value.is_complex():
            return f"state {key!r} is complex"
    if "rank" in group and p.dim() >= 2:
        m, n = p.shape[0], math.prod(p.shape[1:])
        left, right = _proj_shape(st, "proj_left"), _proj_shape(st, "proj_right")
        if left is not None and (len(left) != 2 or left[0] != m):
            return f"proj_left has shape {left}, expected ({m}, r) for a ({m}, {n}) weight"
        if right is not None and (len(right) != 2 or right[1] != n):
            return f"proj_right has shape {right}, expected (r, {n}) for a ({m}, {n}) weight"
    shape = _seen_shape(p, group, st)
    for key in _MOMENTS:
        if key in st and tuple(local(st[key]).shape) != shape:  # DTensor state: its shard, like the param's
            return f"state {key!r} has shape {tuple(local(st[key]).shape)}, expected {shape}"
    for key in _CODES:
        if key in st and st[key].is_floating_point():
            return f"state {key!r} has dtype {st[key].dtype}, expected 8-bit integer codes"
    for key in ("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col") + _ABSMAX:
        if key in st and not st[key].is_floating_point():
            return f"state {key!r} has dtype {st[key].dtype}, expected floating point"
    if block_size is not None:
        blocks = math.ceil(math.prod(shape) / block_size) if shape else 1
        for key in _ABSMAX:
            if key in st and st[key].numel() != blocks:
                return (f"state {key!r} has {st[key].numel()} block scales, expected {blocks} for {math.prod(shape)} "
                        f"elements in blocks of {block_size}")
        if min_8bit_size is not None and math.prod(shape) >= min_8bit_size and "exp_avg" in st and "exp_avg_codes" not in st:
            return (f"state holds fp32 moments ({sorted(st)}), but this optimizer keeps 8-bit moments for tensors of "
                    f">= min_8bit_size={min_8bit_size} elements (was it saved by torch.optim.AdamW or a 32-bit optimizer?)")
    if "exp_avg_sq_row" in st and tuple(st["exp_avg_sq_row"].shape) != shape[:-1]:
        return f"state 'exp_avg_sq_row' has shape {tuple(st['exp_avg_sq_row'].shape)}, expected {shape[:-1]}"
    if "exp_avg_sq_col" in st and tuple(st["exp_avg_sq_col"].shape) != shape[:-2] + shape[-1:]:
        return (f"state 'exp_avg_sq_col' has shape {tuple(st['exp_avg_sq_col'].shape)}, "
                f"expected {shape[:-2] + shape[-1:]}")
    return None


def check_state_dict(optimizer, state_dict, *, nested: str | None = None) -> None:
    """Raise ``ValueError`` if ``state_dict`` cannot be loaded into ``optimizer`` as it is
    (see the module docstring). ``nested``: the key of a wrapper's inner torch-style dict."""
    name = type(optimizer).__name__
    if not isinstance(state_dict, dict):
        raise ValueError(f"{name}.load_state_dict: expected a dict, got {type(state_dict).__name__}")
    fmt = state_dict.get(FORMAT_KEY)
    if fmt is None:  # older checkpoints carry no marker: recognise the other families by their layout
        fmt = "LISA" if "lisa" in state_dict else "MeZO" if "zo" in state_dict else None
    if fmt is not None and fmt != name:
        raise ValueError(f"{name}.load_state_dict: this state_dict was saved by {fmt}, not {name}; load it into "
                         f"{fmt} (the optimizer of the run that saved it) or start without it")
    inner = state_dict.get(nested) if nested else state_dict
    if not isinstance(inner, dict) or "state" not in inner or "param_groups" not in inner:
        keys = sorted(state_dict)
        raise ValueError(f"{name}.load_state_dict: not an optimizer state_dict of the expected form (keys {keys}; "
                         f"expected {[nested] if nested else ['state', 'param_groups']})")
    target = getattr(optimizer, "optimizer", optimizer) if nested else optimizer
    groups, saved = target.param_groups, inner["param_groups"]
    if len(groups) != len(saved):
        raise ValueError(f"{name}.load_state_dict: the state has {len(saved)} parameter group(s), this optimizer "
                         f"{len(groups)}")
    index = 0
    for gi, (group, sgroup) in enumerate(zip(groups, saved)):
        if len(group["params"]) != len(sgroup["params"]):
            raise ValueError(f"{name}.load_state_dict: parameter group {gi} has {len(sgroup['params'])} parameters in "
                             f"the state, {len(group['params'])} here")
        block = group.get("block_size")
        for p, pid in zip(group["params"], sgroup["params"]):
            st = inner["state"].get(pid) or {}
            problem = _param_problem(p, group, st, block, group.get("min_8bit_size")) if st else None
            if problem is not None:
                raise ValueError(f"{name}.load_state_dict: parameter {index} (group {gi}, shape {tuple(p.shape)}): "
                                 f"{problem}")
            index += 1


__all__ = ["FORMAT_KEY", "mark", "check_state_dict", "check_params_supported"]
