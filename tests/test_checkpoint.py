"""Checkpoints: every file loads with weights_only=True, resume is bit-exact in-process and after
a real SIGKILL of a running `python -m slimtrain train` (at an exact point: after a save or in
the middle of one), and an interrupted save never replaces the last good checkpoint."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

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


# A child that runs `slimtrain train` and SIGKILLs itself at an exact point of checkpoint
# step STEP, instead of a parent polling the metrics and killing whenever it gets there (a race:
# the kill could land anywhere). It wraps slimtrain.run.checkpoint from outside (no hook in the
# product): "after_save" dies as soon as the checkpoint of STEP is complete (renamed into
# place); "mid_save" dies inside that save, right after model.pt is written to its temporary
# directory, so the checkpoint is never renamed into place and a partial tmp.* is left behind.
KILL_CHILD = """
import os, signal, sys
from slimtrain.run import checkpoint as ckpt
from slimtrain.launch.cli import main

mode, step = sys.argv[1], int(sys.argv[2])
save_checkpoint, save_file = ckpt.save_checkpoint, ckpt._save_file


def save_then_die(root, at, **kw):
    path = save_checkpoint(root, at, **kw)
    if at == step:
        os.kill(os.getpid(), signal.SIGKILL)
    return path


def write_then_die(obj, path):
    save_file(obj, path)
    if path.endswith(os.path.join("tmp.step_%08d" % step, "model.pt")):
        os.kill(os.getpid(), signal.SIGKILL)


if mode == "after_save":
    ckpt.save_checkpoint = save_then_die
else:
    ckpt._save_file = write_then_die
sys.exit(main(["train", *sys.argv[3:]]))
"""


KILL_RUN = {**GALORE, "train.steps": 30, "checkpoint.every": 10, "checkpoint.keep": 10}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run the killed ones must reproduce: (its working directory, its output directory)."""
    root = tmp_path_factory.mktemp("sigkill")
    reference = run_cli(tiny_overrides(root, str(root / "ref"), **KILL_RUN), cwd=str(root))
    assert reference.returncode == 0, reference.stderr
    return root, root / "ref"


@pytest.mark.slow
@pytest.mark.parametrize("mode,kill_step,resume_step", [("after_save", 20, 20), ("mid_save", 20, 10)])
def test_sigkill_then_resume_gives_the_uninterrupted_loss_curve(uninterrupted, mode, kill_step, resume_step):
    tmp_path, ref = uninterrupted
    extra = KILL_RUN
    out = tmp_path / f"killed_{mode}"
    child = tmp_path / f"kill_child_{mode}.py"
    child.write_text(KILL_CHILD)
    proc = subprocess.run([sys.executable, str(child), mode, str(kill_step), *tiny_overrides(tmp_path, str(out), **extra)],
                          cwd=str(tmp_path), env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # Killed exactly where asked: every step up to kill_step logged, the newest complete
    # checkpoint is resume_step, and a save cut short left only its temporary directory.
    assert losses(str(out)) == losses(str(ref))[:kill_step]
    assert ckpt.latest_checkpoint(str(out / "checkpoints")).endswith(f"step_{resume_step:08d}")
    leftover = sorted(n for n in os.listdir(out / "checkpoints") if n.startswith("tmp."))
    assert leftover == ([] if mode == "after_save" else [f"tmp.step_{kill_step:08d}"])

    resumed = run_cli(tiny_overrides(tmp_path, str(out), **extra) + ["--resume"], cwd=str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    assert f"step_{resume_step:08d}" in resumed.stdout + resumed.stderr
    assert losses(str(out)) == losses(str(ref))  # exactly, every step
    final_ref = torch.load(ref / "checkpoints/step_00000030/model.pt", weights_only=True)
    final = torch.load(out / "checkpoints/step_00000030/model.pt", weights_only=True)
    assert all(torch.equal(final_ref[k], final[k]) for k in final_ref)
    assert not any(n.startswith("tmp.") for n in os.listdir(out / "checkpoints"))


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint.*checkpoints"):
        Trainer(load_config(None, tiny_overrides(tmp_path, str(tmp_path / "none"))), resume=True)
