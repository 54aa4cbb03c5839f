"""``dist.engine=fsdp``: FSDP2 (``fully_shard`` per decoder layer + root) with real gloo ranks.

Every optimizer family (AdamW, 8-bit AdamW, GaLore fp32 / 8-bit / Adafactor, layer-wise GaLore,
LISA, MeZO): 2 ranks x batch 2 (and 4 x 1) must follow one process x batch 4 (loss within 1e-4
nats per step, weights within 1e-4; the reduce-scatter sums in another order), the sharded
parameters, gradients and optimizer state must be about 1/N per rank, checkpoints must resume
bit-exactly at the same world size and within 1e-4 at another (AdamW: full state dicts gathered
with ``torch.distributed.checkpoint.state_dict``; shard-local state: one file per rank, rows re-cut
at another world size), and the export must be the gathered model.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

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
# so the shards quantize exactly the blocks one process does (only the reduce order differs). An
# 8-bit code that the reduce order's last bit pushes over a rounding boundary moves its weight by
# about lr x one quantization step, so these runs use lr 1e-3: such a flip then stays < 1e-4.
ADAMW8BIT = {"optim.name": "adamw8bit", "optim.lr": 1e-3, "optim.args": "{block_size: 32, min_8bit_size: 1024}"}


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
    _assert_written_by_each_rank(ckpt, 2)
    saved = shutil.copytree(ckpt, os.path.join(root, "a8_saved4"))
    run_ranks(_run, 2, root, "a8_resume", "fsdp", extra, saved)
    assert losses(os.path.join(root, "a8_resume"))[-4:] == curve[-4:]  # bit-exact at the same N
    # one process: the two shards' blocks (each row one block of 32) joined as they were
    one = _run(0, 1, root, "a8_resume1", "fsdp", extra, saved)
    assert max(abs(a - b) for a, b in zip(losses(os.path.join(root, "a8_resume1")), curve[-4:])) < TOL
    assert (one["weights"] - two[0]["weights"]).abs().max() < TOL


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

    from slimtrain.run.scoring import export_checkpoint

    exported = load_file(os.path.join(root, "two", "hf", "model.safetensors"))
    flat = torch.cat([exported[k].float().reshape(-1) for k in sorted(exported)])
    assert torch.equal(flat, two[0]["weights"])
    # `slimtrain export` of the last checkpoint: one process joins the two ranks' DCP shards
    out = export_checkpoint(os.path.join(root, "two", "checkpoints", f"step_{STEPS:08d}"), os.path.join(root, "two_hf"))
    joined = load_file(os.path.join(out, "model.safetensors"))
    assert torch.equal(torch.cat([joined[k].float().reshape(-1) for k in sorted(joined)]), flat)


def _assert_written_by_each_rank(ckpt, world):
    """An FSDP2 checkpoint: nothing gathered (no model.pt), one DCP shard file per rank of about
    1/N of the tensors, the rest of each rank's optimizer state in a weights_only file, and
    torch's own converter turns the DCP directory into a plain torch.save file."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    assert not os.path.exists(os.path.join(ckpt, "model.pt"))
    files = sorted(f for f in os.listdir(os.path.join(ckpt, "dcp")) if f.endswith(".distcp"))
    assert files == [f"__{r}_0.distcp" for r in range(world)]
    sizes = [os.path.getsize(os.path.join(ckpt, "dcp", f)) for f in files]
    assert max(sizes) <= 1.5 * sum(sizes) / world, sizes  # sharded, not one rank writing all
    skeletons = [torch.load(os.path.join(ckpt, f"optim_rank{r}.pt"), weights_only=True) for r in range(world)]
    assert all(skeletons)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(os.path.join(ckpt, "dcp"), os.path.join(tmp, "joined.pt"))
        joined = torch.load(os.path.join(tmp, "joined.pt"), weights_only=True)
    assert any(k.startswith("model.") for k in joined) and any(k.startswith("optim") for k in joined)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_checkpoint_resumes_exactly_and_at_other_world_sizes(root, two):
    ckpt = os.path.join(root, "two", "checkpoints", "step_00000004")
    _assert_written_by_each_rank(ckpt, 2)
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

    for name in ("sparse_mezo", "natural_galore_adamw", "apollo_adamw", "fira_adamw"):
        with pytest.raises(ConfigError, match="dtensor_params.*dist.engine=torch"):
            check(**{"optim.name": name})
    with pytest.raises(ConfigError, match="INT8 weights.*galore_adamw8bit under FSDP2"):
        check(**{"optim.name": "qgalore_adamw8bit"})
    with pytest.raises(ConfigError, match="layerwise=True"):  # 8-bit AdamW's layer-wise mode is not carried
        check(**{"optim.name": "adamw8bit", "optim.args": "{layerwise: true}", "train.max_grad_norm": 0})
    with pytest.raises(ConfigError, match="leave dist.zero_stage=0"):
        check(**{"optim.name": "adamw", "dist.zero_stage": 2})
    for name in ("adamw", "galore_adamw", "galore_adamw8bit", "galore_adafactor", "lisa", "mezo"):
        check(**{"optim.name": name})
    check(**{"optim.name": "galore_adamw", "optim.args": "{layerwise: true}", "train.max_grad_norm": 0})


