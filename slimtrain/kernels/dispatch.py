"""Which implementation a kernel call runs: one decision point for all of slimtrain.kernels.

Backends:

* ``"triton"``  -- the Triton kernels (CUDA tensors; CPU tensors only when Triton runs in its
  interpreter, ``TRITON_INTERPRET=1``, which is how the tests exercise them);
* ``"torch"``   -- the eager pure-PyTorch twins in :mod:`.reference`;
* ``"compile"`` -- the same twins fused by ``torch.compile`` (the 8-bit AdamW step; other
  operations fall back to ``"torch"``);
* ``"cpp"``     -- the 8-bit AdamW step as one OpenMP C++ loop (:mod:`.cpu_fused`, the fast
  CPU path, bit-identical to the twin; fp32 tensors, others take ``"compile"``; other
  operations fall back to ``"torch"``).

``"auto"`` (the default) means Triton for CUDA tensors and eager PyTorch elsewhere. Override
for a region with ``with kernel_backend("compile"): ...``, per call with ``backend=``, or
process-wide with the environment variable ``SLIMTRAIN_KERNEL_BACKEND``.
"""

from __future__ import annotations

import contextlib
import functools
import os

from torch import Tensor

BACKENDS = ("auto", "triton", "torch", "compile", "cpp")

_override: list[str] = []


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r} is not one of {BACKENDS}")
    return name


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextlib.contextmanager
def kernel_backend(name: str):
    """Use backend ``name`` for every kernel call inside the ``with`` block."""
    _override.append(_check(name))
    try:
        yield
    finally:
        _override.pop()


def resolve(tensor: Tensor, backend: str | None = None) -> str:
    """The concrete backend ("triton" | "torch" | "compile" | "cpp") for an operation on ``tensor``."""
    name = _check(backend) if backend is not None else (
        _override[-1] if _override else _check(os.environ.get("SLIMTRAIN_KERNEL_BACKEND", "auto"))
    )
    if name == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("kernel backend 'triton' requested but triton is not importable")
        if not tensor.is_cuda and not interpreter_active():
            raise RuntimeError(
                "kernel backend 'triton' on a CPU tensor needs the Triton interpreter "
                "(set TRITON_INTERPRET=1 before importing triton), or use backend 'torch'/'compile'"
            )
    return name

