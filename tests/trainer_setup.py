"""What the trainer / launcher / checkpoint tests share: a tiny Llama directory, a small real
English text file, and the command-line overrides that train them in seconds."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from helpers import SHARED_DATA

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_model_dir(root: pathlib.Path) -> str:
    """A local Hugging Face config directory (no weights): a 2-layer, 32-wide Llama over bytes."""
    from transformers import LlamaConfig

    path = root / "tiny-llama"
    LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                eos_token_id=256, bos_token_id=None, pad_token_id=None).save_pretrained(path)
    return str(path)


def text_file(root: pathlib.Path, nbytes: int = 40_000) -> str:
    """The first ``nbytes`` of tiny-shakespeare (real English) as a local text file."""
    path = root / "shakespeare.txt"
    path.write_bytes((SHARED_DATA / "tinyshakespeare.txt").read_bytes()[:nbytes])
    return str(path)


def tiny_overrides(root: pathlib.Path, out: str, **extra) -> list[str]:
    """key=value overrides for a seconds-long run of the tiny model on local text."""
    args = {
        "output_dir": out,
        "model.name": tiny_model_dir(root) if not (root / "tiny-llama").exists() else str(root / "tiny-llama"),
        "data.files": f"[{text_file(root) if not (root / 'shakespeare.txt').exists() else root / 'shakespeare.txt'}]",
        "data.seq_len": 32,
        "data.max_eval_blocks": 16,
        "train.batch_size": 4,
        "train.steps": 8,
        "train.warmup_steps": 2,
        "train.eval_every": 0,
        "train.progress": "false",
        "optim.lr": 3e-3,
        "checkpoint.every": 0,
    }
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def prepared_root(tmp_path_factory, name: str) -> str:
    """A module-scoped directory holding the tiny model and text, written once before any rank
    (a spawned process) reads them."""
    path = tmp_path_factory.mktemp(name)
    tiny_overrides(path, str(path / "unused"))
    return str(path)


def cli_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def run_cli(args: list[str], cwd: str, timeout: int = 300, launcher: list[str] | None = None):
    cmd = (launcher or [sys.executable, "-m"]) + ["slimtrain", "train", *args]
    return subprocess.run(cmd, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def losses(out_dir: str) -> list[float]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return [r["loss"] for r in map(json.loads, fh) if "loss" in r]
