"""Checkpoints that a crash cannot corrupt and that resume bit-exactly.

Layout: ``<output_dir>/checkpoints/step_00000040/`` holding

- ``model.pt``   model ``state_dict``
- ``optim.pt``   optimizer ``state_dict`` (GaLore projectors and quantized states are tensors in it);
  with slimtrain's optimizer-state sharding (``dist.zero_stage`` 1/2 on the torch path) each
  rank writes its shard instead, ``optim_rank{r}.pt``, with the owner of every tensor
- ``trainer.pt`` step, data position, scheduler, NaN-skip counter, resolved config
- ``rng_rank{r}.pt`` every rank's RNG states (torch, CUDA, Python ``random``, NumPy) as tensors

Every file loads with ``torch.load(weights_only=True)``. A checkpoint is written into
``tmp.step_...`` and renamed into place only when every rank has written and fsynced its
files, so a crash mid-save leaves the previous checkpoints untouched; leftovers of an
interrupted save are removed by the next save. With ZeRO >= 1 (partitioned optimizer state)
the model and optimizer are written by the DeepSpeed engine in its own format under
``deepspeed/`` in the same directory, inside the same atomic rename.
"""

from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

CKPT_RE = re.compile(r"^step_(\d{8})$")


# ---------------------------------------------------------------------------- RNG states as tensors
def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python_version": version,
        "python_mt": torch.tensor(mt, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
    }
    assert np_name == "MT19937"
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(int(x) for x in state["python_mt"].tolist()),
                     state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- files
def _save_file(obj, path: str) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoints under ``root``, oldest first (``tmp.*`` leftovers are not checkpoints)."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if CKPT_RE.match(n))
    return [os.path.join(root, n) for n in names]


def latest_checkpoint(root: str) -> str | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _all_ok(ok: bool) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(flag)
    return int(flag) == 0


def save_checkpoint(root: str, step: int, *, rank: int, model_state=None, optim_state=None, trainer_state=None,
                    engine=None, keep: int = 2, rank_files: dict | None = None) -> str:
    """Write checkpoint ``step`` atomically; every rank calls this. Returns the final directory.

    ``rank_files`` maps a name to this rank's object, written as ``{name}_rank{rank}.pt``.

    Raises ``OSError`` (on every rank) when any rank failed to write, after removing the partial
    temporary directory; earlier checkpoints are left as they were.
    """
    final = os.path.join(root, f"step_{step:08d}")
    tmp = os.path.join(root, f"tmp.step_{step:08d}")
    error: BaseException | None = None
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            for name in os.listdir(root):  # leftovers of an interrupted save
                if name.startswith("tmp."):
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            os.makedirs(tmp)
        except OSError as e:
            error = e
    if not _all_ok(error is None):
        raise error or OSError(f"rank 0 could not create {tmp!r}")
    try:
        if engine is not None:  # ZeRO-partitioned state: the engine's format, every rank writes its part
            engine.save_checkpoint(os.path.join(tmp, "deepspeed"), tag="state", save_latest=False)
        _save_file(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
        for name, obj in (rank_files or {}).items():
            _save_file(obj, os.path.join(tmp, f"{name}_rank{rank}.pt"))
        if rank == 0:
            if model_state is not None:
                _save_file(model_state, os.path.join(tmp, "model.pt"))
            if optim_state is not None:
                _save_file(optim_state, os.path.join(tmp, "optim.pt"))
            _save_file(trainer_state, os.path.join(tmp, "trainer.pt"))
    except OSError as e:
        error = e
    ok = _all_ok(error is None)
    if rank == 0:
        if ok:
            try:
                _fsync_dir(tmp)
                if os.path.exists(final):  # re-saving a step after resume: move the old one aside first
                    old = os.path.join(root, f"tmp.old.step_{step:08d}")
                    os.replace(final, old)
                    os.replace(tmp, final)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, final)
                _fsync_dir(root)
                for stale in list_checkpoints(root)[:-keep]:
                    shutil.rmtree(stale, ignore_errors=True)
            except OSError as e:
                error, ok = e, False
        if not ok:
            shutil.rmtree(tmp, ignore_errors=True)
    ok = _all_ok(ok)
    if not ok:
        raise error or OSError(f"another rank failed to write checkpoint step {step}")
    return final


def resolve_resume(root: str, resume: str | bool) -> str:
    """The checkpoint directory ``--resume`` names: ``True`` is the newest one under ``root``."""
    path = latest_checkpoint(root) if resume is True else str(resume)
    if path is None or not os.path.isdir(path):
        raise FileNotFoundError(
            f"--resume: no checkpoint at {resume if resume is not True else root!r}; start without --resume or "
            "pass a checkpoint directory (…/checkpoints/step_NNNNNNNN)")
    return path


def load_file(ckpt: str, name: str):
    return torch.load(os.path.join(ckpt, name), map_location="cpu", weights_only=True)


def load_rank_files(ckpt: str, name: str) -> list:
    """Every rank's ``{name}_rank{r}.pt`` in rank order (empty when the checkpoint has none)."""
    out = []
    while os.path.exists(os.path.join(ckpt, f"{name}_rank{len(out)}.pt")):
        out.append(load_file(ckpt, f"{name}_rank{len(out)}.pt"))
    return out
