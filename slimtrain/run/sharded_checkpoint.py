"""FSDP2 checkpoints through ``torch.distributed.checkpoint`` (DCP): every rank writes its shard.

Under ``dist.engine=fsdp`` no rank ever holds the whole model or the whole optimizer state, and
a checkpoint should not make one: the model's ``DTensor`` shards and the optimizer's state go to
``<checkpoint>/dcp/`` with ``dcp.save`` (one ``__{rank}_0.distcp`` file per rank plus DCP's
``.metadata``), each rank writing what it holds. Loading at any world size is DCP's own
resharding wherever the state is a ``DTensor`` (the model, torch AdamW's moments, LISA's inner
AdamW). What DCP cannot re-cut is state that is *not* a DTensor because no placement describes
it: 8-bit codes with one absmax per block of the local shard, GaLore's projected moments on the
local rows. That state is stored per rank (keys ``optim_rank{r}.…``) and, at another world size,
re-cut by :func:`slimtrain.optim.row_state.state_for_rows` (bit-exact copies where blocks align).

Only tensors go through DCP: DCP unpickles non-tensor entries (``torch.load(weights_only=False)``),
so the rest of each rank's ``optimizer.state_dict()`` (param groups, counters; every tensor
replaced by the name of its DCP entry) stays in ``optim_rank{r}.pt`` beside it, which loads with
``torch.load(weights_only=True)``. A single process consolidates the model with DCP as well
(:func:`load_full_model`, used by ``slimtrain eval`` / ``slimtrain export``), and torch's
``dcp_to_torch_save`` turns the directory into one plain ``torch.save`` file.
"""

from __future__ import annotations

import os
import warnings

import torch

from ..optim.row_state import is_replicated, state_for_rows
from ..optim.shards import is_sharded, local
from ..optim.spec import per_parameter_state

DCP_DIR = "dcp"
_DTENSOR, _TENSOR = "dcp:dtensor:", "dcp:tensor:"  # markers in the per-rank skeleton


def _params(optimizer) -> list:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _copied(sd: dict) -> dict:
    """New dicts down to each parameter's state (the live optimizer state stays as it is)."""
    sd = dict(sd)
    if "state" in sd and "param_groups" in sd:
        sd["state"] = {i: dict(st) for i, st in sd["state"].items()}
    else:
        sd["optimizer"] = _copied(sd["optimizer"])
    return sd


