"""Build a model without ever holding it in fp32: parameters on the ``meta`` device, then filled
module by module straight into the training format.

A model built this way costs its final footprint plus one tensor in flight (the fp32 values of
the tensor being filled): bf16 weights, or INT8 codes + group scales for the linear layers that
Q-GaLore trains (:class:`slimtrain.optim.QuantLinear`). The values come from

* :class:`SeededInit`: a preset's initialisation, one generator per tensor seeded from
  ``(seed, parameter name)``, so a tensor's values depend on neither the build order nor the
  device it is built on (the eager build, :func:`seeded_init_`, draws the same numbers); or
* :class:`SafetensorsCheckpoint`: a (sharded) safetensors checkpoint read lazily with
  ``safetensors.safe_open``, one tensor at a time; its shapes are checked against the model
  before anything is read, naming the first tensor that does not match.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from ..optim.qgalore import QuantLinear, quantize_rtn
from .config import ConfigError

# Linear layers kept dense when the others become INT8 (as Q-GaLore does for the output head).
INT8_EXCLUDE = ("lm_head",)


# ---------------------------------------------------------------------------- seeded values
def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from the run seed and the parameter's name (stable across runs,
    processes and Python's hash randomisation)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_value(name: str, shape: torch.Size | tuple, seed: int, std: float) -> Tensor:
    """The fp32 initial value of parameter ``name``: N(0, std) for matrices (Llama's linear and
    embedding layers, as transformers' ``_init_weights``), zeros for biases, ones for the other
    vectors (RMSNorm / LayerNorm gains)."""
    if len(shape) >= 2:
        g = torch.Generator().manual_seed(tensor_seed(seed, name))
        return torch.randn(tuple(shape), generator=g).mul_(std)
    if name.endswith("bias"):
        return torch.zeros(tuple(shape))
    return torch.ones(tuple(shape))


class SeededInit:
    """Values source for a preset: :func:`seeded_value` per parameter name."""

    def __init__(self, seed: int, std: float = 0.02):
        self.seed, self.std = seed, std

    def check(self, model: nn.Module) -> None:
        pass

    def __call__(self, name: str, shape: torch.Size) -> Tensor:
        return seeded_value(name, shape, self.seed, self.std)


@torch.no_grad()
def seeded_init_(model: nn.Module, seed: int, std: float = 0.02) -> nn.Module:
    """Overwrite every parameter of an (eagerly built, dense) ``model`` with :func:`seeded_value`:
    the eager twin of ``materialize_(model, SeededInit(seed, std), ...)``."""
    for name, p in model.named_parameters():
        p.copy_(seeded_value(name, p.shape, seed, std))
    return model


# ---------------------------------------------------------------------------- checkpoint values
class SafetensorsCheckpoint:
    """Values source reading ``model.safetensors`` or the shards named by
    ``model.safetensors.index.json`` in ``path``, one tensor per read (``safe_open`` maps the
    file; nothing else of it is loaded)."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self.files = {name: os.path.join(path, shard) for name, shard in weight_map.items()}
        elif os.path.exists(single):
            from safetensors import safe_open

            with safe_open(single, framework="pt") as f:
                self.files = {name: single for name in f.keys()}
        else:
            raise ConfigError(f"{path!r} has neither model.safetensors nor model.safetensors.index.json; lazy "
                              "loading reads safetensors only (convert .bin checkpoints with save_pretrained)")
        self.path = path

    def shape(self, name: str) -> tuple[int, ...] | None:
        from safetensors import safe_open

        if name not in self.files:
            return None
        with safe_open(self.files[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def check(self, model: nn.Module) -> None:
        """Every parameter of ``model`` is in the checkpoint with the model's shape (tied weights
        may be absent); raises naming the first tensor that is missing or mismatched."""
        tied = _tied_names(model)
        for name, p in model.named_parameters(remove_duplicate=False):
            shape = self.shape(name)
            if shape is None:
                if name in tied:
                    continue
                raise ConfigError(f"checkpoint {self.path!r} has no tensor {name!r} that the model config needs "
                                  f"(shape {tuple(p.shape)}); is it the checkpoint of this model?")
            if shape != tuple(p.shape):
                raise ConfigError(f"checkpoint {self.path!r}: tensor {name!r} has shape {shape} but the model "
                                  f"config makes it {tuple(p.shape)}; the config (hidden size, layers, vocabulary) "
                                  "does not describe this checkpoint")

    def __call__(self, name: str, shape: torch.Size) -> Tensor:
        from safetensors import safe_open

        # One open per tensor: the mapping is dropped as soon as the tensor is copied out, so
        # the pages read stay out of the process's resident set.
        with safe_open(self.files[name], framework="pt") as f:
            return f.get_tensor(name)


def _tied_names(model: nn.Module) -> set[str]:
    """Names under which an already-seen parameter appears again (tied embeddings)."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied


# ---------------------------------------------------------------------------- meta building
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def unmap_large_allocations(threshold: int = 1 << 20) -> bool:
    """Have glibc serve every allocation of ``threshold`` bytes or more with its own mapping,
    returned to the system when freed.

    By default glibc raises this threshold each time a large block is freed, after which
    tensors of one layer's size come from the heap, where the blocks freed between the
    long-lived tensors (weights, states) stay resident: building a model tensor by tensor
    then ends with the freed transients still counted in RSS (measured: Llama-350m INT8 ended
    at 1.9 GiB instead of 0.9). Fixing the threshold keeps the footprint at what is alive.
    Returns whether it was applied (glibc only).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1)
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the ``meta`` device (no memory, no init
    work), while buffers (rotary frequencies) are computed for real, as usual."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            kind = type(module._parameters[name])
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _int8_target(full_name: str, module: nn.Module, exclude: tuple[str, ...]) -> bool:
    return type(module) is nn.Linear and not any(full_name == e or full_name.endswith("." + e) for e in exclude)


@torch.no_grad()
def materialize_(model: nn.Module, values: Callable[[str, torch.Size], Tensor], dtype: torch.dtype, *,
                 int8_group_size: int | None = None, int8_exclude: tuple[str, ...] = INT8_EXCLUDE,
                 device: str | torch.device = "cpu", progress: bool = False) -> nn.Module:
    """Fill every ``meta`` parameter of ``model`` (in place) from ``values(name, shape)``.

    Dense parameters become ``dtype``. With ``int8_group_size``, every ``nn.Linear`` except
    ``int8_exclude`` is replaced by a :class:`QuantLinear` whose codes are quantized (round to
    nearest) from the value cast to ``dtype`` -- the same codes as building dense in ``dtype``
    and calling :func:`slimtrain.optim.quantize_weights`. Tied parameters stay tied. One
    module's tensors are in flight at a time; ``values.check(model)`` runs first, so a
    checkpoint that does not fit fails before anything is allocated.
    """
    check = getattr(values, "check", None)
    if check is not None:
        check(model)
    done: dict[int, nn.Parameter] = {}  # id(meta param) -> its materialised replacement (ties)
    modules = list(model.named_modules())
    if progress:
        from tqdm import tqdm

        modules = tqdm(modules, desc="materialize", unit="module")
    parents = {id(m): (parent, child) for _, parent in model.named_modules() for child, m in parent.named_children()}
    for name, module in modules:
        prefix = f"{name}." if name else ""
        if int8_group_size is not None and _int8_target(name, module, int8_exclude):
            codes, scales = quantize_rtn(values(prefix + "weight", module.weight.shape).to(dtype), int8_group_size)
            bias = None
            if module.bias is not None:
                bias = nn.Parameter(values(prefix + "bias", module.bias.shape).to(dtype=dtype, device=device))
            q = QuantLinear.from_codes(codes.to(device), scales.to(device), bias, int8_group_size)
            parent, child = parents[id(module)]
            setattr(parent, child, q)
            continue
        for pname, p in list(module._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if id(p) in done:
                module._parameters[pname] = done[id(p)]
                continue
            value = values(prefix + pname, p.shape).to(dtype=dtype, device=device)
            new = type(p)(value, requires_grad=p.requires_grad)
            done[id(p)] = new
            module._parameters[pname] = new
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    left += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if left:
        raise RuntimeError(f"materialize_ left {left[:3]} on the meta device")
    return model