def test_fsdp_galore_refuses_a_left_projector_on_row_shards(root):
    # a left projector would mix rows other ranks hold: refused with the fix, not silently changed
    with pytest.raises(ValueError, match="proj_type='left'.*Use proj_type='right'"):
        _run(0, 1, root, "left", "fsdp", {"optim.name": "galore_adamw", "optim.args": "{rank: 8, proj_type: left}"})


# ---------------------------------------------------------------------------- every family on FSDP2
# GaLore on row shards projects from the right (the side every rank holds whole), so the
# one-process references use proj_type=right; refresh-heavy runs (update_proj_gap 3) are compared
# with dist.engine=fsdp on one process, whose projectors get the same sign rule.
RIGHT = "rank: 8, proj_type: right"
FAMILIES = {
    "galore": {"optim.name": "galore_adamw", "optim.args": f"{{{RIGHT}}}"},
    # rank 16: the (64, 32) matrices' moments (64 x 16) reach min_8bit_size and are 8-bit, in
    # blocks of 32 that every rank's rows start on
    "galore8bit": {"optim.name": "galore_adamw8bit",
                   "optim.args": "{rank: 16, proj_type: right, block_size: 32, min_8bit_size: 1024}"},
    "adafactor": {"optim.name": "galore_adafactor", "optim.lr": 3e-2,
                  "optim.args": f"{{{RIGHT}, relative_step: false, beta1: 0.9}}"},
    "lisa": {"optim.name": "lisa", "optim.args": "{n_active: 1, interval: 3}"},
    "adamw8bit": ADAMW8BIT,
    # layer-wise: each shard is updated in its hook right after FSDP2's reduce-scatter, with the
    # projected gradient accumulated over 2 micro-batches; per-tensor clipping
    "layerwise": {"optim.name": "galore_adamw", "train.grad_accum": 2, "train.max_grad_norm": 0,
                  "optim.args": f"{{{RIGHT}, layerwise: true, accumulation_steps: 2, max_grad_norm: 0.5}}"},
    # refreshes at steps 0, 3, 6: exact SVD of the gathered gradient (first rank + broadcast) ...
    "refresh_svd": {"optim.name": "galore_adamw", "optim.args": "{rank: 8, update_proj_gap: 3}"},
    # ... and the distributed range finder (its all-reduces are smaller than the matrices here)
    "refresh_sketch": {"optim.name": "galore_adamw",
                       "optim.args": "{rank: 8, update_proj_gap: 3, proj_method: randomized, oversample: 2, "
                                     "power_iters: 0}"},
}
AGAINST_FSDP_ONE = ("refresh_svd", "refresh_sketch")


def _proj_bytes(optimizer) -> int:
    return sum(_local_bytes([v]) for s in optimizer.state.values() for k, v in s.items()
               if k.startswith("proj_") and isinstance(v, torch.Tensor))


def _run_jobs(rank, world, root, engine, jobs, tag, checkpoint_every=0):
    from slimtrain.optim.shards import local
    from slimtrain.run.config import load_config
    from slimtrain.trainer.trainer import Trainer

    out = {}
    for name in jobs:
        extra = dict(FAMILIES[name])
        accum = int(extra.get("train.grad_accum", 1))
        out_dir = os.path.join(root, f"{tag}_{name}")
        cfg = load_config(None, tiny_overrides(pathlib.Path(root), out_dir, **{
            "train.batch_size": 4 // world // accum, "dist.engine": engine, "checkpoint.every": checkpoint_every,
            "checkpoint.keep": 3, **extra}))
        trainer = Trainer(cfg)
        try:
            trainer.train()
            params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
            state = [v for s in trainer.optimizer.state.values() for v in s.values()
                     if isinstance(v, torch.Tensor) and v.dim() > 0]
            # one more backward, to measure the gradients a rank holds (every rank runs it: FSDP2's
            # forward is collective)
            x = torch.arange(32).remainder(250).reshape(2, 16)
            trainer.model(input_ids=x, labels=x).loss.backward()
            grads = [local(p.grad) for p in params if p.grad is not None]
            full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in trainer.model.state_dict().items()}
            out[name] = {"engine": trainer.engine.name, "losses": losses(out_dir) if rank == 0 else None,
                         "weights": torch.cat([full[k].detach().float().reshape(-1) for k in sorted(full)]),
                         "param_bytes": _local_bytes(params), "grad_bytes": _local_bytes(grads),
                         "state_bytes": _local_bytes(state), "proj_bytes": _proj_bytes(trainer.optimizer)}
        finally:
            trainer.close()
    return out


def _close(a, b, what):
    curve, ref = a["losses"], b["losses"]
    assert len(curve) == len(ref) == STEPS, what
    assert max(abs(x - y) for x, y in zip(curve, ref)) < TOL, (what, curve, ref)
    assert (a["weights"] - b["weights"]).abs().max() <= 1e-4 * max(1.0, b["weights"].abs().max()), what