def sharded_state(model, optimizer, rank: int, row_state: bool) -> tuple[dict, dict | None]:
    """``(tensors, skeleton)``: the flat dict of tensors this rank hands ``dcp.save`` (the model's
    shards, the optimizer's per-parameter tensors) and, when ``optimizer`` is given, this rank's
    ``optimizer.state_dict()`` with each such tensor replaced by its DCP key.

    ``row_state``: the optimizer declares (``spec.local_shard_state``) that its plain tensors are
    rows of the local shard, stored per rank; otherwise they are taken as replicated (one copy)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    tensors = {f"model.{k}": v for k, v in get_model_state_dict(model).items()}
    if optimizer is None:
        return tensors, None
    skeleton = _copied(optimizer.state_dict())
    for index, st in per_parameter_state(skeleton).items():
        for key, value in st.items():
            if not torch.is_tensor(value):
                continue
            if is_sharded(value):  # DCP reshards it at load
                name, marker = f"optim.{index}.{key}", _DTENSOR
            elif row_state and not is_replicated(key, value):
                name, marker = f"optim_rank{rank}.{index}.{key}", _TENSOR
            else:  # the same on every rank: DCP keeps one copy
                name, marker = f"optim.{index}.{key}", _TENSOR
            tensors[name] = value
            st[key] = marker + name
    return tensors, skeleton


def _template(name: str, meta, like=None):
    """An empty tensor DCP loads ``name`` into: laid out like parameter ``like`` (a DTensor) for
    DTensor entries, whole on CPU otherwise."""
    dtype, size = meta.properties.dtype, tuple(meta.size)
    if like is None:
        return torch.empty(size, dtype=dtype)
    if tuple(like.shape) == size:
        return torch.empty_like(like, dtype=dtype)
    from torch.distributed.tensor import empty

    return empty(size, dtype=dtype, device_mesh=like.device_mesh, placements=like.placements)


def _fill(skeleton: dict, loaded: dict, params: list, keep_dtensors: bool) -> dict:
    """``skeleton`` with its markers replaced by the loaded tensors (plain ones on their
    parameter's device); DTensor entries are dropped unless ``keep_dtensors``."""
    out = _copied(skeleton)
    for index, st in per_parameter_state(out).items():
        for key in list(st):
            value = st[key]
            if not isinstance(value, str) or not value.startswith((_DTENSOR, _TENSOR)):
                continue
            if value.startswith(_DTENSOR):
                if keep_dtensors:
                    st[key] = loaded[value[len(_DTENSOR):]]
                else:
                    del st[key]
                continue
            t = loaded[value[len(_TENSOR):]]
            st[key] = t.to(local(params[index]).device) if t.dim() else t
    return out


def load_sharded_state(path: str, model, optimizer, skeletons: list[dict] | None, rank: int) -> None:
    """Load ``<path>/dcp`` (written at any world size) into ``model`` and ``optimizer`` (this
    run's FSDP2 shards). ``skeletons``: every saved rank's ``optim_rank{r}.pt`` in rank order
    (None: the checkpoint holds no optimizer state here). The same world size loads this rank's
    own entries (bit-exact); another re-cuts the per-rank rows."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    directory = os.path.join(path, DCP_DIR)
    meta = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    model_state = get_model_state_dict(model)
    wanted = {f"model.{k}": v for k, v in model_state.items()}
    params = _params(optimizer) if optimizer is not None else []
    same_world = skeletons is not None and len(skeletons) == torch.distributed.get_world_size()
    read = [skeletons[rank]] if same_world else (skeletons or [])
    for skeleton in read:
        for index, st in per_parameter_state(skeleton).items():
            for value in st.values():
                if isinstance(value, str) and value.startswith(_DTENSOR):
                    name = value[len(_DTENSOR):]
                    wanted.setdefault(name, _template(name, meta[name], like=params[index]))
                elif isinstance(value, str) and value.startswith(_TENSOR):
                    name = value[len(_TENSOR):]
                    wanted.setdefault(name, _template(name, meta[name]))
    dcp.load(wanted, checkpoint_id=directory)
    set_model_state_dict(model, {k: wanted[f"model.{k}"] for k in model_state})
    if optimizer is None:
        return
    if same_world:  # the rows this rank wrote: bit-exact
        optimizer.load_state_dict(_fill(skeletons[rank], wanted, params, keep_dtensors=True))
        return
    # another world size: the per-rank rows re-cut for this rank, DTensor entries as DCP resharded them
    mine = state_for_rows(optimizer, [_fill(s, wanted, params, keep_dtensors=False) for s in skeletons])
    state = per_parameter_state(mine)
    for index, st in per_parameter_state(skeletons[0]).items():
        for key, value in st.items():
            if isinstance(value, str) and value.startswith(_DTENSOR):
                state.setdefault(index, {})[key] = wanted[value[len(_DTENSOR):]]
    optimizer.load_state_dict(mine)


def has_sharded_state(path: str) -> bool:
    return os.path.isdir(os.path.join(path, DCP_DIR))


def load_full_model(path: str, template: dict) -> dict:
    """The whole model of ``<path>/dcp`` in one process (no process group needed): DCP joins the
    saved shards into ``template``'s tensors (a model's ``state_dict()``, keys as saved)."""
    import torch.distributed.checkpoint as dcp

    wanted = {f"model.{k}": torch.empty_like(v) for k, v in template.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(wanted, checkpoint_id=os.path.join(path, DCP_DIR))
    return {k: wanted[f"model.{k}"] for k in template}


__all__ = ["DCP_DIR", "has_sharded_state", "load_full_model", "load_sharded_state", "sharded_state"]
