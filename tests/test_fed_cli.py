"""`slimtrain federated` on the command line: a real subprocess run that prints epsilon every
round and resumes with the accountant's history, exit codes and error messages, --help-config,
and the documented config file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from slimtrain.federated.config import FedRunConfig, load_config, to_dict
from slimtrain.launch.cli import main
from trainer_setup import REPO, cli_env, text_file, tiny_model_dir


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed_cli_assets")
    return {"model": tiny_model_dir(root), "text": text_file(root, nbytes=30_000)}


def overrides(assets, out, **extra) -> list[str]:
    args = {"output_dir": str(out), "model.name": assets["model"], "data.files": f"[{assets['text']}]",
            "data.seq_len": 32, "data.max_eval_blocks": 8, "federated.clients": 10, "federated.participation": 0.4,
            "federated.rounds": 2, "federated.batch_size": 4, "federated.partition": "iid",
            "federated.dp.clip_norm": 0.5, "federated.dp.delta": 1e-3, "federated.progress": False}
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def opacus_epsilon(z, q, rounds, delta):
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(z, q, rounds)]
    return float(acc.get_epsilon(delta=delta))


def run_cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "slimtrain", "federated", *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=300)


def test_cli_runs_dp_simulation_prints_epsilon_each_round_and_resumes(assets, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(overrides(assets, out), cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (1, 2):
        line = next(l for l in proc.stdout.splitlines() if l.startswith(f"round {r}/2:"))
        eps = float(line.split("epsilon ")[1].split()[0])
        assert eps == pytest.approx(opacus_epsilon(1.0, 0.4, r, 1e-3), abs=1e-3), line
        assert "clients replied" in line and "up " in line and "eval loss" in line
    summary = json.loads((out / "summary.json").read_text())
    for key in ("rounds", "epsilon", "clients_per_minute", "bytes_up", "bytes_down", "final_eval_loss"):
        assert key in summary, key
    assert summary["rounds"] == 2 and (out / "loss.png").exists()

    # --resume with more rounds: the accountant continues (3 rounds of history, not 1)
    proc = run_cli(["--resume", *overrides(assets, out, **{"federated.rounds": 3})], cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "round 3/3:" in proc.stdout and "round 1/" not in proc.stdout
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[-1]["epsilon"] == pytest.approx(opacus_epsilon(1.0, 0.4, 3, 1e-3), rel=1e-9)


@pytest.mark.parametrize("args, words", [
    (["federated.clientz=3"], ["config error", "federated.clientz", "clients_per_round"]),
    (["federated.strategy=fedau"], ["config error", "fedau", "federated.dp.enabled=false"]),
    (["federated.clients_per_round=4"], ["config error", "exactly one", "federated.participation=0"]),
    (["federated.dp.noise_multiplier=0"], ["config error", "target_epsilon"]),
    (["federated.rounds=ten"], ["config error", "federated.rounds", "integer"]),
])
def test_cli_config_errors_exit_2_with_the_key(args, words, capsys):
    assert main(["federated", *args]) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, (w, err)


def test_cli_bad_inputs_after_config_exit_2(assets, tmp_path, capsys):
    assert main(["federated", *overrides(assets, tmp_path / "x", **{"data.files": "[/nonexistent/*.txt]"})]) == 2
    assert "DataError" in capsys.readouterr().err
    assert main(["federated", "--resume", *overrides(assets, tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "without --resume" in err
    assert main(["federated", *overrides(assets, tmp_path / "y", **{"optim.name": "adamw",
                                                                     "optim.args.no_such_arg": 1})]) == 2
    assert "optim.args" in capsys.readouterr().err


def test_cli_help_config_lists_federated_and_trainer_keys(capsys):
    assert main(["federated", "--help-config"]) == 0
    out = capsys.readouterr().out
    for key in ("federated.dp.clip_norm", "federated.participation", "federated.compression", "model.name",
                "optim.args", "data.seq_len"):
        assert key in out, key


def test_documented_config_is_valid_and_says_the_defaults():
    cfg = load_config(str(REPO / "docs" / "configs" / "federated.yaml"))
    defaults = to_dict(FedRunConfig())
    got = to_dict(cfg)
    got["output_dir"] = defaults["output_dir"]
    assert got == defaults  # the file spells out `slimtrain federated` with no arguments


def test_federated_takes_the_same_short_keys_as_train():
    """`slimtrain federated clients=20 rounds=3` as `slimtrain train steps=20`; full paths still win."""
    cfg = load_config(None, ["clients=20", "rounds=3", "strategy=fedprox", "local_steps=4", "epsilon=8",
                             "optim=galore_adamw", "lr=1e-3", "output=/tmp/x"])
    fc = cfg.federated
    assert (fc.clients, fc.rounds, fc.strategy, fc.local_steps, fc.dp.target_epsilon) == (20, 3, "fedprox", 4, 8.0)
    assert (cfg.optim.name, cfg.optim.lr, cfg.output_dir) == ("galore_adamw", 1e-3, "/tmp/x")
    with pytest.raises(Exception, match="steps"):  # a trainer-only alias names the section it needs
        load_config(None, ["steps=20"])


def test_optimizer_arguments_are_built_once_for_train_and_federated():
    """optim.weight_decay reaches the optimizer in both kinds of run (it used to be dropped by train)."""
    from slimtrain.run.config import optimizer_kwargs
    from slimtrain.run.config import load_config as load_train_config

    for cfg in (load_config(None, ["optim.weight_decay=0.05", "optim.args.betas=[0.8,0.9]"]),
                load_train_config(None, ["optim.weight_decay=0.05", "optim.args.betas=[0.8,0.9]"])):
        assert optimizer_kwargs(cfg.optim) == {"lr": cfg.optim.lr, "weight_decay": 0.05, "betas": [0.8, 0.9]}
