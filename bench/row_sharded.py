"""GaLore's projector refresh when matrices are sharded by rows (FSDP2 ``Shard(0)``).

Three ways for N ranks that each hold rows ``G[k]`` (m/N, n) of a gradient to agree on its
top-r right singular subspace ``P`` (r, n):

* ``range finder``: ``slimtrain.optim.row_shards.distributed_right_projector``: all-reduce
  (power_iters + 1) sketches ``G[k]^T (G[k] Z)`` of (n, r + p); QR / Rayleigh-Ritz locally;
* ``all-gather G``: what a GaLore that needs whole gradients would do under FSDP: gather the
  (m, n) gradient, then run the same randomized range finder on it locally;
* ``all-reduce G^T G``: sum the (n, n) Gram matrices, ``eigh`` locally (exact subspace).

Bytes are the payload one rank hands to the collective per refresh of one matrix (Comm's
convention; for all-gather the gathered (m, n) buffer, as ``bench/comm.py`` counts it).
Times are real gloo processes on this machine (spawned, one torch thread each; barrier before
each try, best of ``--repeat``, slowest rank), the refresh alone. Energy: the fraction of
``||G||_F^2`` that ``G P^T`` loses, for the range finder's P from the 2-rank run against the
exact SVD's (the optimum), on real gradients: the middle layer of a 2-layer Llama with the
GaLore paper's 60M / 130M widths (byte vocabulary) after ``--warm-steps`` AdamW steps on
tiny-shakespeare (``bench/projector.py``'s ``real_gradients``). Projectors are right-sided for
every matrix, including down_proj (m < n), as row sharding requires.

    OMP_NUM_THREADS=1 python bench/row_sharded.py [--world-sizes 2 4] [--warm-steps 10]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # bench/ (llama_shapes, projector) and the checkout's slimtrain
import llama_shapes  # noqa: E402
from projector import real_gradients  # noqa: E402

from slimtrain.optim import projector as proj  # noqa: E402
from slimtrain.parallel import Comm  # noqa: E402
from slimtrain.optim.row_shards import distributed_right_projector, range_finder_bytes as refresh_bytes  # noqa: E402

OVERSAMPLE, POWER_ITERS = 8, 2
DIVISORS = (1, 4, 16)  # energy at rank r / d
METHODS = ("range finder", "all-gather G", "all-reduce G^T G")


def _rows(g, rank, world):
    m = g.shape[0]
    return g[rank * m // world : (rank + 1) * m // world].contiguous()


def _refresh(method, rows, r, comm, world):
    if method == "range finder":
        return distributed_right_projector(rows, r, comm.all_reduce, oversample=OVERSAMPLE, power_iters=POWER_ITERS, seed=0)
    if method == "all-gather G":
        full = torch.empty(rows.shape[0] * world, rows.shape[1])
        comm.bytes["all_gather"] += full.numel() * full.element_size()
        dist.all_gather_single(full, rows)
        return proj.randomized_range(full, r, oversample=OVERSAMPLE, power_iters=POWER_ITERS,
                                     generator=torch.Generator().manual_seed(0))[1]
    gram = comm.all_reduce(rows.T @ rows)  # (n, n)
    _, vecs = torch.linalg.eigh(gram)
    return vecs.flip(-1)[:, :r].T


def _worker(rank, world, port, grads, ranks, repeat, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    comm = Comm()
    out = {}
    for key, g in grads.items():
        rows = _rows(g, rank, world)
        for method in METHODS:
            best = float("inf")
            for _ in range(repeat):
                comm.reset()
                dist.barrier()
                t0 = time.perf_counter()
                _refresh(method, rows, ranks[key], comm, world)
                best = min(best, time.perf_counter() - t0)
            out[key, method] = {"seconds": best, "bytes": comm.total_bytes()}
        # projectors for the energy columns: the paper's rank (the timed refresh), rank / 4, rank / 16
        for div in DIVISORS:
            out[key, f"p/{div}"] = distributed_right_projector(rows, ranks[key] // div, comm.all_reduce, oversample=OVERSAMPLE,
                                                               power_iters=POWER_ITERS, seed=0)
    torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world, grads, ranks, repeat):
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(world, _free_port(), grads, ranks, repeat, d), nprocs=world,
                           start_method="spawn")
        per_rank = [torch.load(os.path.join(d, f"{r}.pt"), weights_only=False) for r in range(world)]
    merged = {}
    for key in per_rank[0]:
        if isinstance(key[1], str) and key[1] in METHODS:
            assert len({o[key]["bytes"] for o in per_rank}) == 1
            merged[key] = {"seconds": max(o[key]["seconds"] for o in per_rank), "bytes": per_rank[0][key]["bytes"]}
        else:
            merged[key] = per_rank[0][key]
    return merged


def _lost(g, p):
    return 1.0 - proj.captured_energy(g, None, p)


def tables(grads, ranks, results, worlds):
    first = results[worlds[0]]
    energy_head = " | ".join(f"lost at r/{d}: SVD / finder" if d > 1 else "lost at r: SVD / finder" for d in DIVISORS)
    lines = [f"Payload per rank, per refresh of one matrix; right projector P (r, n), oversample {OVERSAMPLE}, "
             f"{POWER_ITERS} power iterations. Lost energy = 1 - ||G P^T||^2 / ||G||^2.", "",
             "| matrix | (m, n) | r | range finder KiB | all-gather G KiB | all-reduce G^T G KiB | gather / finder "
             f"| {energy_head} |", "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(DIVISORS)]
    for key, g in grads.items():
        m, n = g.shape
        r = ranks[key]
        b = [first[key, method]["bytes"] for method in METHODS]
        assert b[0] == refresh_bytes(n, r, OVERSAMPLE, POWER_ITERS)
        energy = " | ".join(
            f"{_lost(g, proj.compute_projector(g, r // d, 'right', method='svd')[1]):.2e} / "
            f"{_lost(g, first[key, f'p/{d}']):.2e}" for d in DIVISORS)
        lines.append(f"| {key[0]} {key[1]} | ({m}, {n}) | {r} | {b[0] / 1024:,.0f} | {b[1] / 1024:,.0f} | "
                     f"{b[2] / 1024:,.0f} | {b[1] / b[0]:.1f} | {energy} |")
    head = " | ".join(f"{method}, N={w} ms" for w in worlds for method in METHODS)
    lines += ["", "Refresh time (best of repeats, slowest rank; shared cores, one thread per rank).", "",
              f"| matrix | (m, n) | r | {head} |", "|---|---|---:|" + "---:|" * (len(worlds) * len(METHODS))]
    for key, g in grads.items():
        cells = " | ".join(f"{results[w][key, method]['seconds'] * 1e3:,.1f}" for w in worlds for method in METHODS)
        lines.append(f"| {key[0]} {key[1]} | {tuple(g.shape)} | {ranks[key]} | {cells} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["60m", "130m"], choices=["60m", "130m"])
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--warm-steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    grads, ranks = {}, {}
    for name in args.shapes:
        # the paper's widths with 2 decoder layers (the middle one's gradients are used): real
        # gradients in seconds on a CPU; the matrices have the full-size shapes
        short = f"{name}-2l"
        llama_shapes.SHAPES[short] = replace(llama_shapes.SHAPES[name], name=short, layers=2)
        layer_grads, paper_rank = real_gradients(short, args.warm_steps, args.batch, args.seq)
        for matrix, g in layer_grads.items():
            grads[name, matrix] = g
            ranks[name, matrix] = paper_rank
    results = {w: run(w, grads, ranks, args.repeat) for w in args.world_sizes}
    print()
    print(tables(grads, ranks, results, args.world_sizes))
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
