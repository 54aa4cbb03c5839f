"""Build GaLore parameter groups from a model by module name."""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

ALL_LINEAR = "all-linear"


def _output_layer_names(model: nn.Module) -> set[str]:
    """Module names of the output projection ("all-linear" leaves it out, as PEFT does)."""
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules(remove_duplicate=False):
        if module is out or name.split(".")[-1] in ("lm_head", "score", "classifier"):
            names.add(name)
    return names


def _matches(name: str, module: nn.Module, target, output_names: set[str]) -> bool:
    if target == ALL_LINEAR:
        return isinstance(module, nn.Linear) and name not in output_names
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    # a list of names: a module matches if its name is one of them or ends with ".<item>"
    return any(name == t or name.endswith("." + t) for t in target)


def matching_module_names(model: nn.Module, target_modules) -> list[str]:
    """Names of the modules ``target_modules`` selects (same rules as :func:`galore_param_groups`)."""
    if isinstance(target_modules, (list, tuple, set)):
        target_modules = list(target_modules)
    output_names = _output_layer_names(model)
    names = [n for n, m in model.named_modules() if n and _matches(n, m, target_modules, output_names)]
    if not names:
        sample = [n for n, _ in model.named_modules() if n][:12]
        raise ValueError(f"target_modules={target_modules!r} matched no module. Module names look like: {sample}")
    return names


def galore_param_groups(
    model: nn.Module,
    target_modules: str | Iterable[str] = ALL_LINEAR,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    **galore_kwargs,
) -> list[dict]:
    """Split ``model``'s trainable parameters into ``[regular_group, galore_group]``.

    ``target_modules`` is ``"all-linear"`` (every ``nn.Linear`` but the output layer), a list
    of module names (``["q_proj", "v_proj"]`` matches any module whose name ends with them), or
    a regular expression matched against the full module name. Only >=2-D weights of matched
    modules are projected; their biases stay in the regular group.

    Tied weights (``lm_head.weight is embed_tokens.weight``) appear once, in the GaLore group
    if any of their aliases is targeted, so a tied head is never silently dropped. Raises
    ``ValueError`` when the targets match no module.
    """
    if isinstance(target_modules, (list, tuple, set)):
        target_modules = list(target_modules)
        if not target_modules:
            raise ValueError("target_modules is an empty list; pass 'all-linear', names or a regex")
    elif not isinstance(target_modules, str):
        raise ValueError(f"target_modules={target_modules!r} must be 'all-linear', a list of names or a regex")
    output_names = _output_layer_names(model)

    galore_ids: set[int] = set()
    matched_modules = []
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or not _matches(name, module, target_modules, output_names):
            continue
        matched_modules.append(name)
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad and p.dim() >= 2:
                galore_ids.add(id(p))
    if not galore_ids:
        sample = [n for n, _ in model.named_modules() if n][:12]
        what = "modules but none has a trainable >=2-D weight" if matched_modules else "no module"
        raise ValueError(
            f"target_modules={target_modules!r} matched {what}. Module names look like: {sample}"
        )

    seen: set[int] = set()
    regular, galore = [], []
    for p in model.parameters():  # parameters() de-duplicates tied weights
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (galore if id(p) in galore_ids else regular).append(p)
    groups = [{"params": regular}] if regular else []
    groups.append(
        {
            "params": galore,
            "rank": rank,
            "update_proj_gap": update_proj_gap,
            "scale": scale,
            "proj_type": proj_type,
            **galore_kwargs,
        }
    )
    return groups
