"""Checkpoints that a crash cannot corrupt and that resume bit-exactly.

Layout: ``<output_dir>/checkpoints/step_00000040/`` holding

- ``model.pt``   model ``state_dict``
- ``optim.pt``   optimizer ``state_dict`` (GaLore projectors and quantized states are tensors in it);
  with slimtrain's optimizer-state sharding (``dist.zero_stage`` 1/2 on the torch path) each
  rank writes its shard instead, ``optim_rank{r}.pt``, with the owner of every tensor
- ``trainer.pt`` step, data position, scheduler, NaN-skip counter, resolved config
- ``rng_rank{r}.pt`` every rank's RNG states (torch, CUDA, Python ``random``, NumPy) as tensors
- ``dcp/`` (``dist.engine=fsdp``, instead of ``model.pt``) the model's and optimizer's shards,
  written by ``torch.distributed.checkpoint``

Every ``.pt`` file loads with ``torch.load(weights_only=True)``. Next to them, ``manifest.json`` lists
every file with its size and SHA-256 (hashed from disk after the fsync); :func:`verify_checkpoint`
re-hashes them, so a truncated, emptied or bit-flipped file is caught before it is loaded, and
:func:`latest_good_checkpoint` falls back to the newest checkpoint that verifies (warning about
each one it skips). A checkpoint is only written from finite tensors (:class:`NonFiniteState`
otherwise), and rotation (``keep``) never deletes the newest verified-good checkpoint.

A checkpoint is written into
``tmp.step_...`` and renamed into place only when every rank has written and fsynced its
files, so a crash mid-save leaves the previous checkpoints untouched; leftovers of an
interrupted save are removed by the next save. With ZeRO >= 1 (partitioned optimizer state)
the model and optimizer are written by the DeepSpeed engine in its own format under
``deepspeed/`` in the same directory, inside the same atomic rename. Under FSDP2 every rank
writes its shards of the model and optimizer state with ``torch.distributed.checkpoint`` under
``dcp/`` (see :mod:`.sharded_checkpoint`: tensors only; each rank's ``optim_rank{r}.pt`` keeps
the rest), also inside the rename and listed in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch
import torch.distributed as dist

CKPT_RE = re.compile(r"^step_(\d{8})$")
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was asked for; the message names it and the fix."""


class NonFiniteState(ValueError):
    """A state to be checkpointed holds NaN/Inf; the message names the first such tensor."""


# ---------------------------------------------------------------------------- finiteness
def first_non_finite(obj, prefix: str = "") -> str | None:
    """Name (dotted path) of the first floating tensor / float in ``obj`` with a NaN or Inf, else None."""
    if torch.is_tensor(obj):
        obj = obj.to_local() if hasattr(obj, "to_local") else obj  # a DTensor: this rank's shard
        if (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all()):
            return prefix or "tensor"
        return None
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (prefix or "value")
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        bad = first_non_finite(v, f"{prefix}.{k}" if prefix else str(k))
        if bad is not None:
            return bad
    return None


def check_finite(obj, what: str) -> None:
    """Raise :class:`NonFiniteState` naming the first non-finite tensor of ``obj``."""
    bad = first_non_finite(obj)
    if bad is not None:
        raise NonFiniteState(f"{what} holds non-finite values ({bad}); refusing to write it as a checkpoint")


