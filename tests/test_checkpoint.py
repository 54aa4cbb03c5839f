"""Checkpoints: every file loads with weights_only=True, resume is bit-exact in-process and after
a real SIGKILL of a running `python -m slimtrain train`, and an interrupted save never replaces
the last good checkpoint."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from slimtrain.trainer import Trainer, load_config
from slimtrain.run import checkpoint as ckpt
from trainer_setup import cli_env, losses, run_cli, tiny_overrides

GALORE = {"optim.name": "galore_adamw", "optim.args": "{rank: 8, update_proj_gap: 3, proj_method: randomized}"}


def _run(tmp_path, name, resume=None, **extra):
    trainer = Trainer(load_config(None, tiny_overrides(tmp_path, str(tmp_path / name), **extra)), resume=resume)
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


@pytest.mark.parametrize("extra", [{}, GALORE, {"train.grad_accum": 2, "train.bf16": "true"}],
                         ids=["adamw", "galore_adamw", "accum_bf16"])
def test_resume_in_process_is_bit_exact(tmp_path, extra):
    full = _run(tmp_path, "full", **extra, **{"checkpoint.every": 3})
    # The same run, "crashed" after step 6: its directory is cut back to the step-3 checkpoint
    # (later checkpoints and metrics removed), then resumed.
    part = tmp_path / "part"
    crashed = Trainer(load_config(None, tiny_overrides(tmp_path, str(part), **extra, **{"checkpoint.every": 3})))
    crashed.cfg.train.steps = 6  # stop early; the schedule was built for 8 steps, as in the full run
    crashed.train()
    crashed.close()
    shutil.rmtree(part / "checkpoints" / "step_00000006")
    resumed = _run(tmp_path, "part", resume=True, **extra, **{"checkpoint.every": 3})
    assert resumed.resumed_from.endswith("step_00000003")
    assert losses(str(part)) == losses(str(tmp_path / "full"))
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoint_files_load_weights_only_with_projectors(tmp_path):
    _run(tmp_path, "o", **GALORE, **{"train.steps": 4})
    path = ckpt.latest_checkpoint(str(tmp_path / "o" / "checkpoints"))
    files = sorted(os.listdir(path))
    assert files == ["manifest.json", "model.pt", "optim.pt", "rng_rank0.pt", "trainer.pt"]
    assert ckpt.verify_checkpoint(path) is None
    optim = torch.load(os.path.join(path, "optim.pt"), weights_only=True)
    assert any("proj_left" in s or "proj_right" in s for s in optim["state"].values())
    trainer = torch.load(os.path.join(path, "trainer.pt"), weights_only=True)
    assert trainer["step"] == 4 and trainer["data_position"] == 4 * 4
    assert trainer["config"]["optim"]["name"] == "galore_adamw"


def test_interrupted_save_leaves_previous_checkpoint(tmp_path):
    root = str(tmp_path / "ck")
    ckpt.save_checkpoint(root, 1, rank=0, model_state={"w": torch.ones(2)}, optim_state={}, trainer_state={"step": 1})
    # A crash mid-save leaves a tmp.* directory with partial files behind.
    os.makedirs(os.path.join(root, "tmp.step_00000002"))
    with open(os.path.join(root, "tmp.step_00000002", "model.pt"), "wb") as fh:
        fh.write(b"\x80partial")
    assert ckpt.latest_checkpoint(root).endswith("step_00000001")
    ckpt.save_checkpoint(root, 3, rank=0, model_state={"w": torch.zeros(2)}, optim_state={},
                         trainer_state={"step": 3}, keep=2)
    assert sorted(os.listdir(root)) == ["step_00000001", "step_00000003"]  # leftovers cleaned


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_loss_curve(tmp_path):
    extra = {**GALORE, "train.steps": 40, "checkpoint.every": 10, "checkpoint.keep": 10}
    reference = run_cli(tiny_overrides(tmp_path, str(tmp_path / "ref"), **extra), cwd=str(tmp_path))
    assert reference.returncode == 0, reference.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "slimtrain", "train",
                             *tiny_overrides(tmp_path, str(out), **extra)],
                            cwd=str(tmp_path), env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    # Kill once step 12 is logged: past the step-10 checkpoint, before the run can finish.
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 12:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    seen = len(metrics.read_text().splitlines())
    last = ckpt.latest_checkpoint(str(out / "checkpoints"))
    assert last is not None and int(last[-8:]) < 40 and int(last[-8:]) <= seen

    resumed = run_cli(tiny_overrides(tmp_path, str(out), **extra) + ["--resume"], cwd=str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    assert losses(str(out)) == losses(str(tmp_path / "ref"))  # exactly, every step
    final_ref = torch.load(tmp_path / "ref/checkpoints/step_00000040/model.pt", weights_only=True)
    final = torch.load(out / "checkpoints/step_00000040/model.pt", weights_only=True)
    assert all(torch.equal(final_ref[k], final[k]) for k in final_ref)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint.*checkpoints"):
        Trainer(load_config(None, tiny_overrides(tmp_path, str(tmp_path / "none"))), resume=True)
