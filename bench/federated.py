"""Federated simulation benchmark: FedAvg vs FedAU under heterogeneous availability, DP-FedAvg at
several epsilons, and upload bytes with and without compression; plus a 1,000-client scale run.

Data: the built-in English corpus (Python's pydoc topics, 79 documents), packed into 64-token
byte blocks and split over 200 clients by Dirichlet(0.5) over *source documents* (each client
reads mostly a few topics: non-IID). Model: a Llama of hidden 64, 2 layers (~0.13M parameters)
built from a config, every client running AdamW (lr 3e-3, 3 local steps of 8 blocks). Quality is
the global model's loss on the held-out blocks (interleaved over the whole corpus, so it weights
every client's kind of text by its share of the corpus).

Runs (each ``--rounds`` rounds, seed 0):

* ``avail/fedavg`` and ``avail/fedau``: every client is asked each round (participation 1), but
  client i is available with its own probability p_i ~ U[0.02, 0.5] (Bernoulli); FedAvg averages
  the participants, FedAU reweights by the estimated participation interval (Wang & Ji 2024).
* ``dp/none``, ``dp/eps=E``: Poisson sampling q = 0.2 (40 expected clients), always available,
  DP-FedAvg with C = 2 (about the norm of an unclipped client delta here: a much smaller C,
  e.g. 0.05, clips every delta ~60x and nothing is learnt at any epsilon) and the noise multiplier that spends epsilon E (delta 1e-5) over the
  run (``federated.dp.target_epsilon=E federated.dp.noise_multiplier=0``).
* ``comp/<name>``: as ``dp/none`` without DP, uploads compressed: none, lowrank (rank 8),
  topk (10%, error feedback), int8 (block-wise), ternary (ComPEFT: top 10% signs x one scale
  per tensor, error feedback).

    python bench/federated.py                  # ~10 min on 2 busy cores; table + federated.png
    python bench/federated.py --rounds 5       # quicker look
    python bench/federated.py --scale          # 1,000 clients, Llama-20M shapes (see docs/federated.md)

Outputs go to ``--out`` (default runs/bench_federated): ``results.json``, ``federated.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# `python bench/federated.py` puts bench/ first on sys.path, where bench/kernels.py would shadow
# the `kernels` package transformers imports; the repository root is what this script needs.
sys.path = [p for p in sys.path if pathlib.Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

BASE = {
    "data.seq_len": 64,
    "data.max_eval_blocks": 64,
    "optim.name": "adamw",
    "optim.lr": 3e-3,
    "federated.clients": 200,
    "federated.local_steps": 3,
    "federated.batch_size": 8,
    "federated.partition": "dirichlet",
    "federated.alpha": 0.5,
    "federated.progress": False,
    "federated.checkpoint_every": 0,
    "federated.dp.enabled": False,
}

AVAIL = {"federated.participation": 1.0, "federated.availability": "bernoulli",
         "federated.availability_args": "{low: 0.02, high: 0.5}"}
SAMPLED = {"federated.participation": 0.2}


def runs(epsilons: list[float], dp_clip: float = 2.0) -> dict[str, dict]:
    out = {
        "avail/fedavg": {**AVAIL, "federated.strategy": "fedavg"},
        "avail/fedau": {**AVAIL, "federated.strategy": "fedau"},
        "dp/none": {**SAMPLED},
    }
    for eps in epsilons:
        out[f"dp/eps={eps:g}"] = {**SAMPLED, "federated.dp.enabled": True, "federated.dp.clip_norm": dp_clip,
                                  "federated.dp.noise_multiplier": 0, "federated.dp.target_epsilon": eps,
                                  "federated.dp.delta": 1e-5}
    out["comp/lowrank"] = {**SAMPLED, "federated.compression": "lowrank", "federated.compression_rank": 8}
    out["comp/topk"] = {**SAMPLED, "federated.compression": "topk", "federated.compression_fraction": 0.1}
    out["comp/int8"] = {**SAMPLED, "federated.compression": "int8"}
    out["comp/ternary"] = {**SAMPLED, "federated.compression": "ternary", "federated.compression_fraction": 0.1}
    return out


def tiny_model(root: pathlib.Path) -> str:
    from transformers import LlamaConfig

    path = root / "bench-llama"
    LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False, eos_token_id=256,
                bos_token_id=None, pad_token_id=None).save_pretrained(path)
    return str(path)


def run_one(name: str, overrides: dict, out: pathlib.Path, model: str, rounds: int) -> dict:
    from slimtrain.federated.config import load_config
    from slimtrain.federated.server import FederatedSimulation
    from slimtrain.run.metrics import read_metrics

    run_dir = out / name.replace("/", "_").replace("=", "")
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run (slimtrain refuses old checkpoints)
    args = {**BASE, **overrides, "federated.rounds": rounds, "model.name": model, "output_dir": str(run_dir)}
    cfg = load_config(None, [f"{k}={v}" for k, v in args.items()])
    t0 = time.perf_counter()
    summary = FederatedSimulation(cfg).run()
    rows = read_metrics(str(run_dir / "metrics.jsonl"))
    return {
        "name": name,
        "overrides": overrides,
        "wall_s": time.perf_counter() - t0,
        "rounds": summary["rounds"],
        "final_eval_loss": summary["final_eval_loss"],
        "epsilon": summary["epsilon"],
        "noise_multiplier": summary["noise_multiplier"],
        "clients_per_minute": summary["clients_per_minute"],
        "replied_per_round": sum(r["replied"] for r in rows) / max(1, len(rows)),
        "bytes_up_per_client": sum(r["bytes_up"] for r in rows) / max(1, sum(r["replied"] for r in rows)),
        "bytes_up_per_round": sum(r["bytes_up"] for r in rows) / max(1, len(rows)),
        "bytes_down_per_round": sum(r["bytes_down"] for r in rows) / max(1, len(rows)),
        "curve": [(r["round"], r["eval_loss"]) for r in rows if "eval_loss" in r],
    }


def table(results: list[dict]) -> str:
    lines = ["| run | rounds | final eval loss | epsilon (delta 1e-5) | z | clients/round | upload KiB/client | "
             "upload KiB/round | broadcast KiB/round | clients/min |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        z = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
        lines.append(f"| {r['name']} | {r['rounds']} | {r['final_eval_loss']:.4f} | {eps} | {z} | "
                     f"{r['replied_per_round']:.1f} | {r['bytes_up_per_client'] / 1024:.1f} | "
                     f"{r['bytes_up_per_round'] / 1024:.0f} | {r['bytes_down_per_round'] / 1024:.0f} | "
                     f"{r['clients_per_minute']:.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    groups = (("avail/", "heterogeneous availability"), ("dp/", "DP-FedAvg (q=0.2, C=2)"),
              ("comp/", "upload compression (no DP)"))
    for ax, (prefix, title) in zip(axes, groups):
        for r in results:
            if r["name"].startswith(prefix) or (prefix == "comp/" and r["name"] == "dp/none"):
                label = "comp/none" if (prefix == "comp/" and r["name"] == "dp/none") else r["name"]
                ax.plot(*zip(*r["curve"]), "o-", ms=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylabel("global eval loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- scale
def llama20m_32k(root: pathlib.Path) -> str:
    """The GaLore paper's Llama-20M with its 32k vocabulary (19.6M parameters); the byte
    tokenizer uses only its first 257 rows, the shapes (and so the cost) are the paper's."""
    from transformers import LlamaConfig

    path = root / "llama-20m-32k"
    LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=False, eos_token_id=256,
                bos_token_id=None, pad_token_id=None).save_pretrained(path)
    return str(path)


