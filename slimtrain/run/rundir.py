"""One run per output directory: a lock held for the run's life, and no silent takeover of
another run's checkpoints.

:func:`claim_output_dir` is called by ``slimtrain train`` and ``slimtrain federated`` before
anything in the directory is deleted or written. It

1. creates the directory and proves it (and its ``checkpoints/``) writable, so an unwritable
   place fails at once with one line instead of a traceback or a warning at every save;
2. takes ``<output_dir>/.slimtrain.lock`` (created with ``O_EXCL``; it holds pid, host, start
   time and command). A second run on the same directory is refused while the holder lives; a
   lock left by a killed run (same host, dead pid) is detected as stale, reported and replaced;
   a lock from another host cannot be checked and is refused with the file to delete;
3. refuses a *fresh* run into a directory that holds checkpoints (they belong to another run:
   rotation would delete them and a later ``--resume`` would continue the wrong run), naming
   ``--resume`` and a new ``output=``; ``--overwrite`` deletes them instead.

Only rank 0 touches the file system; the verdict is broadcast so every rank raises alike.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import warnings
import weakref

import torch.distributed as dist

from . import checkpoint as ckpt
from .config import ConfigError

LOCK_NAME = ".slimtrain.lock"

# Locks this process holds now (absolute path -> RunLock): a lock file naming our own pid that is
# not in here was left by an object that is gone, so it is stale like a dead pid's.
_HELD: dict[str, "RunLock"] = {}


class OutputDirError(ConfigError):
    """The output directory cannot be used by this run; the message names it and the fix."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """The held lock file; :meth:`release` (idempotent) removes it. Released too when the
    owner is garbage-collected or the process exits normally."""

    def __init__(self, path: str, created: tuple[str, ...] = ()):
        self.path = path
        # directories this claim created: removed again on release if nothing was written there
        self._finalizer = weakref.finalize(self, _remove_lock, path, os.getpid(), created)
        _HELD[path] = self

    def release(self) -> None:
        _HELD.pop(self.path, None)
        self._finalizer()


def _remove_lock(path: str, pid: int, created: tuple[str, ...] = ()) -> None:
    try:
        with open(path) as fh:
            if json.load(fh).get("pid") != pid:
                return  # not ours any more
        os.remove(path)
    except (OSError, ValueError):
        return
    for d in created:  # innermost first; a directory with anything in it stays
        try:
            os.rmdir(d)
        except OSError:
            pass


def _read_lock(path: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _probe_writable(path: str, key: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test.{os.getpid()}")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as e:
        raise OutputDirError(f"{key}={path!r} is not a writable directory ({e.strerror or e}); choose another "
                             "output= or fix its permissions") from None


def _take_lock(output_dir: str, command: str, created: tuple[str, ...]) -> RunLock:
    path = os.path.abspath(os.path.join(output_dir, LOCK_NAME))
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "command": command}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            other = _read_lock(path)
            pid, host = other.get("pid"), other.get("host")
            stale = (not other  # empty / unreadable: a run killed while writing it
                     or (host == me["host"] and isinstance(pid, int)
                         and (not _pid_alive(pid) or (pid == me["pid"] and path not in _HELD))))
            if stale:
                warnings.warn(f"removing the stale lock {path} (pid {pid} on {host} is no longer running)")
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
                continue
            raise OutputDirError(
                f"output_dir={output_dir!r} is in use by another slimtrain run (pid {pid} on host {host}, "
                f"{other.get('command', '?')}, since {other.get('started', '?')}; lock file {path}); wait for it to "
                "finish or choose another output=; if that run is gone (another host), delete the lock file") from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        return RunLock(path, created)
    raise OutputDirError(f"could not take the lock {path}: another run keeps recreating it")


def _claim_rank0(output_dir: str, resuming: bool, overwrite: bool, command: str) -> RunLock:
    if not output_dir or not str(output_dir).strip():
        raise OutputDirError("output_dir='' is empty; give a run directory, e.g. output=runs/my_run")
    root = os.path.join(output_dir, "checkpoints")
    created = tuple(d for d in (root, output_dir) if not os.path.exists(d))
    _probe_writable(output_dir, "output_dir")
    lock = _take_lock(output_dir, command, created)
    try:
        found = ckpt.list_checkpoints(root)
        if found and not resuming:
            if not overwrite:
                raise OutputDirError(
                    f"output_dir={output_dir!r} holds checkpoints of another run (newest: {found[-1]}); continue it "
                    f"with `slimtrain {command} ... --resume`, start a new run with output=<another directory>, or "
                    "pass --overwrite to delete them")
            warnings.warn(f"--overwrite: deleting {len(found)} checkpoint(s) of an earlier run under {root}")
            shutil.rmtree(root)
        _probe_writable(root, "checkpoints directory")
    except BaseException:
        lock.release()
        raise
    return lock


def claim_output_dir(output_dir: str, *, resuming: bool, overwrite: bool = False, command: str = "train",
                     rank: int = 0) -> RunLock | None:
    """Claim ``output_dir`` for this run (see the module docstring); every rank calls it.

    Returns the lock on rank 0 (None elsewhere); raises :class:`OutputDirError` on every rank
    when the directory cannot be used.
    """
    lock, error = None, None
    if rank == 0:
        try:
            lock = _claim_rank0(output_dir, resuming, overwrite, command)
        except OutputDirError as e:
            error = str(e)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise OutputDirError(error)
    return lock


__all__ = ["claim_output_dir", "RunLock", "OutputDirError", "LOCK_NAME"]