@pytest.fixture(scope="module")
def families_single(root):
    torch_jobs = [n for n in FAMILIES if n not in AGAINST_FSDP_ONE]
    out = _run_jobs(0, 1, root, "torch", torch_jobs, "fam_single")
    out.update(_run_jobs(0, 1, root, "fsdp", AGAINST_FSDP_ONE, "fam_fsdp1"))
    return out


@pytest.fixture(scope="module")
def families_two(root):
    return run_ranks(_run_jobs, 2, root, "fsdp", list(FAMILIES), "fam_two", 4)


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(FAMILIES))
def test_fsdp_every_family_matches_one_process(name, families_single, families_two):
    two, ref = families_two, families_single[name]
    assert two[0][name]["engine"] == "fsdp"
    assert ref["losses"][-1] < ref["losses"][0], ref["losses"]  # it trains
    assert torch.equal(two[0][name]["weights"], two[1][name]["weights"]), "ranks gathered different weights"
    _close(two[0][name], ref, name)


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(FAMILIES))
def test_fsdp_every_family_halves_weights_grads_and_state(name, families_single, families_two):
    ref = families_single[name]
    for r in range(2):
        got = families_two[r][name]
        # dim-0 shards: half of every tensor (rounded up) per rank
        assert got["param_bytes"] <= 0.55 * ref["param_bytes"], (got["param_bytes"], ref["param_bytes"])
        assert got["grad_bytes"] <= 0.55 * ref["grad_bytes"], (got["grad_bytes"], ref["grad_bytes"])
        # moments (and 8-bit blocks) follow the rows; GaLore's (r x n) projectors are replicated
        sharded, ref_sharded = got["state_bytes"] - got["proj_bytes"], ref["state_bytes"] - ref["proj_bytes"]
        assert sharded <= 0.55 * ref_sharded, (sharded, ref_sharded)
        assert got["proj_bytes"] <= ref["proj_bytes"]


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_four_ranks_match_one_process(root, families_single):
    names = ["galore", "adamw8bit", "lisa"]
    four = run_ranks(_run_jobs, 4, root, "fsdp", names, "fam_four", 4)
    for name in names:
        assert all(torch.equal(four[0][name]["weights"], four[r][name]["weights"]) for r in range(4))
        _close(four[0][name], families_single[name], name)
        got, ref = four[1][name], families_single[name]
        assert got["param_bytes"] <= 0.3 * ref["param_bytes"] and got["grad_bytes"] <= 0.3 * ref["grad_bytes"]


def _resume_jobs(rank, world, root, name, saved, tag):
    from slimtrain.run.config import load_config
    from slimtrain.trainer.trainer import Trainer

    extra = dict(FAMILIES[name])
    cfg = load_config(None, tiny_overrides(pathlib.Path(root), os.path.join(root, tag), **{
        "train.batch_size": 4 // world, "dist.engine": "fsdp", "checkpoint.every": 4, "checkpoint.keep": 3, **extra}))
    trainer = Trainer(cfg, resume=saved)
    try:
        trainer.train()
    finally:
        trainer.close()


def _resume(root, name, source_tag, world, tag):
    saved = shutil.copytree(os.path.join(root, f"{source_tag}_{name}", "checkpoints", "step_00000004"),
                            os.path.join(root, f"{tag}_saved"))
    if world == 1:
        _resume_jobs(0, 1, root, name, saved, tag)
    else:
        run_ranks(_resume_jobs, world, root, name, saved, tag)
    return losses(os.path.join(root, tag))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("name", ["galore8bit", "lisa", "adafactor"])
def test_fsdp_sharded_state_resumes_exactly_and_at_other_world_sizes(root, name, families_two):
    # per-rank state files (8-bit blocks, GaLore's row moments, LISA's DTensor moments as local
    # shards): bit-exact at the same N; rows re-cut (8-bit blocks copied where they align) at another
    full = families_two[0][name]["losses"]
    ckpt = os.path.join(root, f"fam_two_{name}", "checkpoints", "step_00000004")
    _assert_written_by_each_rank(ckpt, 2)
    assert _resume(root, name, "fam_two", 2, f"{name}_r2")[-4:] == full[-4:]
    for world in (1, 4):
        curve = _resume(root, name, "fam_two", world, f"{name}_r{world}")
        assert len(curve) == 4 and max(abs(a - b) for a, b in zip(curve, full[-4:])) < TOL, (world, curve, full)


@pytest.mark.distributed
@pytest.mark.slow
def test_fsdp_adamw8bit_resumes_from_four_ranks_on_two(root):
    four = run_ranks(_run_jobs, 4, root, "fsdp", ["adamw8bit"], "a8_four", 4)
    full = four[0]["adamw8bit"]["losses"]
    curve = _resume(root, "adamw8bit", "a8_four", 2, "a8_four_to_two")
    assert len(curve) == 4 and max(abs(a - b) for a, b in zip(curve, full[-4:])) < TOL, (curve, full)
