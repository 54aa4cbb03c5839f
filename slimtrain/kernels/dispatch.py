"""Which implementation a kernel call runs: the one decision point for all of slimtrain.kernels.

Backends:

* ``"triton"``  -- the Triton kernels (CUDA tensors; CPU tensors only when Triton runs in its
  interpreter, ``TRITON_INTERPRET=1``, which is how the tests exercise them);
* ``"torch"``   -- the eager pure-PyTorch twins in :mod:`.reference`;
* ``"compile"`` -- the same twins fused by ``torch.compile`` (the 8-bit AdamW step; other
  operations fall back to ``"torch"``);
* ``"cpp"``     -- the 8-bit AdamW step as one C++ loop (:mod:`.cpu_fused`: AVX2 when the CPU
  has it, torch's intra-op threads; bit-identical to the twin); other operations fall back to
  ``"torch"``.

The backend asked for comes from, in this order: the call's ``backend=`` argument, the
innermost ``with kernel_backend(name): ...`` region, the environment variable
``SLIMTRAIN_KERNEL_BACKEND``, else ``"auto"``. It is resolved to a concrete backend here and
nowhere else (the operations in :mod:`.ops` only run what they are told):

* every operation (:func:`resolve`): ``"auto"`` is Triton for CUDA tensors (when triton
  imports) and eager PyTorch elsewhere; an explicit name is honoured, ``"triton"`` on a CPU
  tensor only under the interpreter (else a ``RuntimeError`` naming the fix);
* the 8-bit AdamW step (:func:`resolve_step`) decides with all its tensors in view:

  ==========  ==========================================  =====================================
  asked for   runs                                        when that cannot run
  ==========  ==========================================  =====================================
  ``auto``    ``cpp`` on CPU (the C++ step builds here,   ``torch`` (no compile wait)
              grad and written tensor fp32, contiguous);
              ``triton`` on CUDA
  ``cpp``     ``cpp`` under the same conditions           ``compile`` (handles every dtype and
                                                          layout) when the C++ step builds,
                                                          else ``torch``
  ``torch`` / ``compile`` / ``triton``: as asked
  ==========  ==========================================  =====================================

  ``cpp`` is the CPU default because it is bit-identical to the twin and faster than
  ``torch.optim.AdamW`` (docs/benchmarks.md section 4); its first use builds it (~0.5-1.2 min,
  then torch's extension cache has it), and a failed build is warned about once.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
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


def requested(backend: str | None = None) -> str:
    """The backend asked for, before "auto" is resolved: the argument, else the innermost
    :func:`kernel_backend` region, else ``SLIMTRAIN_KERNEL_BACKEND``, else "auto"."""
    return _check(backend) if backend is not None else (
        _override[-1] if _override else _check(os.environ.get("SLIMTRAIN_KERNEL_BACKEND", "auto"))
    )


def resolve_step(param: Tensor, backend: str | None = None, *, grad: Tensor | None = None,
                 out: Tensor | None = None) -> str:
    """The concrete backend of one 8-bit AdamW step (see the table in the module docstring).

    ``param`` is the parameter (its device decides "auto" unless ``out`` is given, then the
    gradient's does); ``grad`` defaults to ``param``; ``out`` is the direction buffer of the
    out mode. The C++ step needs fp32 contiguous CPU tensors for the gradient and for the
    tensor it writes (``param``, or ``out``).
    """
    from . import cpu_fused  # imports no compiler: the build happens in available()

    grad = param if grad is None else grad
    asked = requested(backend)
    if asked == "auto" and not (param if out is None else grad).is_cuda:
        name = "cpp" if cpu_fused.available() else "torch"
    else:
        name = resolve(param if out is None else grad, backend)
    if name != "cpp":
        return name
    written = param if out is None else out
    fp32 = all(t.dtype == torch.float32 and t.is_contiguous() for t in (grad, written))
    if fp32 and not grad.is_cuda and cpu_fused.available():
        return "cpp"
    # Half-precision or strided tensors, or no C++ build: asked for explicitly, the compiled
    # twin (handles every layout); by default, the eager twin (no compile wait).
    return "compile" if asked == "cpp" and cpu_fused.available() else "torch"


def resolve(tensor: Tensor, backend: str | None = None) -> str:
    """The concrete backend ("triton" | "torch" | "compile" | "cpp") for an operation on ``tensor``."""
    name = requested(backend)
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

