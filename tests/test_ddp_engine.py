"""``dist.engine=ddp``: torch's DistributedDataParallel with slimtrain's low-rank comm hook, real gloo ranks.

2 ranks x batch 2 must follow one process x batch 4 (``dist.engine=torch``): loss within 1e-4
nats per step and weights within 1e-4 (gradients are summed in another order, so not bit for
bit; a data-sharding bug moves the curve by ~1e-2), with bit-identical weights on every rank.
The hook's bytes are counted: a GaLore matrix sends its projected gradient except on the steps
that refresh its projector.
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

from helpers import run_ranks
from trainer_setup import losses, prepared_root, tiny_overrides

TOL = 1e-4
GAP = 3
STEPS = 8
GALORE_ARGS = f"{{rank: 8, update_proj_gap: {GAP}}}"

JOBS = {
    "adamw": {"optim.name": "adamw"},
    "adamw8bit": {"optim.name": "adamw8bit"},
    "galore": {"optim.name": "galore_adamw", "optim.args": GALORE_ARGS},
    "galore8bit": {"optim.name": "galore_adamw8bit", "optim.args": GALORE_ARGS},
    "galore_accum": {"optim.name": "galore_adamw", "optim.args": GALORE_ARGS, "train.grad_accum": 2},
    "apollo": {"optim.name": "apollo_adamw", "optim.args": GALORE_ARGS},
    # one layer trains per period of 3 steps: DDP is re-wrapped over the new set at steps 3 and 6
    "lisa": {"optim.name": "lisa", "optim.args": "{n_active: 1, interval: 3}"},
    # zeroth-order: no backward, so nothing for DDP to wrap; the zeroth-order engine all-reduces one
    # loss per evaluation under every dist.engine (ddp included)
    "mezo": {"optim.name": "mezo", "optim.lr": 1e-4, "optim.args": "{eps: 0.001}"},
    "adafactor": {"optim.name": "galore_adafactor", "optim.lr": 3e-2,
                  "optim.args": f"{{rank: 8, update_proj_gap: {GAP}, relative_step: false, beta1: 0.9}}"},
}


def _run_jobs(rank, world, root, engine, jobs, resume=None, tag=""):
    from slimtrain.run.config import load_config
    from slimtrain.trainer.trainer import Trainer

    out = {}
    for name in jobs:
        extra = dict(JOBS[name])
        accum = int(extra.get("train.grad_accum", 1))
        cfg = load_config(None, tiny_overrides(pathlib.Path(root), os.path.join(root, f"{name}_{engine}_w{world}{tag}"), **{
            "train.batch_size": 4 // world // accum, "dist.engine": engine, "checkpoint.every": 4, "checkpoint.keep": 3,
            **extra}))
        trainer = Trainer(cfg, resume=resume)
        try:
            trainer.train()
            hook = getattr(trainer.engine, "hook", None)
            low = getattr(trainer.engine, "lowrank", None)
            sizes = None
            if low is not None:  # (full, projected) numel of every projected matrix
                sizes = [(p.numel(), low.project_grad(p, torch.zeros_like(p)).numel()) for p, _ in low.lowrank_params()]
            ddp = getattr(trainer.engine, "ddp", None)
            out[name] = {
                "engine": trainer.engine.name,
                # bytes in DDP's gradient buckets (its own logging data) vs the tensors that train now
                "synced": ddp._get_ddp_logging_data()["total_parameter_size_bytes"] if ddp is not None else None,
                "trained": sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad),
                "all": sum(p.numel() * p.element_size() for p in trainer.model.parameters()),
                "losses": losses(cfg.output_dir) if rank == 0 else None,
                "weights": torch.cat([p.detach().float().reshape(-1) for p in trainer.model.parameters()]),
                "bytes": (hook.bytes, hook.projected_bytes) if hook is not None else None,
                "sizes": sizes,
                "numel": sum(p.numel() for p in trainer.model.parameters()),
            }
        finally:
            trainer.close()
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return prepared_root(tmp_path_factory, "ddp")


@pytest.fixture(scope="module")
def single(root):
    return _run_jobs(0, 1, root, "torch", list(JOBS))


@pytest.fixture(scope="module")
def two(root):
    return run_ranks(_run_jobs, 2, root, "ddp", list(JOBS))


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(JOBS))
def test_ddp_two_ranks_match_one_process(name, single, two):
    assert two[0][name]["engine"] == ("zeroth_order" if name == "mezo" else "ddp")
    curve, ref = two[0][name]["losses"], single[name]["losses"]
    assert len(curve) == len(ref) == STEPS and (ref[-1] < ref[0] or name == "mezo")
    assert max(abs(a - b) for a, b in zip(curve, ref)) < TOL, (curve, ref)
    assert torch.equal(two[0][name]["weights"], two[1][name]["weights"]), "ranks hold different weights"
    w = single[name]["weights"]
    assert (two[0][name]["weights"] - w).abs().max() <= 1e-4 * max(1.0, w.abs().max())


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["galore", "galore8bit", "galore_accum"])
def test_ddp_hook_sends_projected_gradients_between_refreshes(name, two):
    sent, projected = two[0][name]["bytes"]
    sizes, numel = two[0][name]["sizes"], two[0][name]["numel"]
    refreshes = len(range(0, STEPS, GAP))  # steps 0, 3, 6 compute new projectors from full gradients
    full_matrices = sum(full for full, _ in sizes)
    # 4-byte gradients: every other tensor every step; projected matrices whole on refresh steps
    # and projected (r x n) on the others
    expect_projected = 4 * (STEPS - refreshes) * sum(low for _, low in sizes)
    expect = 4 * STEPS * (numel - full_matrices) + 4 * refreshes * full_matrices + expect_projected
    assert projected == expect_projected and sent == expect, (sent, expect, projected, expect_projected)
    # against plain DDP (every gradient whole, every step)
    assert sent < 0.75 * 4 * STEPS * numel


def test_ddp_refuses_what_it_cannot_carry(root):
    from slimtrain.run.config import ConfigError, load_config
    from slimtrain.optim.registry import optimizer_spec
    from slimtrain.trainer.engines import check_combination

    def check(**extra):
        cfg = load_config(None, tiny_overrides(pathlib.Path(root), os.path.join(root, "x"), **{"dist.engine": "ddp", **extra}))
        args = cfg.optim.args or {}
        check_combination(cfg, optimizer_spec(cfg.optim.name, **args), say=lambda *_: None)

    with pytest.raises(ConfigError, match="INT8"):
        check(**{"optim.name": "qgalore_adamw8bit"})
    with pytest.raises(ConfigError, match="zero_stage=2"):
        check(**{"optim.name": "adamw", "dist.zero_stage": 2})
    with pytest.raises(ConfigError, match="layer-wise"):
        check(**{"optim.name": "galore_adamw", "optim.args": "{rank: 8, layerwise: true}"})
    check(**{"optim.name": "galore_adamw"})  # accepted
    check(**{"optim.name": "lisa"})  # re-wrapped when its trained set changes


@pytest.mark.distributed
def test_ddp_lisa_buckets_only_the_layers_that_train(two):
    lisa = two[0]["lisa"]
    assert lisa["engine"] == "ddp"
    # after the last switch DDP's buckets hold the trained tensors only: frozen layers send nothing
    assert lisa["synced"] == lisa["trained"] < 0.8 * lisa["all"], lisa


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_four_ranks_match_one_process(root, single):
    four = run_ranks(_run_jobs, 4, root, "ddp", ["galore", "adamw8bit", "lisa"])
    for name in ("galore", "adamw8bit", "lisa"):
        assert four[0][name]["engine"] == "ddp"
        curve, ref = four[0][name]["losses"], single[name]["losses"]
        assert max(abs(a - b) for a, b in zip(curve, ref)) < TOL, (name, curve, ref)
        assert all(torch.equal(four[0][name]["weights"], four[r][name]["weights"]) for r in range(4))
        w = single[name]["weights"]
        assert (four[0][name]["weights"] - w).abs().max() <= 1e-4 * max(1.0, w.abs().max())


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_checkpoint_resumes_exactly_and_at_other_world_sizes(root, two):
    # replicated state: one model file and one optimizer file, valid at any number of ranks
    import shutil

    full = two[0]["galore"]["losses"]
    saved = shutil.copytree(os.path.join(root, "galore_ddp_w2", "checkpoints", "step_00000004"),
                            os.path.join(root, "ddp_saved4"))
    run_ranks(_run_jobs, 2, root, "ddp", ["galore"], saved, "_resumed")
    assert losses(os.path.join(root, "galore_ddp_w2_resumed"))[-4:] == full[-4:]  # bit-exact at the same N
    run_ranks(_run_jobs, 4, root, "ddp", ["galore"], saved, "_resumed")
    curve = losses(os.path.join(root, "galore_ddp_w4_resumed"))
    assert len(curve) == 4 and max(abs(a - b) for a, b in zip(curve, full[-4:])) < TOL, (curve, full)

    # LISA: the resumed run re-wraps DDP over the layers the checkpoint says are training (the
    # engine wrapped the freshly built optimizer's set first)
    lisa = shutil.copytree(os.path.join(root, "lisa_ddp_w2", "checkpoints", "step_00000004"),
                           os.path.join(root, "lisa_saved4"))
    resumed = run_ranks(_run_jobs, 2, root, "ddp", ["lisa"], lisa, "_resumed")
    assert losses(os.path.join(root, "lisa_ddp_w2_resumed"))[-4:] == two[0]["lisa"]["losses"][-4:]
    assert resumed[0]["lisa"]["synced"] == resumed[0]["lisa"]["trained"]
