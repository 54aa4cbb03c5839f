"""Keep optimizer state in the dtypes it was saved with across ``load_state_dict``."""

from __future__ import annotations

import torch
from torch.optim import Optimizer


def restore_state_dtypes(optimizer: Optimizer, state_dict: dict) -> None:
    """Undo torch's cast of loaded floating state to the parameter dtype.

    ``Optimizer.load_state_dict`` casts every floating state tensor (except ``step``) to its
    parameter's dtype, calling ``Optimizer._process_value_according_to_param_policy`` by class
    name, so a subclass override of that hook is never used. An fp32 absmax or moment of a
    bf16 parameter would lose precision; this puts back the saved tensors' own dtypes (from
    the saved values, not by re-widening the cast ones).
    """
    saved_state = state_dict["state"]
    for saved_group, group in zip(state_dict["param_groups"], optimizer.param_groups):
        for pid, p in zip(saved_group["params"], group["params"]):
            for key, value in saved_state.get(pid, {}).items():
                current = optimizer.state[p].get(key)
                if torch.is_tensor(value) and torch.is_tensor(current) and current.dtype != value.dtype:
                    # a copy: the caller may keep using (and mutating) its state_dict
                    optimizer.state[p][key] = value.to(device=current.device, copy=True)
