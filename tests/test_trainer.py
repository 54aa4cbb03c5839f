"""Trainer unit and in-process tests: config parsing and validation, data, schedule, a short
training run whose loss falls, NaN handling, and saves that fail without losing the last good
checkpoint."""

from __future__ import annotations

import errno
import json
import math
import os

import pytest
import torch

from slimtrain.trainer import ConfigError, DataError, Trainer, TrainingStopped, load_config
from slimtrain.run import checkpoint as ckpt
from slimtrain.run.config import apply_override
from slimtrain.run.data import BlockOrder, ByteTokenizer, pack
from slimtrain.trainer.trainer import warmup_cosine
from trainer_setup import losses, tiny_overrides


# ---------------------------------------------------------------------------- config
def test_config_yaml_plus_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  name: galore_adamw\n  lr: 1e-3\n  args: {rank: 8}\ntrain:\n  steps: 7\n")
    cfg = load_config(str(path), ["train.steps=9", "optim.args.update_proj_gap=5", "data.files=a.txt,b.txt",
                                  "train.bf16=true"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads "1e-3" as a string
    assert cfg.train.steps == 9 and cfg.train.bf16 is True
    assert cfg.optim.args == {"rank": 8, "update_proj_gap": 5}
    assert cfg.data.files == ["a.txt", "b.txt"]


@pytest.mark.parametrize("override, words", [
    ("train.stepz=3", ["train.stepz", "steps"]),
    ("trian.steps=3", ["trian", "train"]),
    ("train.steps=many", ["train.steps", "'many'", "integer"]),
    ("dist.engine=ds", ["dist.engine", "'ds'", "deepspeed", "torch"]),
    ("train.nan_policy=ignore", ["train.nan_policy", "'ignore'", "stop", "skip"]),
    ("train.batch_size=0", ["train.batch_size", "0", ">= 1"]),
    ("data.eval_fraction=1.5", ["data.eval_fraction", "1.5"]),
    ("dist.zero_stage=3", ["dist.zero_stage", "deepspeed"]),
    ("train.steps", ["train.steps", "key=value"]),
])
def test_config_rejects_bad_input_naming_key_value_and_choices(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_config_rejects_unknown_yaml_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  step: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.step'.*'steps'"):
        load_config(str(path))


def test_unknown_optimizer_lists_registry(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, str(tmp_path / "o"), **{"optim.name": "adamm"}))
    with pytest.raises(ConfigError, match=r"optim.name='adamm'.*galore_adamw"):
        Trainer(cfg)


def test_warmup_cosine_schedule():
    f = warmup_cosine(4, 20, 0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and math.isclose(f(20), 0.1) and math.isclose(f(12), 0.55)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


# ---------------------------------------------------------------------------- data
def test_builtin_corpus_packs_into_train_and_eval_blocks():
    cfg = load_config(None, ["data.seq_len=64"]).data
    data = pack(cfg, ByteTokenizer())
    assert data.tokens > 400_000  # ~465 KB of English
    assert data.train.shape[1] == 64 and data.eval.shape == (64, 64)
    text = ByteTokenizer().decode(data.train[:50].flatten().tolist())
    assert " the " in text


def test_block_order_is_a_fixed_permutation_per_epoch():
    order = BlockOrder(10, seed=3)
    first = order.blocks(0, 10)
    assert sorted(first.tolist()) == list(range(10))
    assert torch.equal(BlockOrder(10, seed=3).blocks(5, 10), torch.cat([first[5:], order.blocks(10, 5)]))
    assert not torch.equal(order.blocks(10, 10), first)  # reshuffled for epoch 1


def test_missing_and_empty_data_fail_before_training(tmp_path):
    with pytest.raises(DataError, match="nothere.txt.*matches no file"):
        Trainer(load_config(None, tiny_overrides(tmp_path, str(tmp_path / "o"),
                                                 **{"data.files": f"[{tmp_path}/nothere.txt]"})))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="0 tokens.*2 \\* data.seq_len = 64"):
        Trainer(load_config(None, tiny_overrides(tmp_path, str(tmp_path / "o"),
                                                 **{"data.files": f"[{tmp_path}/empty.txt]"})))
    assert not (tmp_path / "o").exists()


def test_jsonl_and_parquet_inputs(tmp_path):
    import datasets

    rows = [{"body": "The quick brown fox jumps over the lazy dog. " * 8} for _ in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    blocks = []
    for name in ("d.jsonl", "d.parquet"):
        cfg = load_config(None, [f"data.files=[{tmp_path / name}]", "data.text_field=body", "data.seq_len=32"])
        blocks.append(pack(cfg.data, ByteTokenizer()))
    assert torch.equal(blocks[0].train, blocks[1].train) and len(blocks[0].train) > 10
    with pytest.raises(DataError, match="text_field='text'.*body"):
        pack(load_config(None, [f"data.files=[{tmp_path / 'd.jsonl'}]"]).data, ByteTokenizer())


# ---------------------------------------------------------------------------- training
def _train(tmp_path, name="run", resume=None, **extra):
    cfg = load_config(None, tiny_overrides(tmp_path, str(tmp_path / name), **extra))
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer, trainer.train()
    finally:
        trainer.close()


@pytest.mark.parametrize("optim, extra", [
    ("adamw", {}),
    ("galore_adamw", {"optim.args": "{rank: 8, update_proj_gap: 5, scale: 0.25}"}),
    ("galore_adafactor", {"optim.args": "{rank: 8, update_proj_gap: 5, relative_step: false, scale_parameter: false}"}),
])
def test_training_lowers_loss_and_writes_outputs(tmp_path, optim, extra):
    _, summary = _train(tmp_path, **{"optim.name": optim, "train.steps": 20, "train.grad_accum": 2, **extra})
    curve = losses(str(tmp_path / "run"))
    assert len(curve) == 20
    assert sum(curve[-4:]) / 4 < curve[0] - 0.5, curve
    out = tmp_path / "run"
    for name in ("summary.json", "loss.png", "config.yaml"):
        assert (out / name).stat().st_size > 0, name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tensorboard"))
    assert summary["final_eval_loss"] < curve[0] and summary["peak_memory_mb"] > 0 and summary["tokens_per_s"] > 0
    assert summary["checkpoint"].endswith("step_00000020")


def test_bf16_autocast_and_activation_checkpointing_match_fp32(tmp_path):
    _, plain = _train(tmp_path, "plain", **{"train.steps": 4})
    _, ckpted = _train(tmp_path, "ckpt", **{"train.steps": 4, "model.activation_checkpointing": "true"})
    # Recomputing activations must not change the math.
    assert losses(str(tmp_path / "plain")) == losses(str(tmp_path / "ckpt"))
    _, bf16 = _train(tmp_path, "bf16", **{"train.steps": 4, "train.bf16": "true"})
    assert losses(str(tmp_path / "bf16")) != losses(str(tmp_path / "plain"))
    assert max(abs(a - b) for a, b in zip(losses(str(tmp_path / "bf16")), losses(str(tmp_path / "plain")))) < 0.05


def test_lisa_style_frozen_parameters_are_tolerated(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, str(tmp_path / "o"), **{"train.steps": 3}))
    trainer = Trainer(cfg)
    layer0 = trainer.model.model.layers[0]
    before = {n: p.detach().clone() for n, p in layer0.named_parameters()}
    for p in layer0.parameters():
        p.requires_grad_(False)  # what LISA does between steps: these get no grad at all
    trainer.train()
    trainer.close()
    assert all(torch.equal(before[n], p) for n, p in layer0.named_parameters())
    assert not torch.equal(trainer.model.model.layers[1].mlp.up_proj.weight, torch.zeros(1))


def _poison_step(trainer, at_step):
    original = trainer.loss_of

    def loss(module, ids):
        value = original(module, ids)
        return value * float("nan") if trainer.step + 1 == at_step and module.training else value

    trainer.loss_of = loss


def test_nan_loss_stops_naming_step_and_checkpoint(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, str(tmp_path / "o"), **{"checkpoint.every": 2}))
    trainer = Trainer(cfg)
    _poison_step(trainer, 5)
    with pytest.raises(TrainingStopped) as e:
        trainer.train()
    trainer.close()
    msg = str(e.value)
    assert "step 5" in msg and "--resume" in msg and "step_00000004" in msg
    assert ckpt.latest_checkpoint(str(tmp_path / "o" / "checkpoints")).endswith("step_00000004")


def test_nan_loss_skip_leaves_weights_untouched(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, str(tmp_path / "o"), **{"train.nan_policy": "skip",
                                                                             "train.steps": 3}))
    trainer = Trainer(cfg)
    _poison_step(trainer, 1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    trainer.close()
    curve = losses(str(tmp_path / "o"))
    assert curve[0] is None and all(math.isfinite(x) for x in curve[1:])  # null in metrics.jsonl: strict JSON
    assert trainer.nan_skips == 1
    # Step 1 was skipped, so the first applied update is step 2's: the weights moved exactly once
    # per finite step, and Adam's step count says 2.
    assert int(next(iter(trainer.optimizer.state.values()))["step"]) == 2
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_out_of_disk_on_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = load_config(None, tiny_overrides(tmp_path, str(tmp_path / "o"), **{"checkpoint.every": 2,
                                                                             "train.steps": 6}))
    trainer = Trainer(cfg)
    real_save = ckpt._save_file

    def full_disk(obj, path):
        if trainer.step >= 4 and path.endswith("optim.pt"):
            with open(path, "wb") as fh:
                fh.write(b"partial")  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real_save(obj, path)

    monkeypatch.setattr(ckpt, "_save_file", full_disk)
    summary = trainer.train()  # training goes on past the failed saves
    trainer.close()
    root = tmp_path / "o" / "checkpoints"
    assert summary["steps"] == 6 and summary["checkpoint"].endswith("step_00000002")
    assert sorted(os.listdir(root)) == ["step_00000002"]  # no partial tmp.* directory left
    for name in ("model.pt", "optim.pt", "trainer.pt", "rng_rank0.pt"):
        torch.load(root / "step_00000002" / name, weights_only=True)


def test_zero3_with_galore_fails_fast_naming_the_alternative(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, str(tmp_path / "o"), **{
        "optim.name": "galore_adamw", "optim.args": "{rank: 8}", "dist.engine": "deepspeed", "dist.zero_stage": 3}))
    with pytest.raises(ConfigError, match=r"dist.zero_stage=3 with optim.name='galore_adamw'.*dist.zero_stage=2"):
        Trainer(cfg)


def test_short_aliases_for_common_keys():
    cfg = load_config(None, ["optim=galore_adamw", "zero_stage=2", "steps=7", "lr=0.01"])
    assert (cfg.optim.name, cfg.dist.zero_stage, cfg.train.steps, cfg.optim.lr) == ("galore_adamw", 2, 7, 0.01)


def test_override_path_typo_in_section():
    with pytest.raises(ConfigError, match=r"'optimm'"):
        apply_override({}, "optimm.args.rank=3")


def test_weight_decay_reaches_the_optimizer(tmp_path):
    """optim.weight_decay is applied by `slimtrain train` (it used to be silently dropped)."""
    cfg = load_config(None, tiny_overrides(tmp_path, str(tmp_path / "wd"), **{"optim.weight_decay": 0.05}))
    trainer = Trainer(cfg)
    try:
        assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.05] * len(trainer.optimizer.param_groups)
    finally:
        trainer.close()
