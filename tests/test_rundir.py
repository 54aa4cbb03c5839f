"""Issue 12, points 2 and 3: an output directory belongs to one run. A fresh run into a
directory with another run's checkpoints refuses (unless --overwrite); a lock held for the run's
life refuses a second concurrent run, in `train` and `federated`, before anything is deleted;
a lock left by a killed run is detected by its dead pid."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from slimtrain.run import checkpoint as ckpt
from slimtrain.run.rundir import LOCK_NAME, OutputDirError, claim_output_dir
from slimtrain.trainer import Trainer, load_config
from trainer_setup import cli_env, run_cli, tiny_overrides


def _train(tmp_path, out, **extra):
    t = Trainer(load_config(None, tiny_overrides(tmp_path, str(out), **extra)))
    try:
        return t.train()
    finally:
        t.close()


@pytest.fixture
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def _foreign_lock(out, pid):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, LOCK_NAME), "w") as fh:
        json.dump({"pid": pid, "host": socket.gethostname(), "started": "then", "command": "train"}, fh)


def test_fresh_train_refuses_another_runs_checkpoints_and_overwrite_replaces_them(tmp_path):
    out = tmp_path / "D"
    _train(tmp_path, out, **{"train.steps": 6, "checkpoint.every": 2, "checkpoint.keep": 5})
    old = ckpt.list_checkpoints(str(out / "checkpoints"))
    result = run_cli(tiny_overrides(tmp_path, str(out), **{"train.steps": 2}), cwd=str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds checkpoints of another run" in result.stderr and "--resume" in result.stderr
    assert "output=" in result.stderr and "--overwrite" in result.stderr
    assert ckpt.list_checkpoints(str(out / "checkpoints")) == old  # nothing was touched
    t = Trainer(load_config(None, tiny_overrides(tmp_path, str(out), **{"train.steps": 2})), overwrite=True)
    summary = t.train()
    t.close()
    assert summary["checkpoint"].endswith("step_00000002") and os.path.isdir(summary["checkpoint"])
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(out / "checkpoints"))] == ["step_00000002"]
    # and --resume continues this run, not the old 6-step one
    r = Trainer(load_config(None, tiny_overrides(tmp_path, str(out), **{"train.steps": 3})), resume=True)
    assert r.step == 2
    r.close()


def test_second_concurrent_train_is_refused_while_the_first_holds_the_lock(tmp_path, live_process):
    out = tmp_path / "D"
    _foreign_lock(out, live_process.pid)  # a running slimtrain, as far as the lock can tell
    with pytest.raises(OutputDirError, match=rf"in use by another slimtrain run \(pid {live_process.pid}"):
        Trainer(load_config(None, tiny_overrides(tmp_path, str(out))))
    result = run_cli(tiny_overrides(tmp_path, str(out)), cwd=str(tmp_path))
    assert result.returncode == 2 and "in use by another slimtrain run" in result.stderr
    assert "Traceback" not in result.stderr
    # the same process, two trainers on one directory: the second is refused too
    first = Trainer(load_config(None, tiny_overrides(tmp_path, str(tmp_path / "E"))))
    with pytest.raises(OutputDirError, match="in use"):
        Trainer(load_config(None, tiny_overrides(tmp_path, str(tmp_path / "E"))))
    first.close()
    Trainer(load_config(None, tiny_overrides(tmp_path, str(tmp_path / "E")))).close()  # released by close()


def test_stale_lock_of_a_killed_run_is_detected_and_replaced(tmp_path, live_process):
    out = tmp_path / "D"
    live_process.kill()
    live_process.wait()
    _foreign_lock(out, live_process.pid)
    with pytest.warns(UserWarning, match="stale lock"):
        lock = claim_output_dir(str(out), resuming=False)
    with open(out / LOCK_NAME) as fh:
        assert json.load(fh)["pid"] == os.getpid()
    lock.release()
    assert not (out / LOCK_NAME).exists()


def test_federated_refuses_a_locked_directory_before_deleting_anything(tmp_path, live_process):
    from test_fed_cli import overrides
    from trainer_setup import text_file, tiny_model_dir

    assets = {"model": tiny_model_dir(tmp_path), "text": text_file(tmp_path, nbytes=30_000)}
    out = tmp_path / "F"
    _foreign_lock(out, live_process.pid)
    os.makedirs(out / "replies")
    (out / "replies" / "2.pt").write_bytes(b"the other run's reply")
    proc = subprocess.run([sys.executable, "-m", "slimtrain", "federated", *overrides(assets, out)], cwd=str(tmp_path),
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "in use by another slimtrain run" in proc.stderr, proc.stderr[-2000:]
    assert (out / "replies" / "2.pt").read_bytes() == b"the other run's reply"  # untouched


@pytest.mark.parametrize("where", ["output", "checkpoints"])
def test_unwritable_output_or_checkpoint_dir_is_one_clear_line(tmp_path, where):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    if where == "output":
        out, key = blocker / "run", "output_dir="
    else:
        out, key = tmp_path / "D", "checkpoints directory="
        os.makedirs(out)
        (out / "checkpoints").write_text("a file where checkpoints/ should be")
    result = run_cli(tiny_overrides(tmp_path, str(out)), cwd=str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert key in result.stderr and "not a writable directory" in result.stderr


def test_empty_output_is_named(tmp_path):
    result = run_cli(tiny_overrides(tmp_path, ""), cwd=str(tmp_path))
    assert result.returncode == 2 and "output_dir=''" in result.stderr and "Traceback" not in result.stderr