# ---------------------------------------------------------------------------- manifest
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files_under(path: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(path):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), path)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(path: str, step: int) -> None:
    """Record every file of checkpoint directory ``path`` with its size and SHA-256 in
    ``manifest.json``: files this process wrote are hashed as they were written, the others
    (other ranks', DeepSpeed's) are read back from disk."""
    files = {}
    for rel in _files_under(path):
        full = os.path.join(path, rel)
        size, sha = _WRITTEN.pop(os.path.abspath(full), (None, None))
        if size != os.path.getsize(full):
            size, sha = os.path.getsize(full), _sha256(full)
        files[rel] = {"bytes": size, "sha256": sha}
    with open(os.path.join(path, MANIFEST), "w") as fh:
        json.dump({"format": 1, "step": step, "files": files}, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def verify_checkpoint(path: str) -> str | None:
    """None when every file listed in ``path``'s manifest is present with its size and SHA-256,
    else what is wrong (missing manifest, missing / truncated / altered file)."""
    try:
        with open(os.path.join(path, MANIFEST)) as fh:
            manifest = json.load(fh)
        files = manifest["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST} (written by an older slimtrain, or not a checkpoint)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is unreadable ({type(e).__name__}: {e})"
    if not files:
        return f"its {MANIFEST} lists no files"
    for rel, meta in sorted(files.items()):
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        size = os.path.getsize(full)
        if size != meta["bytes"]:
            return f"{rel} has {size} bytes, the manifest says {meta['bytes']} (truncated or overwritten)"
        if _sha256(full) != meta["sha256"]:
            return f"{rel} does not match its SHA-256 in the manifest (corrupted)"
    return None


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
class _HashingWriter:
    """A write-only file wrapper that hashes what passes through it (so the manifest costs no
    second read of a multi-GB checkpoint)."""

    def __init__(self, fh):
        self.fh, self.sha, self.nbytes = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.nbytes += len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


# path -> (bytes, sha256) of files this process wrote through _save_file, for write_manifest
_WRITTEN: dict[str, tuple[int, str]] = {}


def _save_file(obj, path: str) -> None:
    with open(path, "wb") as fh:
        writer = _HashingWriter(fh)
        torch.save(obj, writer)
        fh.flush()
        os.fsync(fh.fileno())
    _WRITTEN[os.path.abspath(path)] = (writer.nbytes, writer.sha.hexdigest())


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
    """The newest checkpoint directory, verified or not (see :func:`latest_good_checkpoint`)."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def latest_good_checkpoint(root: str, warn: bool = True) -> str | None:
    """The newest checkpoint under ``root`` that passes :func:`verify_checkpoint`; every newer one
    that fails is skipped (with a warning naming it and why, when ``warn``)."""
    for path in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        if warn:
            warnings.warn(f"skipping checkpoint {path}: {problem}; falling back to the previous one")
    return None


def _all_ok(ok: bool) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    # NCCL only reduces CUDA tensors: the flag goes on this rank's current GPU there
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=device)
    dist.all_reduce(flag)
    return int(flag) == 0


def save_checkpoint(root: str, step: int, *, rank: int, model_state=None, optim_state=None, trainer_state=None,
                    engine=None, keep: int = 2, rank_files: dict | None = None,
                    sharded_state: dict | None = None) -> str:
    """Write checkpoint ``step`` atomically; every rank calls this. Returns the final directory.

    ``rank_files`` maps a name to this rank's object, written as ``{name}_rank{rank}.pt``.
    ``sharded_state`` (FSDP2): a flat dict of tensors (DTensor shards included) every rank hands
    ``torch.distributed.checkpoint.save`` into ``dcp/`` (see :mod:`.sharded_checkpoint`).

    Raises :class:`NonFiniteState` (on every rank, before anything is written) when a model /
    optimizer / rank-file tensor is NaN or Inf. Raises ``OSError`` (on every rank) when any rank
    failed to write, after removing the partial temporary directory; earlier checkpoints are left
    as they were. Rotation keeps the newest ``keep`` checkpoints and, besides them, never deletes
    the newest one that verifies.
    """
    final = os.path.join(root, f"step_{step:08d}")
    tmp = os.path.join(root, f"tmp.step_{step:08d}")
    error: BaseException | None = None
    bad = (first_non_finite(model_state, "model") or first_non_finite(optim_state, "optimizer")
           or first_non_finite(rank_files, f"rank {rank}") or first_non_finite(sharded_state, f"rank {rank}"))
    if not _all_ok(bad is None):
        raise NonFiniteState(f"step {step}: {bad or 'another rank'} holds non-finite values; refusing to write "
                             "it as a checkpoint")
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
        if sharded_state is not None:  # every rank writes its shards, DCP's coordinator the metadata
            import torch.distributed.checkpoint as dcp

            from .sharded_checkpoint import DCP_DIR

            try:
                dcp.save(sharded_state, checkpoint_id=os.path.join(tmp, DCP_DIR))
            except Exception as e:  # DCP reports a failed write on any rank as CheckpointException, on every rank
                raise OSError(f"torch.distributed.checkpoint could not write {tmp!r}: {e}") from e
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
                write_manifest(tmp, step)
                _fsync_dir(tmp)
                if os.path.exists(final):  # re-saving a step after resume: move the old one aside first
                    old = os.path.join(root, f"tmp.old.step_{step:08d}")
                    os.replace(final, old)
                    os.replace(tmp, final)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, final)
                _fsync_dir(root)
                rotate(root, keep, newest_good=final)
            except OSError as e:
                error, ok = e, False
        if not ok:
            shutil.rmtree(tmp, ignore_errors=True)
    ok = _all_ok(ok)
    if not ok:
        raise error or OSError(f"another rank failed to write checkpoint step {step}")
    return final


def rotate(root: str, keep: int, newest_good: str | None = None) -> None:
    """Delete all but the newest ``keep`` checkpoints, except the newest verified-good one
    (``newest_good`` when the caller just wrote and hashed it, else found by verifying)."""
    found = list_checkpoints(root)
    stale = found[:-keep]
    if not stale:
        return
    if newest_good is None:
        newest_good = latest_good_checkpoint(root, warn=False)
    for path in stale:
        if os.path.abspath(path) != os.path.abspath(newest_good or ""):
            shutil.rmtree(path, ignore_errors=True)


def resolve_resume(root: str, resume: str | bool) -> str:
    """The checkpoint directory ``--resume`` names: ``True`` is the newest one under ``root`` that
    verifies (newer corrupt ones are skipped with a warning); an explicit one must verify."""
    if resume is True:
        path = latest_good_checkpoint(root)
        if path is None:
            found = list_checkpoints(root)
            if found:
                raise CheckpointError(
                    f"--resume: none of the {len(found)} checkpoint(s) under {root!r} verifies (newest: {found[-1]}: "
                    f"{verify_checkpoint(found[-1])}); start a new run with another output= or --overwrite")
    else:
        path = str(resume)
    if path is None or not os.path.isdir(path):
        raise FileNotFoundError(
            f"--resume: no checkpoint at {resume if resume is not True else root!r}; start without --resume or "
            "pass a checkpoint directory (…/checkpoints/step_NNNNNNNN)")
    if resume is not True:
        problem = verify_checkpoint(path)
        if problem is not None:
            good = latest_good_checkpoint(os.path.dirname(os.path.abspath(path)), warn=False)
            raise CheckpointError(f"--resume {path}: the checkpoint fails verification: {problem}; "
                                  + (f"resume from {good} instead" if good else "no other checkpoint there verifies"))
    return path


def load_file(ckpt: str, name: str):
    return torch.load(os.path.join(ckpt, name), map_location="cpu", weights_only=True)


def load_rank_files(ckpt: str, name: str) -> list:
    """Every rank's ``{name}_rank{r}.pt`` in rank order (empty when the checkpoint has none)."""
    out = []
    while os.path.exists(os.path.join(ckpt, f"{name}_rank{len(out)}.pt")):
        out.append(load_file(ckpt, f"{name}_rank{len(out)}.pt"))
    return out
