"""Every slimtrain optimizer under data parallelism through the trainer, with real gloo ranks.

For each optimizer and ZeRO-like stage, N ranks x batch 4/N must give the loss curve of one
process x batch 4 (the ranks read the parts of the same global batch; gradients are summed in
another order, so curves agree to float32 rounding: |difference| < 1e-4 nats per step, as in
test_launch.py, where a data-sharding bug moves the curve by ~1e-2), every rank must hold
bit-identical weights, and with sharding no rank may hold more than its share of the optimizer
state. Checkpoints written at N ranks resume at N ranks bit-exactly, and at another N (the
per-rank shards are merged) within the same tolerance.
"""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest
import torch

from helpers import run_ranks
from trainer_setup import losses, prepared_root, tiny_overrides

TOL = 1e-4
GALORE = {"optim.name": "galore_adamw", "optim.args": "{rank: 8, update_proj_gap: 3}"}

# name -> overrides (batch size is set per world size so the global batch is always 4)
JOBS = {
    "galore_z0": {**GALORE},
    "galore_z1": {**GALORE, "dist.zero_stage": 1},
    "galore_z2": {**GALORE, "dist.zero_stage": 2},
    "galore_z2_fullsync": {**GALORE, "dist.zero_stage": 2, "dist.lowrank_sync": "false"},
    "galore_adafactor_z2": {"optim.name": "galore_adafactor", "dist.zero_stage": 2,
                            "optim.args": "{rank: 8, update_proj_gap: 3, relative_step: false}"},
    "galore8bit_z2": {"optim.name": "galore_adamw8bit", "optim.args": "{rank: 8, update_proj_gap: 3}",
                      "dist.zero_stage": 2},
    "adamw_z2": {"optim.name": "adamw", "dist.zero_stage": 2},
    "adamw8bit_z2": {"optim.name": "adamw8bit", "dist.zero_stage": 2},
    "lisa_z2": {"optim.name": "lisa", "optim.args": "{n_active: 1, interval: 3}", "dist.zero_stage": 2},
    "mezo": {"optim.name": "mezo", "optim.lr": 1e-4, "optim.args": "{eps: 0.001}"},
    "qgalore_z0": {"optim.name": "qgalore_adamw8bit", "optim.args": "{rank: 8, update_proj_gap: 3}"},
    "galore_layerwise": {"optim.name": "galore_adamw", "train.grad_accum": 2, "train.max_grad_norm": 0,
                         "optim.args": "{rank: 8, update_proj_gap: 3, layerwise: true, accumulation_steps: 2}"},
}


def _run_jobs(rank, world, root, jobs):
    """Train each (name, overrides, resume) job on this rank; return per job the loss curve
    (rank 0), the final weights and this rank's optimizer-state bytes."""
    from slimtrain.run.config import load_config
    from slimtrain.trainer.trainer import Trainer

    out = {}
    for name, extra, resume in jobs:
        batch = 4 // world
        cfg = load_config(None, tiny_overrides(pathlib.Path(root), os.path.join(root, f"{name}_w{world}"),
                                               **{"train.batch_size": batch, **extra}))
        trainer = Trainer(cfg, resume=resume)
        try:
            trainer.train()
            state = trainer.optimizer.state
            state_bytes = sum(v.numel() * v.element_size() for s in state.values() for v in s.values()
                              if isinstance(v, torch.Tensor))
            weights = torch.cat([p.detach().float().reshape(-1) for p in trainer.model.parameters()]
                                + [b.detach().float().reshape(-1) for b in trainer.model.buffers()
                                   if b.is_floating_point()])
        finally:
            trainer.close()
        out[name] = {"losses": losses(cfg.output_dir) if rank == 0 else None, "weights": weights,
                     "state_bytes": state_bytes}
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return prepared_root(tmp_path_factory, "dp")


@pytest.fixture(scope="module")
def single(root):
    """One process x batch 4: the reference curve of every job."""
    return _run_jobs(0, 1, root, [(name, extra, None) for name, extra in JOBS.items()])


