"""Every optimizer in the registry has a config file in docs/configs, and each file trains: loaded as
written, shrunk to the tiny model for a few steps (key=value overrides), losses stay finite."""

from __future__ import annotations

import math
import pathlib

import pytest

from slimtrain.optim.registry import available_optimizers
from slimtrain.trainer import Trainer, load_config
from trainer_setup import REPO, losses, tiny_overrides

# `slimtrain train` configs, one per optimizer (federated*.yaml are `slimtrain federated` configs;
# finetune_*.yaml, the fine-tuning defaults, are trained by tests/test_finetune.py)
CONFIGS = sorted(p for p in (REPO / "docs" / "configs").glob("*.yaml")
                 if not p.stem.startswith(("federated", "finetune_")))


def test_every_registered_optimizer_has_a_config():
    names = {p.stem for p in CONFIGS}
    assert set(available_optimizers()) <= names, sorted(set(available_optimizers()) - names)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_file_trains(tmp_path, path: pathlib.Path):
    cfg = load_config(str(path))
    assert cfg.optim.name == path.stem or path.stem not in available_optimizers()  # recipes: llama7b_small_box
    extra = {"train.steps": 3, "optim.lr": cfg.optim.lr}
    if "rank" in cfg.optim.args:  # the tiny model is 32 wide
        extra["optim.args.rank"] = 8
    cfg = load_config(str(path), tiny_overrides(tmp_path, str(tmp_path / "o"), **extra))
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    curve = losses(str(tmp_path / "o"))
    assert len(curve) == 3 and all(math.isfinite(x) for x in curve)
