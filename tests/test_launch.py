"""The `slimtrain` command under real launchers, plus the CLI's argument handling.

Equivalence: 2 ranks x batch 2 must give the loss curve of 1 rank x batch 4 (the ranks read the
two halves of the same global batch). Gradients are averaged in a different order, so the curves
agree to float32 rounding, not bit for bit: we require |difference| < 1e-4 nats at every step
(measured: ~1e-6). A sharding bug (both ranks reading the same samples) moves the curve by
~1e-2 at step 2, so the tolerance still catches it.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from helpers import free_port
from slimtrain.launch.cli import main
from trainer_setup import losses, run_cli, tiny_overrides

TOL = 1e-4
GALORE = {"optim.name": "galore_adamw", "optim.args": "{rank: 8, update_proj_gap: 4}"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("launch")


@pytest.fixture(scope="module")
def reference(workdir):
    """1 rank x batch 4 under plain `python -m slimtrain`."""
    result = run_cli(tiny_overrides(workdir, str(workdir / "ref"), **GALORE, **{"train.batch_size": 4}), str(workdir))
    assert result.returncode == 0, result.stderr
    curve = losses(str(workdir / "ref"))
    assert len(curve) == 8 and curve[-1] < curve[0] - 0.3
    return curve


def _assert_close(curve, reference):
    assert len(curve) == len(reference)
    diffs = [abs(a - b) for a, b in zip(curve, reference)]
    assert max(diffs) < TOL, (curve, reference)


@pytest.fixture(scope="module")
def reference_fullsync(workdir):
    """1 rank x batch 4 with GaLore gradients clipped at full size (dist.lowrank_sync=false)."""
    out = workdir / "ref_fullsync"
    result = run_cli(tiny_overrides(workdir, str(out), **GALORE, **{"train.batch_size": 4,
                                                                    "dist.lowrank_sync": "false"}), str(workdir))
    assert result.returncode == 0, result.stderr
    return losses(str(out))


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_ranks_zero2_galore_matches_one_rank(workdir, reference):
    # the issue's command: torchrun --nproc_per_node 2 -m slimtrain train optim=galore_adamw zero_stage=2
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "-m"]
    args = tiny_overrides(workdir, str(workdir / "torchrun"), **{"optim.args": GALORE["optim.args"],
                                                                 "train.batch_size": 2})
    result = run_cli(args + ["optim=galore_adamw", "zero_stage=2"], str(workdir), launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 rank(s), engine torch" in result.stdout + result.stderr
    _assert_close(losses(str(workdir / "torchrun")), reference)
    ckpt = workdir / "torchrun" / "checkpoints" / "step_00000008"
    assert (ckpt / "optim_rank0.pt").is_file() and (ckpt / "optim_rank1.pt").is_file()


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_ddp_galore_matches_one_rank(workdir, reference):
    # torch's DistributedDataParallel with slimtrain's low-rank comm hook
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "-m"]
    args = tiny_overrides(workdir, str(workdir / "ddp"), **{"optim.args": GALORE["optim.args"], "train.batch_size": 2})
    result = run_cli(args + ["optim=galore_adamw", "engine=ddp"], str(workdir), launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 rank(s), engine ddp (ddp)" in result.stdout + result.stderr
    _assert_close(losses(str(workdir / "ddp")), reference)


def _fsdp_two_ranks_and_one(workdir, tag: str, optim: dict, ref_engine: list[str]) -> tuple[str, list, list]:
    """``torchrun --nproc_per_node 2 -m slimtrain train engine=fsdp`` with ``optim``, and the
    one-process run (``ref_engine``: its extra arguments): (torchrun's output, its loss curve,
    the one-process curve)."""
    ref = run_cli(tiny_overrides(workdir, str(workdir / f"{tag}_ref"), **optim) + ref_engine, str(workdir))
    assert ref.returncode == 0, ref.stderr[-3000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "-m"]
    args = tiny_overrides(workdir, str(workdir / f"{tag}_fsdp"), **{**optim, "train.batch_size": 2})
    result = run_cli(args + ["engine=fsdp"], str(workdir), launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr, losses(str(workdir / f"{tag}_fsdp")), losses(str(workdir / f"{tag}_ref"))


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_fsdp_adamw8bit_matches_one_rank(workdir):
    # FSDP2 through the command line: 8-bit AdamW on each rank's rows (blocks of one row), against
    # the default engine on one process
    out, curve, ref = _fsdp_two_ranks_and_one(workdir, "a8", {"optim.name": "adamw8bit",
                                                             "optim.args": "{block_size: 32, min_8bit_size: 1024}"}, [])
    assert "2 rank(s), engine fsdp (fsdp)" in out
    _assert_close(curve, ref)


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_fsdp_galore_matches_one_process(workdir):
    # the issue's command with GaLore's defaults: torchrun --nproc_per_node 2 -m slimtrain train
    # dist.engine=fsdp optim=galore_adamw; the one-process run is the same command without torchrun
    out, curve, ref = _fsdp_two_ranks_and_one(workdir, "g", {"optim.name": "galore_adamw"}, ["engine=fsdp"])
    assert "2 rank(s), engine fsdp (fsdp)" in out
    _assert_close(curve, ref)


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_launcher_zero2_galore_matches_one_rank(workdir, reference):
    # `deepspeed` passes --local_rank=N ahead of our subcommand. With dist.engine=deepspeed and
    # ZeRO-2, GaLore cannot take the engine's flat partitions: slimtrain's sharding takes over.
    launcher = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module"]
    args = tiny_overrides(workdir, str(workdir / "ds"), **{"optim.args": GALORE["optim.args"],
                                                           "train.batch_size": 2, "dist.engine": "deepspeed"})
    result = run_cli(args + ["optim=galore_adamw", "zero_stage=2"], str(workdir), launcher=launcher)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "2 rank(s), engine deepspeed" in out and "slimtrain shards its optimizer state" in out
    _assert_close(losses(str(workdir / "ds")), reference)


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_engine_zero0_galore_full_sync_matches_one_rank(workdir, reference_fullsync):
    # With low-rank sync off the DeepSpeed engine itself wraps the GaLore optimizer at ZeRO-0 and
    # does accumulation scaling, all-reduce and clipping.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "-m"]
    args = tiny_overrides(workdir, str(workdir / "ds0"), **GALORE, **{
        "train.batch_size": 2, "dist.engine": "deepspeed", "dist.lowrank_sync": "false"})
    result = run_cli(args, str(workdir), launcher=launcher)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "2 rank(s), engine deepspeed" in out and "note:" not in out
    _assert_close(losses(str(workdir / "ds0")), reference_fullsync)


@pytest.mark.slow
def test_deepspeed_zero1_checkpoint_resumes_exactly(workdir):
    # ZeRO-1 partitions AdamW's state; the engine writes it in DeepSpeed's format inside our
    # atomic checkpoint directory, and resume continues bit-exactly.
    extra = {"dist.engine": "deepspeed", "dist.zero_stage": 1, "checkpoint.every": 4, "checkpoint.keep": 5}
    full = workdir / "zero1"
    result = run_cli(tiny_overrides(workdir, str(full), **extra), str(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    part = workdir / "zero1_part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_00000008")
    assert (part / "checkpoints" / "step_00000004" / "deepspeed").is_dir()
    result = run_cli(tiny_overrides(workdir, str(part), **extra) + ["--resume"], str(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr
    assert losses(str(part)) == losses(str(full))


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_zero3_export_gathers_the_partitioned_weights(workdir, tmp_path):
    # ZeRO-3 partitions the parameters themselves (threshold 0: even the tiny model's). The
    # end-of-run export gathers them; `slimtrain export` of the final checkpoint consolidates
    # its partitions with DeepSpeed's zero_to_fp32; both equal a 1-process AdamW run.
    from safetensors.torch import load_file

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    out, one = workdir / "zero3", workdir / "zero3_ref"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "-m"]
    result = run_cli(tiny_overrides(workdir, str(out), **{
        "dist.engine": "deepspeed", "dist.zero_stage": 3, "dist.deepspeed_config": ds, "train.batch_size": 2,
        "export.dir": out / "hf"}), str(workdir), launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli(tiny_overrides(workdir, str(one), **{"export.dir": one / "hf"}), str(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    final = out / "checkpoints" / "step_00000008"
    assert (final / "deepspeed").is_dir() and not (final / "model.pt").exists()
    assert main(["export", str(final), str(tmp_path / "hf2")]) == 0

    gathered = load_file(out / "hf" / "model.safetensors")
    consolidated = load_file(tmp_path / "hf2" / "model.safetensors")
    reference = load_file(one / "hf" / "model.safetensors")
    assert set(gathered) == set(consolidated) == set(reference)
    for name, weight in reference.items():
        assert gathered[name].shape == weight.shape, name
        assert torch.equal(gathered[name], consolidated[name]), name
        assert (gathered[name] - weight).abs().max() < TOL, name


# ---------------------------------------------------------------------------- CLI (in-process)
def test_cli_config_errors_exit_2_with_the_key(capsys):
    assert main(["train", "train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "train.stepz" in err and "steps" in err
    assert main(["train", "dist.engine=horovod"]) == 2
    assert "['torch', 'ddp', 'fsdp', 'deepspeed']" in capsys.readouterr().err


def test_cli_accepts_local_rank_before_or_after_subcommand(capsys, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert main(["--local_rank=0", "train", "--help-config"]) == 0
    assert main(["train", "--local_rank", "1", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "optim.args" in out and "dist.zero_stage" in out and "choices=['stop', 'skip']" in out


def test_cli_missing_data_file_exit_2(tmp_path, capsys):
    code = main(["train", *tiny_overrides(tmp_path, str(tmp_path / "o"), **{"data.files": "[missing.txt]"})])
    assert code == 2
    assert "missing.txt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_resume_flag_does_not_swallow_an_override(tmp_path, capsys):
    # argparse would take `train.steps=3` as --resume's optional path; it must stay an override.
    code = main(["train", "--resume", f"output_dir={tmp_path / 'fresh'}", "train.steps=3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and str(tmp_path / "fresh" / "checkpoints") in err


def test_cli_takes_overrides_on_both_sides_of_an_option(tmp_path):
    # argparse stops a nargs="*" positional at the first option; `a=1 --config f.yaml b=2` must
    # still apply b=2 (it used to exit with "unrecognized arguments")
    from slimtrain.launch.cli import parse_args
    args = parse_args(["train", "train.steps=3", "--config", "c.yaml", "train.batch_size=2", "--overwrite", "seed=1"])
    assert args.config == "c.yaml" and args.overwrite
    assert args.overrides == ["train.steps=3", "train.batch_size=2", "seed=1"]
    with pytest.raises(SystemExit):
        parse_args(["train", "--config", "c.yaml", "--no-such-flag"])
