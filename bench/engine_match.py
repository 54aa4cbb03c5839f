"""The distributed engines against one process, on ``slimtrain train``'s built-in default.

Runs the command lines a user types (llama-20m on ``pydoc_data.topics``, default settings apart
from ``train.steps``) and prints, per optimizer, the largest per-step loss difference between

* ``N ranks``: ``torchrun --nproc_per_node N -m slimtrain train dist.engine=<engine> optim=<name>
  train.batch_size=8/N`` (global batch 8, as one process), and
* ``1 x 8``: one process, ``train.batch_size=8`` (the default), and
* ``1 x 8/N x N accum``: one process with the same global batch as N micro-batches of 8/N
  (``train.grad_accum=N``): the same samples, the gradient summed in the same order as N ranks
  sum theirs. The difference to ``1 x 8`` is float rounding alone, and shows how much an
  optimizer amplifies it.

A row ``mezo (lr 1e-6)`` uses ``docs/configs/mezo.yaml``'s learning rate: with the trainer's
default ``optim.lr=2e-3`` MeZO's loss rises and its trajectory amplifies rounding like any
diverging run.

    OMP_NUM_THREADS=1 python bench/engine_match.py                       # fsdp, 2 ranks, 10 steps
    OMP_NUM_THREADS=1 python bench/engine_match.py --engine ddp --optims galore_adamw lisa
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPTIMS = ["galore_adamw", "adamw8bit", "galore_adamw8bit", "lisa", "mezo", "mezo_lr1e-6"]
RIGHT = ("galore_adamw", "galore_adamw8bit")  # one process needs FSDP2's right projector to compare


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out: str, args: list[str], ranks: int = 1) -> list[float]:
    launch = [sys.executable, "-m"]
    if ranks > 1:
        launch += ["torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(_port()), "-m"]
    cmd = launch + ["slimtrain", "train", f"output_dir={out}"] + args
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{run.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line)["loss"] for line in fh if '"loss"' in line]


def _gap(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="fsdp", choices=["fsdp", "ddp", "torch"])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--optims", nargs="+", default=OPTIMS, choices=OPTIMS)
    a = ap.parse_args()
    batch = 8
    if batch % a.ranks:
        raise SystemExit(f"--ranks {a.ranks}: the default batch of {batch} must split evenly over the ranks")
    common = [f"train.steps={a.steps}", "train.eval_every=0", "data.max_eval_blocks=8", "train.progress=false",
              "checkpoint.every=0"]
    print(f"engine {a.engine}, {a.ranks} ranks x batch {batch // a.ranks} vs one process, llama-20m default, "
          f"{a.steps} steps; max |loss difference| over the steps (nats)\n")
    print(f"| optimizer | {a.ranks} ranks vs 1 x {batch} | {a.ranks} ranks vs 1 x {batch // a.ranks} x {a.ranks} accum "
          f"| 1 x {batch} vs 1 x {batch // a.ranks} x {a.ranks} accum (rounding alone) | first -> last loss |")
    print("|---|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.optims:
            optim = ["--config", "docs/configs/mezo.yaml"] if name == "mezo_lr1e-6" else [f"optim={name}"]
            if name in RIGHT and a.engine == "fsdp":
                optim += ["optim.args.proj_type=right"]  # what FSDP2's row shards use for every matrix
            args = common + optim
            one = _train(f"{tmp}/{name}_one", args + [f"train.batch_size={batch}"])
            acc = _train(f"{tmp}/{name}_acc", args + [f"train.batch_size={batch // a.ranks}", f"train.grad_accum={a.ranks}"])
            many = _train(f"{tmp}/{name}_many", args + [f"dist.engine={a.engine}", f"train.batch_size={batch // a.ranks}"],
                          ranks=a.ranks)
            label = "mezo (lr 1e-6)" if name == "mezo_lr1e-6" else name
            print(f"| {label} | {_gap(many, one):.1e} | {_gap(many, acc):.1e} | {_gap(one, acc):.1e} "
                  f"| {one[0]:.3f} -> {one[-1]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
