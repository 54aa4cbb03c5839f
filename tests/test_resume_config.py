"""Issue 12, point 4: --resume compares the new config with the checkpoint's. Keys that define
the run refuse with the differences listed; keys that may change are applied for real; the
learning rate only with --allow-lr-change; federated DP parameters never change (epsilon never
goes down)."""

from __future__ import annotations

import pytest
import yaml

from slimtrain.run.config import compare_resume_config
from slimtrain.trainer import ConfigError, Trainer, load_config
from trainer_setup import run_cli, tiny_overrides


@pytest.fixture
def done(tmp_path):
    """A finished 4-step adamw run checkpointed at steps 2 and 4."""
    over = tiny_overrides(tmp_path, str(tmp_path / "o"), **{"train.steps": 4, "checkpoint.every": 2,
                                                            "train.warmup_steps": 2})
    t = Trainer(load_config(None, over))
    t.train()
    t.close()
    return tmp_path


def _resume(tmp_path, **extra):
    over = tiny_overrides(tmp_path, str(tmp_path / "o"), **{"train.steps": 4, "checkpoint.every": 2,
                                                            "train.warmup_steps": 2, **extra})
    return Trainer(load_config(None, over), resume=True)


@pytest.mark.parametrize("change, words", [
    ({"optim.name": "adamw8bit"}, ["optim.name: 'adamw' -> 'adamw8bit'"]),
    ({"train.seed": 1}, ["train.seed: 0 -> 1"]),
    ({"data.seq_len": 16}, ["data.seq_len: 32 -> 16"]),
    ({"optim.args": "{eps: 1e-6}"}, ["optim.args.eps"]),
    ({"optim.lr": 1e6}, ["optim.lr: 0.003 -> 1000000.0", "--allow-lr-change"]),
])
def test_resume_refuses_keys_that_define_the_run(done, change, words):
    with pytest.raises(ConfigError) as e:
        _resume(done, **change)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_resume_applies_allowed_changes_for_real(done):
    t = _resume(done, **{"train.steps": 6, "checkpoint.every": 3})
    summary = t.train()
    t.close()
    assert summary["steps"] == 6 and summary["checkpoint"].endswith("step_00000006")
    recorded = yaml.safe_load((done / "o" / "config.yaml").read_text())
    assert recorded["train"]["steps"] == 6


def test_resume_lr_change_with_the_flag_changes_the_schedule(done):
    t = _resume(done, **{"optim.lr": 1e-3, "train.allow_lr_change": "true", "train.steps": 5})
    # step 4 of a 2-step warmup + cosine to 0.1 over 5 steps: factor 0.1 + 0.9 * 0.5 * (1 + cos(pi * 2/3))
    import math

    factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 3))
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * factor, rel=1e-12)
    t.train()
    t.close()
    recorded = yaml.safe_load((done / "o" / "config.yaml").read_text())
    assert recorded["optim"]["lr"] == 1e-3


def test_cli_resume_with_changed_optimizer_is_one_clear_error(done):
    result = run_cli(tiny_overrides(done, str(done / "o"), **{"train.steps": 4, "train.warmup_steps": 2,
                                                              "checkpoint.every": 2, "optim.name": "adamw8bit"})
                     + ["--resume"], cwd=str(done))
    assert result.returncode == 2 and "optim.name: 'adamw' -> 'adamw8bit'" in result.stderr
    assert "Traceback" not in result.stderr


def test_compare_resume_config_unit():
    saved = {"optim": {"lr": 1.0, "args": {"rank": 8}}, "train": {"steps": 4}}
    refused, changed = compare_resume_config(saved, {"optim": {"lr": 2.0, "args": {"rank": 8}}, "train": {"steps": 8}},
                                             allow_schedule_change=True)
    assert refused == [] and changed == ["optim.lr: 1.0 -> 2.0", "train.steps: 4 -> 8"]
    refused, _ = compare_resume_config(saved, {"optim": {"lr": 1.0, "args": {"rank": 4}}, "train": {"steps": 4}})
    assert refused == ["optim.args.rank: 8 -> 4"]


def test_federated_resume_refuses_dp_and_strategy_changes(tmp_path):
    from slimtrain.federated.config import load_config as fed_config
    from slimtrain.federated.server import FederatedSimulation
    from test_fed_cli import overrides
    from trainer_setup import text_file, tiny_model_dir

    assets = {"model": tiny_model_dir(tmp_path), "text": text_file(tmp_path, nbytes=30_000)}
    out = tmp_path / "F"
    first = FederatedSimulation(fed_config(None, overrides(assets, out, **{"federated.rounds": 1})))
    first.run()
    eps = first.epsilon
    for change, word in ((("federated.dp.delta", 1e-2), "federated.dp.delta: 0.001 -> 0.01"),
                         (("federated.strategy", "fedadam"), "federated.strategy"),
                         (("optim.name", "adamw8bit"), "optim.name")):
        with pytest.raises(ConfigError, match=word.replace(".", r"\.")):
            FederatedSimulation(fed_config(None, overrides(assets, out, **{"federated.rounds": 2,
                                                                          change[0]: change[1]})), resume=True)
    more = FederatedSimulation(fed_config(None, overrides(assets, out, **{"federated.rounds": 2})), resume=True)
    summary = more.run()
    assert summary["rounds"] == 2 and summary["epsilon"] > eps  # epsilon never goes down
