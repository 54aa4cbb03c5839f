"""``dist.engine=fsdp``: FSDP2 (``fully_shard`` per decoder layer + root) with real gloo ranks.

2 ranks x batch 2 must follow one process x batch 4 on ``dist.engine=torch`` (loss within 1e-4
nats per step, weights within 1e-4; the reduce-scatter sums in another order), the sharded
parameters, gradients and optimizer state must be about half per rank, checkpoints (full state
dicts gathered with ``torch.distributed.checkpoint.state_dict``) must resume bit-exactly at the
same world size and within 1e-4 at another, and the export must be the gathered model.
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
STEPS = 8


def _local_bytes(tensors) -> int:
    out = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        out += t.numel() * t.element_size()
    return out


def _run(rank, world, root, name, engine, extra, resume=None):
    from slimtrain.run.config import load_config
    from slimtrain.trainer.trainer import Trainer

    cfg = load_config(None, tiny_overrides(pathlib.Path(root), os.path.join(root, name), **{
        "train.batch_size": 4 // world, "dist.engine": engine, "optim.name": "adamw", **extra}))
    trainer = Trainer(cfg, resume=resume)
    try:
        trainer.train()
        # the optimizer's parameters: the sharded fp32 masters (under a bf16 policy a module may
        # still hold its unsharded bf16 copy after the last forward)
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        state = [v for s in trainer.optimizer.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor) and v.dim() > 0]
        full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in trainer.model.state_dict().items()}
        return {"engine": trainer.engine.name, "losses": losses(cfg.output_dir) if rank == 0 else None,
                "weights": torch.cat([full[k].detach().float().reshape(-1) for k in sorted(full)]),
                "param_bytes": _local_bytes(params), "state_bytes": _local_bytes(state),
                "sharded": all(hasattr(p, "to_local") for p in params), "param_dtypes": {p.dtype for p in params}}
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return prepared_root(tmp_path_factory, "fsdp")


@pytest.fixture(scope="module")
def single(root):
    return _run(0, 1, root, "single", "torch", {"checkpoint.every": 4, "checkpoint.keep": 3})


@pytest.fixture(scope="module")
def two(root):
    return run_ranks(_run, 2, root, "two", "fsdp", {"checkpoint.every": 4, "checkpoint.keep": 3,
                                                    "export.dir": os.path.join(root, "two", "hf")})


@pytest.mark.distributed
def test_fsdp_two_ranks_match_one_process(single, two):
    assert two[0]["engine"] == "fsdp" and two[0]["sharded"]
    curve, ref = two[0]["losses"], single["losses"]
    assert len(curve) == len(ref) == STEPS and ref[-1] < ref[0]
    assert max(abs(a - b) for a, b in zip(curve, ref)) < TOL, (curve, ref)
    assert torch.equal(two[0]["weights"], two[1]["weights"])
    assert (two[0]["weights"] - single["weights"]).abs().max() <= 1e-4 * max(1.0, single["weights"].abs().max())


MEZO = {"optim.name": "mezo", "optim.lr": 1e-4, "optim.args": "{eps: 0.001}"}


@pytest.mark.distributed
def test_fsdp_mezo_perturbs_each_shard_as_one_process_does(root):
    # each rank draws the noise stream by global element index and moves its own rows; one loss
    # all-reduce per evaluation; the no-grad forwards leave no stale unsharded weights behind
    single = _run(0, 1, root, "mezo_single", "torch", MEZO)
    two = run_ranks(_run, 2, root, "mezo_two", "fsdp", {**MEZO, "checkpoint.every": 4, "checkpoint.keep": 3})
    curve, ref = two[0]["losses"], single["losses"]
    assert len(curve) == len(ref) == STEPS
    assert max(abs(a - b) for a, b in zip(curve, ref)) < TOL, (curve, ref)
    assert torch.equal(two[0]["weights"], two[1]["weights"])
    moved = (single["weights"] - _run(0, 1, root, "mezo_zero", "torch", {**MEZO, "optim.lr": 1e-12})["weights"]).abs()
    assert moved.max() > 1e-5  # the trajectory is not trivially the initial weights
    assert (two[0]["weights"] - single["weights"]).abs().max() <= 1e-4 * max(1.0, single["weights"].abs().max())
    # resume at the same world size: bit-exact
    saved = shutil.copytree(os.path.join(root, "mezo_two", "checkpoints", "step_00000004"),
                            os.path.join(root, "mezo_saved4"))
    run_ranks(_run, 2, root, "mezo_resume", "fsdp", {**MEZO, "checkpoint.every": 4, "checkpoint.keep": 3}, saved)
    assert losses(os.path.join(root, "mezo_resume"))[-4:] == curve[-4:]


# blocks of 32 = one row of every tiny-model matrix: each rank's rows start on a block boundary,
# so the shards quantize exactly the blocks one process does (only the reduce order differs)
ADAMW8BIT = {"optim.name": "adamw8bit", "optim.args": "{block_size: 32, min_8bit_size: 1024}"}


@pytest.mark.distributed
def test_fsdp_adamw8bit_blocks_on_local_shards(root):
    single = _run(0, 1, root, "a8_single", "torch", ADAMW8BIT)
    extra = {**ADAMW8BIT, "checkpoint.every": 4, "checkpoint.keep": 3}
    two = run_ranks(_run, 2, root, "a8_two", "fsdp", extra)
    curve, ref = two[0]["losses"], single["losses"]
    assert max(abs(a - b) for a, b in zip(curve, ref)) < TOL, (curve, ref)
    assert (two[0]["weights"] - single["weights"]).abs().max() <= 1e-4 * max(1.0, single["weights"].abs().max())
    for r in range(2):  # 8-bit codes + absmax of half the rows per rank
        assert two[r]["state_bytes"] <= 0.55 * single["state_bytes"], (two[r]["state_bytes"], single["state_bytes"])
    ckpt = os.path.join(root, "a8_two", "checkpoints", "step_00000004")
    assert sorted(f for f in os.listdir(ckpt) if f.startswith("optim")) == ["optim_rank0.pt", "optim_rank1.pt"]
    saved = shutil.copytree(ckpt, os.path.join(root, "a8_saved4"))
    run_ranks(_run, 2, root, "a8_resume", "fsdp", extra, saved)
    assert losses(os.path.join(root, "a8_resume"))[-4:] == curve[-4:]  # bit-exact at the same N
    from slimtrain.run.config import ConfigError

    with pytest.raises(ConfigError, match="resume it on 2 ranks"):
        _run(0, 1, root, "a8_resume1", "fsdp", extra, saved)


@pytest.mark.distributed
def test_fsdp_shards_weights_and_state(single, two):
    for r in range(2):
        # dim-0 shards: half of every tensor (rounded up) per rank
        assert two[r]["param_bytes"] <= 0.55 * single["param_bytes"], (two[r]["param_bytes"], single["param_bytes"])
        assert two[r]["state_bytes"] <= 0.55 * single["state_bytes"], (two[r]["state_bytes"], single["state_bytes"])
    assert two[0]["param_bytes"] + two[1]["param_bytes"] >= single["param_bytes"]


@pytest.mark.distributed
def test_fsdp_export_is_the_gathered_model(root, two):
    from safetensors.torch import load_file

    exported = load_file(os.path.join(root, "two", "hf", "model.safetensors"))
    flat = torch.cat([exported[k].float().reshape(-1) for k in sorted(exported)])
    assert torch.equal(flat, two[0]["weights"])


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_checkpoint_resumes_exactly_and_at_other_world_sizes(root, two):
    ckpt = os.path.join(root, "two", "checkpoints", "step_00000004")
    for f in ("model.pt", "optim.pt"):  # full tensors, plain torch.load
        state = torch.load(os.path.join(ckpt, f), weights_only=True)
        assert state
    saved = shutil.copytree(ckpt, os.path.join(root, "saved4"))
    full = two[0]["losses"]
    extra = {"checkpoint.every": 4, "checkpoint.keep": 3}
    same = run_ranks(_run, 2, root, "resume2", "fsdp", extra, saved)
    assert losses(os.path.join(root, "resume2"))[-4:] == full[-4:]  # bit-exact at the same N
    assert torch.equal(same[0]["weights"], two[0]["weights"])
    one = _run(0, 1, root, "resume1", "fsdp", extra, saved)
    curve = losses(os.path.join(root, "resume1"))
    assert len(curve) == 4 and max(abs(a - b) for a, b in zip(curve, full[-4:])) < TOL
    assert (one["weights"] - two[0]["weights"]).abs().max() < TOL
    from slimtrain.run.config import ConfigError

    with pytest.raises(ConfigError, match="resume it with dist.engine=fsdp"):  # name-keyed optimizer state
        _run(0, 1, root, "resume_torch", "torch", extra, saved)
    four = run_ranks(_run, 4, root, "resume4", "fsdp", extra, saved)
    curve = losses(os.path.join(root, "resume4"))
    assert len(curve) == 4 and max(abs(a - b) for a, b in zip(curve, full[-4:])) < TOL
    assert (four[0]["weights"] - two[0]["weights"]).abs().max() < TOL


@pytest.mark.distributed
def test_fsdp_bf16_mixed_precision_trains_fp32_shards(root):
    # MixedPrecisionPolicy: bf16 compute, fp32 reduction, fp32 sharded master weights and state
    out = run_ranks(_run, 2, root, "bf16", "fsdp", {"train.bf16": "true", "optim.lr": 1e-2})
    curve = out[0]["losses"]
    assert curve[-1] < curve[0] - 0.3, curve
    assert out[0]["param_dtypes"] == {torch.float32} and torch.equal(out[0]["weights"], out[1]["weights"])


def test_fsdp_refuses_optimizers_that_do_not_step_on_shards(root):
    from slimtrain.optim.registry import optimizer_spec
    from slimtrain.run.config import ConfigError, load_config
    from slimtrain.trainer.engines import check_combination

    def check(**extra):
        cfg = load_config(None, tiny_overrides(pathlib.Path(root), os.path.join(root, "x"), **{"dist.engine": "fsdp", **extra}))
        check_combination(cfg, optimizer_spec(cfg.optim.name, **(cfg.optim.args or {})), say=lambda *_: None)

    for name in ("galore_adamw", "lisa", "sparse_mezo", "qgalore_adamw8bit"):
        with pytest.raises(ConfigError, match="dtensor_params.*dist.engine=torch"):
            check(**{"optim.name": name})
    with pytest.raises(ConfigError, match="leave dist.zero_stage=0"):
        check(**{"optim.name": "adamw", "dist.zero_stage": 2})
    check(**{"optim.name": "adamw"})
    check(**{"optim.name": "mezo"})
    check(**{"optim.name": "adamw8bit"})
