"""Issue 12, point 1 (and 5): a step applies only when the loss and every gradient are finite,
checkpoints are written only from finite weights and verify, rotation keeps the newest good one,
divergence stops the run, metrics stay strict JSON, MeZO never writes NaN weights."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from slimtrain.run import checkpoint as ckpt
from slimtrain.run.guard import DivergenceGuard
from slimtrain.trainer import Trainer, TrainingStopped, load_config
from trainer_setup import run_cli, tiny_overrides


def _strict_rows(path):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    with open(path) as fh:
        return [json.loads(line, parse_constant=refuse) for line in fh if line.strip()]


def _assert_all_checkpoints_good(root):
    found = ckpt.list_checkpoints(root)
    assert found, "no checkpoint left"
    for path in found:
        assert ckpt.verify_checkpoint(path) is None, path
        model = torch.load(os.path.join(path, "model.pt"), weights_only=True)
        assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point()), path


def _poison_grad_at(trainer, at_step, value=float("inf")):
    """A finite loss whose gradient of one weight is non-finite at step ``at_step`` (1-based)."""
    p = trainer.model.model.layers[0].mlp.up_proj.weight

    def hook(g):
        return g * value if trainer.step + 1 == at_step else g

    p.register_hook(hook)
    return p


@pytest.mark.parametrize("optim, extra", [
    ("adamw", {}),
    ("adamw8bit", {"optim.args": "{min_8bit_size: 0}"}),
    ("lisa", {"optim.args": "{n_active: 1, interval: 2}"}),
    ("galore_adamw", {"optim.args": "{rank: 8, update_proj_gap: 2}"}),
    ("galore_layerwise", {"optim.args": "{rank: 8, update_proj_gap: 2, layerwise: true}", "train.max_grad_norm": 0}),
])
def test_nonfinite_gradient_with_finite_loss_is_not_applied(tmp_path, optim, extra):
    name = "galore_adamw" if optim == "galore_layerwise" else optim
    cfg = load_config(None, tiny_overrides(tmp_path, str(tmp_path / "o"), **{
        "optim.name": name, "train.steps": 4, "train.nan_policy": "skip", "checkpoint.every": 1,
        "checkpoint.keep": 2, **extra}))
    trainer = Trainer(cfg)
    poisoned = _poison_grad_at(trainer, 2)
    seen = {}
    real_step = trainer.run_step

    def step():
        s = trainer.step
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        old = poisoned.detach().clone()
        out = real_step()
        # layer-wise: the tensors updated inside backward before the bad one arrived keep their
        # update; only the non-finite piece is refused (and the step counts as skipped)
        unmoved = (torch.equal(old, poisoned) if optim == "galore_layerwise" else
                   all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items()))
        seen[s + 1] = (out.applied, unmoved)
        return out

    trainer.run_step = step
    summary = trainer.train()
    trainer.close()
    assert seen[2] == (False, True)  # refused, and not a single weight moved
    assert seen[3][0] and not seen[3][1]
    assert summary["nan_skips"] == 1
    _assert_all_checkpoints_good(str(tmp_path / "o" / "checkpoints"))


def test_issue_repro_huge_lr_never_writes_nan_checkpoints(tmp_path):
    # the issue's command, on the tiny model: lr=1e6 with a 10000-step warmup and keep=2. The issue
    # ran before optim.weight_decay reached the trainer's optimizer, i.e. with torch AdamW's default
    # 0.01, which is what blows the weights up to non-finite values: say so explicitly.
    out = tmp_path / "o"
    cfg = load_config(None, tiny_overrides(tmp_path, str(out), **{"optim.weight_decay": 0.01,
        "train.steps": 30, "checkpoint.every": 1, "checkpoint.keep": 2, "optim.lr": 1e6,
        "train.warmup_steps": 10000, "train.nan_policy": "skip", "train.max_nan_skips": 3,
        "train.divergence_margin": 0}))
    trainer = Trainer(cfg)
    with pytest.raises(TrainingStopped) as e:
        trainer.train()
    trainer.close()
    _assert_all_checkpoints_good(str(out / "checkpoints"))
    good = ckpt.latest_good_checkpoint(str(out / "checkpoints"))
    assert f"--resume {good}" in str(e.value)
    rows = _strict_rows(out / "metrics.jsonl")  # strict JSON: no bare NaN
    assert len(rows) >= 2


def test_stop_message_names_a_verified_checkpoint_not_a_corrupt_newer_one(tmp_path):
    out = tmp_path / "o"
    cfg = load_config(None, tiny_overrides(tmp_path, str(out), **{"train.steps": 6, "checkpoint.every": 2,
                                                                  "checkpoint.keep": 5}))
    trainer = Trainer(cfg)
    _poison_grad_at(trainer, 5, float("nan"))
    real_save = trainer.save

    def save_then_corrupt():
        path = real_save()
        if trainer.step == 4:
            with open(os.path.join(path, "model.pt"), "r+b") as fh:
                fh.seek(100)
                fh.write(b"\x00garbage")
        return path

    trainer.save = save_then_corrupt
    with pytest.raises(TrainingStopped) as e:
        trainer.train()
    trainer.close()
    msg = str(e.value)
    assert "non-finite gradients" in msg and "step 5" in msg and "step_00000002" in msg, msg


def test_checkpoint_refuses_non_finite_weights(tmp_path):
    root = str(tmp_path / "ck")
    ckpt.save_checkpoint(root, 1, rank=0, model_state={"w": torch.ones(2)}, optim_state={}, trainer_state={})
    with pytest.raises(ckpt.NonFiniteState, match=r"model\.w"):
        ckpt.save_checkpoint(root, 2, rank=0, model_state={"w": torch.tensor([1.0, float("nan")])},
                             optim_state={}, trainer_state={})
    with pytest.raises(ckpt.NonFiniteState, match=r"optimizer\.state\.0\.exp_avg"):
        ckpt.save_checkpoint(root, 2, rank=0, model_state={"w": torch.ones(2)},
                             optim_state={"state": {0: {"exp_avg": torch.tensor([float("inf")])}}}, trainer_state={})
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(root)] == ["step_00000001"]


def test_rotation_keeps_the_newest_verified_good_checkpoint(tmp_path):
    root = str(tmp_path / "ck")
    ckpt.save_checkpoint(root, 1, rank=0, model_state={"w": torch.ones(2)}, optim_state={}, trainer_state={})
    ckpt.save_checkpoint(root, 2, rank=0, model_state={"w": torch.ones(2)}, optim_state={}, trainer_state={})
    with open(os.path.join(root, "step_00000002", "model.pt"), "r+b") as fh:  # bit rot in the newest
        fh.write(b"\xff\xff")
    ckpt.rotate(root, keep=1)
    # keep=1 would leave only step 2, which is corrupt: step 1 (the newest good one) survives
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(root)] == ["step_00000001", "step_00000002"]


def test_divergence_stops_with_a_clear_message_and_nonzero_exit(tmp_path):
    out = tmp_path / "o"
    args = tiny_overrides(tmp_path, str(out), **{"train.steps": 6, "optim.lr": 1e6, "train.warmup_steps": 10000,
                                                 "train.nan_policy": "skip", "train.max_nan_skips": 10,
                                                 "checkpoint.every": 3})
    result = run_cli(args, cwd=str(tmp_path))
    assert result.returncode == 3, result.stderr[-2000:]
    assert "diverged" in result.stderr and "train.divergence_margin=2.0" in result.stderr, result.stderr[-2000:]
    assert "--resume" in result.stderr and "Traceback" not in result.stderr
    _strict_rows(out / "metrics.jsonl")


def test_divergence_guard_unit():
    guard = DivergenceGuard(1.0, initial=5.0)
    assert guard.check(5.9, 3) is None
    assert "diverged" in guard.check(6.1, 4)
    assert "nan" in guard.check(float("nan"), 5)
    assert DivergenceGuard(0.0, initial=5.0).check(1e9, 1) is None  # off


def test_mezo_nan_closure_leaves_weights_untouched():
    from slimtrain.optim.mezo import MeZO

    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = MeZO([w], lr=1e-2, eps=1e-3)
    before = w.detach().clone()
    loss = opt.step(lambda: torch.tensor(float("nan")))
    assert math.isnan(float(loss)) and torch.equal(w, before) and opt.nonfinite_refused == 1
    opt.step(lambda: (w * w).sum())  # a finite closure still updates
    assert not torch.equal(w, before)


def test_metrics_writer_writes_null_for_non_finite(tmp_path):
    from slimtrain.run.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path), None)
    writer.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "lr": 1e-3})
    writer.close()
    assert _strict_rows(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": None, "grad_norm": None, "lr": 1e-3}]


# ---------------------------------------------------------------------------- point 5: integrity
@pytest.mark.parametrize("damage", ["truncate", "overwrite", "empty"])
def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, damage):
    out = tmp_path / "o"
    over = tiny_overrides(tmp_path, str(out), **{"train.steps": 4, "checkpoint.every": 2, "checkpoint.keep": 5})
    t = Trainer(load_config(None, over))
    t.train()
    t.close()
    newest = out / "checkpoints" / "step_00000004" / "model.pt"
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "overwrite":  # same size, a few bytes changed: would load silently without the manifest
        newest.write_bytes(data[:200] + bytes(b ^ 0xFF for b in data[200:204]) + data[204:])
    else:
        newest.write_bytes(b"")
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step_00000004.*model\.pt"):
        resumed = Trainer(load_config(None, over), resume=True)
    assert resumed.resumed_from.endswith("step_00000002") and resumed.step == 2
    resumed.close()
    with pytest.raises(ckpt.CheckpointError, match=r"fails verification.*model\.pt.*resume from .*step_00000002"):
        Trainer(load_config(None, over), resume=str(newest.parent))


# ---------------------------------------------------------------------------- ranks agree
def _nonfinite_on_one_rank(rank, world_size):
    from slimtrain.optim import GaLoreAdamW, galore_param_groups
    from slimtrain.parallel import DataParallelOptimizer
    from slimtrain.run.guard import grads_finite

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    opt = GaLoreAdamW(galore_param_groups(model, rank=4, update_proj_gap=100, target_modules=["0"]), lr=1e-2)
    dp = DataParallelOptimizer(opt, zero_stage=2)
    out = {}
    for step in range(2):
        model(torch.randn(8, 16)).pow(2).mean().backward()
        if step == 1 and rank == 1:
            model[2].weight.grad[0, 0] = float("inf")  # only this rank's gradient is bad
        out[f"finite{step}"] = grads_finite(model.parameters())  # what the trainer asks before syncing
        dp.sync_gradients()
        out[f"norm{step}"] = dp.grad_norm()  # the reduced gradients, as every rank sees them
        if math.isfinite(out[f"norm{step}"]):
            dp.step()
        else:
            dp.discard()
        dp.zero_grad()
    out["params"] = [p.detach().clone() for p in model.parameters()]
    return out


@pytest.mark.distributed
def test_a_nonfinite_gradient_on_one_rank_is_refused_by_every_rank():
    from helpers import run_ranks

    r0, r1 = run_ranks(_nonfinite_on_one_rank, 2)
    assert r0["finite0"] and r1["finite0"] and math.isfinite(r0["norm0"])
    assert not r0["finite1"] and not r1["finite1"]  # both ranks skip, before any communication
    assert math.isinf(r0["norm1"]) and math.isinf(r1["norm1"])  # and the reduced norm says so on both
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b) and torch.isfinite(a).all()
