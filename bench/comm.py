"""Gradient-synchronisation bytes and time per step: DDP-style AdamW vs GaLore low-rank sync.

Real gloo processes on this machine, the GaLore paper's Llama-60M shapes (or --shape), random
gradients of the right shapes (the bytes do not depend on their values). For each world size:

* ``DDP AdamW``: every gradient all-reduced in 25 MiB flat buckets (what torch DDP sends);
* ``GaLore low-rank sync`` (``slimtrain.parallel.LowRankGradSync``): GaLore matrices send
  their projected (r, n) gradient, the rest all-reduced in buckets; measured on a steady step
  and on a projector-refresh step (full gradient + projector broadcast, once per
  ``update_proj_gap`` steps).

Bytes are payload handed to collectives per rank per step (``slimtrain.parallel.Comm``).

    python bench/comm.py --world-sizes 2 4
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from llama_shapes import SHAPES, LlamaParams  # noqa: E402

from slimtrain.optim import GaLoreAdamW, galore_param_groups  # noqa: E402
from slimtrain.parallel import Comm, LowRankGradSync, all_reduce_bucketed  # noqa: E402


def _worker(rank, world, port, shape_name, steps, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    shape = SHAPES[shape_name]
    model = LlamaParams(shape)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(rank)

    def fill():
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3

    rows = {}
    comm = Comm()
    times = []
    for _ in range(steps):
        fill()
        comm.reset()
        dist.barrier()
        t0 = time.perf_counter()
        all_reduce_bucketed(comm, [p.grad for p in params])
        times.append(time.perf_counter() - t0)
    rows["DDP AdamW (bucketed all-reduce)"] = (comm.total_bytes(), min(times))

    opt = GaLoreAdamW(galore_param_groups(model, rank=shape.galore_rank, update_proj_gap=200), lr=1e-3)
    sync = LowRankGradSync(opt, comm)
    for i in range(steps + 1):
        fill()
        comm.reset()
        dist.barrier()
        t0 = time.perf_counter()
        sync.sync()
        elapsed = time.perf_counter() - t0
        if i == 0:
            rows["GaLore low-rank sync, refresh step"] = (comm.total_bytes(), elapsed)
            steady = []
        else:
            steady.append(elapsed)
        steady_bytes = comm.total_bytes()
        opt.step()
    rows["GaLore low-rank sync, steady step"] = (steady_bytes, min(steady))
    galore_full = sum(p.numel() * 4 for p, _ in opt.galore_params())
    if rank == 0:
        torch.save({"rows": rows, "galore_full": galore_full, "total": sum(p.numel() * 4 for p in params)}, out)
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="60m", choices=sorted(SHAPES))
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    import socket
    import tempfile

    shape = SHAPES[args.shape]
    print(f"Llama-{args.shape} shapes, GaLore rank {shape.galore_rank}, gloo on CPU, payload bytes per rank per step")
    for world in args.world_sizes:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "r.pt")
            mp.start_processes(_worker, args=(world, port, args.shape, args.steps, out), nprocs=world,
                               start_method="spawn")
            res = torch.load(out)
        rows, base = res["rows"], res["rows"]["DDP AdamW (bucketed all-reduce)"]
        print(f"\n### {world} ranks (all gradients {res['total'] / 2**20:.0f} MiB, of which GaLore matrices "
              f"{res['galore_full'] / 2**20:.0f} MiB)\n")
        other = res["total"] - res["galore_full"]  # non-GaLore gradients travel whole in every row
        print("| sync | MiB sent | vs DDP | GaLore-matrix MiB | GaLore bytes saved (x) | time ms | vs DDP |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, (b, t) in rows.items():
            g = b - other
            print(f"| {name} | {b / 2**20:.1f} | {b / base[0]:.3f} | {g / 2**20:.1f} | {res['galore_full'] / g:.2f} | "
                  f"{t * 1e3:.0f} | {t / base[1]:.2f} |")


if __name__ == "__main__":
    main()