@pytest.fixture(scope="module")
def two(root):
    return run_ranks(_run_jobs, 2, root, [(name, extra, None) for name, extra in JOBS.items()])


def _close(curve, reference):
    assert len(curve) == len(reference) == 8
    diff = max(abs(a - b) for a, b in zip(curve, reference))
    assert diff < TOL, (diff, curve, reference)


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(JOBS))
def test_two_ranks_match_one_process(name, single, two):
    _close(two[0][name]["losses"], single[name]["losses"])
    assert single[name]["losses"][-1] < single[name]["losses"][0] or name == "mezo"
    assert torch.equal(two[0][name]["weights"], two[1][name]["weights"]), "ranks hold different weights"
    # the weights themselves, not only the loss, follow the single process
    ref = single[name]["weights"]
    assert (two[0][name]["weights"] - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max())


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["galore_z1", "galore_z2", "adamw_z2", "adamw8bit_z2", "galore8bit_z2"])
def test_sharding_splits_optimizer_state(name, single, two):
    full = single[name]["state_bytes"]
    per_rank = [two[r][name]["state_bytes"] for r in range(2)]
    # whole tensors are balanced by size; replicated GaLore projectors add a little
    assert max(per_rank) <= 0.65 * full, (per_rank, full)
    assert min(per_rank) > 0


@pytest.mark.distributed
def test_lisa_keeps_state_only_for_active_layers(single, two):
    # 2 decoder layers, one active: a rank's state is at most AdamW's for the always-active
    # tensors plus one layer, split over the ranks
    assert max(two[r]["lisa_z2"]["state_bytes"] for r in range(2)) < single["adamw_z2"]["state_bytes"] * 0.65


@pytest.mark.distributed
@pytest.mark.slow
def test_four_ranks_match_one_process(root, single):
    names = ["galore_z2", "adamw8bit_z2", "lisa_z2", "galore_layerwise"]
    four = run_ranks(_run_jobs, 4, root, [(n, JOBS[n], None) for n in names])
    for name in names:
        _close(four[0][name]["losses"], single[name]["losses"])
        for r in range(1, 4):
            assert torch.equal(four[0][name]["weights"], four[r][name]["weights"])


def _checkpointed(root, name, world):
    return os.path.join(root, f"{name}_w{world}", "checkpoints", "step_00000004")


@pytest.mark.distributed
@pytest.mark.slow
def test_sharded_checkpoint_resumes_exactly_and_at_other_world_sizes(root, single):
    extra = {**GALORE, "dist.zero_stage": 2, "checkpoint.every": 4, "checkpoint.keep": 3}
    run_ranks(_run_jobs, 2, root, [("ckpt", extra, None)])
    full_curve = losses(os.path.join(root, "ckpt_w2"))
    ckpt = _checkpointed(root, "ckpt", 2)
    names = sorted(os.listdir(ckpt))
    assert "optim_rank0.pt" in names and "optim_rank1.pt" in names and "optim.pt" not in names
    for f in names:
        if f.endswith(".pt"):
            torch.load(os.path.join(ckpt, f), weights_only=True)
    saved = shutil.copytree(ckpt, os.path.join(root, "ckpt_saved"))

    run_ranks(_run_jobs, 2, root, [("resume2", extra, saved)])
    assert losses(os.path.join(root, "resume2_w2"))[-4:] == full_curve[-4:]  # bit-exact at the same N

    one = _run_jobs(0, 1, root, [("resume1", extra, saved)])
    curve = losses(os.path.join(root, "resume1_w1"))
    assert len(curve) == 4 and max(abs(a - b) for a, b in zip(curve, full_curve[-4:])) < TOL

    four = run_ranks(_run_jobs, 4, root, [("resume4", extra, saved)])
    curve = losses(os.path.join(root, "resume4_w4"))
    assert len(curve) == 4 and max(abs(a - b) for a, b in zip(curve, full_curve[-4:])) < TOL
    assert one["resume1"]["weights"].shape == four[0]["resume4"]["weights"].shape