def scale(out: pathlib.Path, rounds: int) -> list[dict]:
    """1,000 clients, Poisson q=0.01 (~10 a round), DP on, each a fresh subprocess so its peak RSS
    is the run's own."""
    results = []
    for label, model in (("llama-20m (byte vocab, 3.3M)", "llama-20m"),
                         ("llama-20m shapes, 32k vocab (19.6M)", llama20m_32k(out))):
        run_dir = out / ("scale_" + ("preset" if model == "llama-20m" else "32k"))
        shutil.rmtree(run_dir, ignore_errors=True)
        args = [f"output_dir={run_dir}", f"model.name={model}", "federated.clients=1000", "federated.participation=0.01",
                f"federated.rounds={rounds}", "federated.partition=iid", "federated.local_steps=2",
                "federated.batch_size=4", "federated.progress=false"]
        cmd = [sys.executable, "-m", "slimtrain", "federated", *args]
        print("$", "slimtrain federated", " ".join(args), flush=True)
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        s = json.loads((run_dir / "summary.json").read_text())
        results.append({"model": label, "parameters": s["parameters"], "rounds": s["rounds"],
                        "client_rounds": s["client_rounds"], "clients_per_minute": s["clients_per_minute"],
                        "peak_rss_mb": s["peak_rss_mb"], "client_store_mb": s["client_store_mb"],
                        "epsilon": s["epsilon"], "wall_s": s["wall_time_s"]})
        print(json.dumps(results[-1]), flush=True)
    print("| model | parameters | clients | rounds | client-rounds | clients/min | peak RSS MB | client store MB | epsilon |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | 1000 | {r['rounds']} | {r['client_rounds']} | "
              f"{r['clients_per_minute']:.1f} | {r['peak_rss_mb']:.0f} | {r['client_store_mb']:.2f} | {r['epsilon']:.2f} |")
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[2.0, 8.0, 32.0])
    ap.add_argument("--only", nargs="*", help="run names to run (default: all)")
    ap.add_argument("--dp-clip", type=float, default=2.0, help="DP clip norm C of the dp/eps=* runs")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_federated"))
    ap.add_argument("--scale", action="store_true", help="the 1,000-client Llama-20M run instead")
    ap.add_argument("--scale-rounds", type=int, default=5)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.scale:
        res = scale(out, args.scale_rounds)
        (out / "scale.json").write_text(json.dumps(res, indent=2))
        return
    import torch
    from tqdm import tqdm

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    model = tiny_model(out)
    todo = {k: v for k, v in runs(args.epsilons, args.dp_clip).items() if not args.only or k in args.only}
    results = []
    for name, overrides in tqdm(todo.items(), desc="bench runs", unit="run"):
        results.append(run_one(name, overrides, out, model, args.rounds))
        tqdm.write(f"{name}: final eval loss {results[-1]['final_eval_loss']:.4f} "
                   f"({results[-1]['wall_s']:.0f} s)")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "federated.png")
    print(table(results))
    print(f"\nplot: {out / 'federated.png'}; raw: {out / 'results.json'}")


if __name__ == "__main__":
    main()
