"""Issue 12, point 6: config values and data files. Scientific notation is a number everywhere
(optim.args included, CLI and YAML), YAML type errors are reported, and every bad value or
file gives one line naming the key or file (and row), exit 2, no traceback."""

from __future__ import annotations

import pytest

from slimtrain.run.config import ConfigError, load_config
from slimtrain.run.data import ByteTokenizer, DataError, pack
from trainer_setup import run_cli, tiny_overrides


def test_scientific_notation_is_a_number_in_optim_args_cli_and_yaml(tmp_path):
    cfg = load_config(None, ["optim.args.eps=1e-8", "optim.args.betas=[0.9, 1e-3]", "optim.lr=2E-4"])
    assert cfg.optim.args == {"eps": 1e-8, "betas": [0.9, 1e-3]} and cfg.optim.lr == 2e-4
    (tmp_path / "c.yaml").write_text("optim:\n  args: {eps: 1e-8}\n")
    assert load_config(str(tmp_path / "c.yaml")).optim.args == {"eps": 1e-8}
    from slimtrain.federated.config import load_config as fed_config

    assert fed_config(None, ["optim.args.eps=1e-8"]).optim.args == {"eps": 1e-8}


def test_cli_trains_with_eps_in_scientific_notation(tmp_path):
    result = run_cli(tiny_overrides(tmp_path, str(tmp_path / "o"), **{"train.steps": 1, "optim.args.eps": "1e-8"}),
                     cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]


def test_yaml_type_error_is_reported_not_dropped(tmp_path):
    (tmp_path / "c.yaml").write_text("train: 5\n")
    with pytest.raises(ConfigError, match=r"train=5: expected a mapping.*train\.steps="):
        load_config(str(tmp_path / "c.yaml"), ["train.steps=3"])
    with pytest.raises(ConfigError, match=r"train=5: expected a mapping"):
        load_config(str(tmp_path / "c.yaml"))


def test_negative_seed_is_a_config_error():
    with pytest.raises(ConfigError, match=r"train\.seed=-1"):
        load_config(None, ["train.seed=-1"])


@pytest.mark.parametrize("name, content, words", [
    ("num.jsonl", b'{"text": 5}\n{"text": 6}\n', ["num.jsonl", "row 0", "not text"]),
    ("mixed.jsonl", b'{"text": "some words here"}\n{"text": 7}\n', ["mixed.jsonl", "row 1", "not text"]),
    ("bad.jsonl", b'{"text": "ok"}\nnot json\n', ["bad.jsonl", "line 2", "not valid JSON"]),
    ("list.jsonl", b'[{"text": "a"}, 2\n', ["list.jsonl", "not valid JSON"]),
    ("row.jsonl", b'"just a string"\n', ["row.jsonl", "line 1", "not a JSON object"]),
    ("empty.txt", b"", ["empty.txt", "is empty"]),
    ("bin.txt", bytes(range(128, 256)) * 4, ["bin.txt", "not UTF-8"]),
])
def test_bad_data_files_name_the_file_and_row(tmp_path, name, content, words):
    (tmp_path / name).write_bytes(content)
    cfg = load_config(None, [f"data.files=[{tmp_path / name}]", "data.seq_len=8"])
    with pytest.raises(DataError) as e:
        pack(cfg.data, ByteTokenizer())
    for w in words:
        assert w in str(e.value), str(e.value)


def test_cli_bad_values_are_one_line_exit_2(tmp_path):
    (tmp_path / "num.jsonl").write_bytes(b'{"text": 5}\n')
    for extra, word in (({"train.seed": -1}, "train.seed=-1"),
                        ({"data.files": f"[{tmp_path / 'num.jsonl'}]"}, "num.jsonl")):
        result = run_cli(tiny_overrides(tmp_path, str(tmp_path / "o"), **extra), cwd=str(tmp_path))
        assert result.returncode == 2 and word in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_string_key_takes_text_that_yaml_would_read_as_a_mapping():
    # A prompt template with ": " is a YAML mapping; the key is declared a string, so the text
    # is taken as typed. Quoted YAML and plain text still give the same string.
    cfg = load_config(None, ["data.template=Review: {sentence}\nSentiment:"])
    assert cfg.data.template == "Review: {sentence}\nSentiment:"
    assert load_config(None, ["data.template='{sentence} It was'"]).data.template == "{sentence} It was"
    assert load_config(None, ["data.template={sentence} It was"]).data.template == "{sentence} It was"
    # a non-string key still reads YAML, and a bad value is still named
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps=a: b"])
