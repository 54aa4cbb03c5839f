"""Bytes and time of full data-parallel optimizer steps: DDP AdamW, ZeRO-2 AdamW (slimtrain's
whole-tensor sharding and DeepSpeed's), slimtrain GaLore (low-rank sync, with and without
sharding) and FSDP2 (AdamW, AdamW8bit, GaLore, GaLore 8-bit on row shards), plus per-rank
weights, optimizer state and peak RSS.

Real gloo processes on this machine (spawned, one torch/OMP thread each), the GaLore paper's
Llama-60M shapes (``--quick``: a small Llama), random gradients of the right shapes (the bytes
do not depend on their values). One step = gradient sync + global-norm clip (1.0) + optimizer
step + parameter broadcast (what ``slimtrain.parallel.DataParallelOptimizer`` does per step).
Every row runs in fresh processes, so each rank's ``ru_maxrss`` is that row's peak:

* ``DDP AdamW``: ``DataParallelOptimizer(AdamW, zero_stage=0)`` (bucketed all-reduce, as DDP);
* ``ZeRO-2 AdamW, slimtrain``: ``zero_stage=2``: each whole tensor reduced to its owner, owner
  steps it, broadcasts it;
* ``ZeRO-2 AdamW, DeepSpeed``: ``deepspeed.initialize`` with ZeRO stage 2 on CPU/gloo (25 MiB
  buckets like the others, no overlap); its gradients come from ``backward`` of a synthetic loss
  ``sum(p**2)/2`` (gradient = the weights), so its step time also holds that backward;
  collectives counted by wrapping ``torch.distributed``'s in the worker;
* ``GaLore``: ``DataParallelOptimizer(GaLoreAdamW(galore_param_groups(model, rank=r)),
  zero_stage=0 or 2)``, on a steady step and on a projector-refresh step (one step in
  ``update_proj_gap``, 200 by default; here the gap is set so that the refresh after the timed
  steady steps is measured, not the first step);
* ``FSDP2 ...``: ``slimtrain.parallel.fsdp.shard_model`` (``fully_shard`` per decoder layer and
  the root) on the meta device, then each rank materialises its rows (the weights' values
  differ from the other rows', which the bytes do not depend on), and the optimizer is built on
  the DTensor shards; gradients from ``backward`` of the
  synthetic loss ``sum(p**2)/2`` run through each layer's forward (so FSDP2 all-gathers each
  layer for forward and again for backward, and reduce-scatters its gradient), torch's
  ``clip_grad_norm_`` (1.0) and the step; a GaLore refresh gathers each gradient to the first
  rank and broadcasts the (r x n) projector (``slimtrain.optim.row_shards``). Collectives are
  counted like DeepSpeed's.

Bytes are payload handed to collectives per rank per step (``slimtrain.parallel.Comm``; for
DeepSpeed's all-gather / reduce-scatter the full gathered / scattered buffer, so that a
reduce-scatter + all-gather pair counts like a reduce + broadcast of the same tensor). "GaLore
matrices" are the tensors GaLore projects (every decoder linear); their bytes are the row's
bytes minus those of one extra step in which only the other tensors have gradients (DeepSpeed:
their element share of its flat buffers).

    OMP_NUM_THREADS=1 python bench/comm.py [--world-sizes 2 4] [--steps 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # bench/ (llama_shapes) and the checkout's slimtrain
from llama_shapes import SHAPES, LlamaParams, LlamaShape  # noqa: E402

from slimtrain.optim import GaLoreAdamW, galore_param_groups  # noqa: E402
from slimtrain.parallel import Comm, DataParallelOptimizer  # noqa: E402

QUICK = LlamaShape("quick", hidden=256, intermediate=688, layers=2, heads=4, vocab=8000, galore_rank=64)
BUCKET = 25 * 2**20
ROWS = {  # key: (label, zero_stage, galore)
    "ddp": ("DDP AdamW", 0, False),
    "zero2": ("ZeRO-2 AdamW, slimtrain (whole tensors)", 2, False),
    "deepspeed": ("ZeRO-2 AdamW, DeepSpeed", 2, False),
    "galore0": ("GaLore low-rank sync (stage 0)", 0, True),
    "galore2": ("GaLore low-rank sync + sharding (stage 2)", 2, True),
    # FSDP2 (fully_shard per decoder layer + root): weights, gradients and state sharded by rows
    "fsdp_adamw": ("FSDP2 AdamW", 3, False),
    "fsdp_adamw8bit": ("FSDP2 AdamW8bit", 3, False),
    "fsdp_galore": ("FSDP2 GaLore", 3, True),
    "fsdp_galore8bit": ("FSDP2 GaLore 8-bit", 3, True),
}
MiB = 2**20


def _shape(name: str) -> LlamaShape:
    return QUICK if name == "quick" else SHAPES[name]


def _rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _galore_ids(model) -> set[int]:
    groups = galore_param_groups(model, rank=1)
    return {id(p) for g in groups if "rank" in g for p in g["params"]}


# ---------------------------------------------------------------- slimtrain rows
def _run_slimtrain(model, row: str, shape: LlamaShape, steps: int):
    _, stage, galore = ROWS[row]
    params = list(model.parameters())
    gap = steps + 1  # steps 0 and steps+1 refresh the projectors; 1..steps are steady
    if galore:
        opt = GaLoreAdamW(galore_param_groups(model, rank=shape.galore_rank, update_proj_gap=gap), lr=1e-3)
    else:
        opt = torch.optim.AdamW(params, lr=1e-3)
    comm = Comm()
    dpo = DataParallelOptimizer(opt, zero_stage=stage, comm=comm, bucket_bytes=BUCKET)
    gen = torch.Generator().manual_seed(dist.get_rank())
    galore_ids = _galore_ids(model)

    def one_step(with_grad=lambda p: True):
        for p in params:
            p.grad = torch.empty_like(p).uniform_(-1e-3, 1e-3, generator=gen) if with_grad(p) else None
        comm.reset()
        dist.barrier()
        t0 = time.perf_counter()
        dpo.sync_gradients()
        dpo.clip_grad_norm_(1.0)
        dpo.step()
        dist.barrier()
        elapsed = time.perf_counter() - t0
        dpo.zero_grad()
        return comm.total_bytes(), elapsed, dict(comm.bytes)

    one_step()  # warm-up: creates optimizer state (and, for GaLore, the first projectors)
    steady = [one_step() for _ in range(steps)]
    out = {"steady": steady}
    if galore:
        out["refresh"] = [one_step()]
    # the same step with gradients for the non-GaLore tensors only: their share of every row
    out["other_bytes"] = one_step(lambda p: id(p) not in galore_ids)[0]
    out["state_bytes"] = dpo.state_bytes()
    return out


# ---------------------------------------------------------------- DeepSpeed row
_COUNTED = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "_all_gather_base",
            "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "all_reduce_coalesced",
            "gather", "scatter", "all_to_all_single", "all_to_all",
            "all_gather_single", "reduce_scatter_single")  # the last two: FSDP2's


def _count_torch_collectives() -> dict:
    """Wrap ``torch.distributed``'s collectives so every call adds its payload to ``counts``.

    Payload: the full (unsharded) buffer of the call: all-reduce / reduce / broadcast their
    tensor; all-gather(-into-tensor) its output; reduce-scatter its input. Nested calls (a
    fallback implemented through another collective) count once.
    """
    counts = {"bytes": {}, "depth": 0}

    def nbytes(x):
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(nbytes(t) for t in x)
        return 0

    def payload(name, args, kwargs):
        def arg(i, *keys):
            for k in keys:
                if k in kwargs:
                    return kwargs[k]
            return args[i] if len(args) > i else None
        if name in ("all_gather", "all_gather_into_tensor", "_all_gather_base", "all_gather_single"):
            return nbytes(arg(0, "tensor_list", "output_tensor", "output"))
        if name in ("reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter_single"):
            return nbytes(arg(1, "input_list", "input", "input_tensor"))
        if name in ("all_to_all_single", "all_to_all"):
            return nbytes(arg(1, "input", "input_tensor_list"))
        if name == "all_reduce_coalesced":
            return nbytes(arg(0, "tensors"))
        return nbytes(arg(0, "tensor"))

    def wrap(name, fn):
        def counted(*args, **kwargs):
            if counts["depth"] == 0:
                counts["bytes"][name] = counts["bytes"].get(name, 0) + payload(name, args, kwargs)
            counts["depth"] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                counts["depth"] -= 1
        return counted

    for name in _COUNTED:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))
    return counts


def _run_deepspeed(model, shape: LlamaShape, steps: int):
    counts = _count_torch_collectives()  # before DeepSpeed binds anything
    import deepspeed

    class SyntheticLoss(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self):
            return sum((p * p).sum() for p in self.inner.parameters()) * 0.5  # gradient = p

    net = SyntheticLoss(model)
    galore_numel = sum(p.numel() for p in model.parameters() if id(p) in _galore_ids(model))
    total_numel = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    elements = BUCKET // 4
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": 2, "reduce_bucket_size": elements, "allgather_bucket_size": elements,
                                    "overlap_comm": False, "contiguous_gradients": True},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    deepspeed.init_distributed(dist_backend="gloo")
    engine, ds_opt, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=config)

    def one_step():
        loss = engine()
        counts["bytes"].clear()
        dist.barrier()
        t0 = time.perf_counter()
        engine.backward(loss)
        engine.step()
        dist.barrier()
        elapsed = time.perf_counter() - t0
        total = sum(counts["bytes"].values())
        return total, elapsed, dict(counts["bytes"])

    one_step()
    steady = [one_step() for _ in range(steps)]
    inner = ds_opt.optimizer
    state_bytes = sum(v.numel() * v.element_size() for s in inner.state.values() for v in s.values()
                      if isinstance(v, torch.Tensor))
    return {"steady": steady, "galore_fraction": galore_numel / total_numel, "state_bytes": state_bytes}


# ---------------------------------------------------------------- FSDP2 rows
def _layer_loss(self):
    # a synthetic loss whose gradient is the weights: FSDP2 all-gathers the layer before this
    # forward and reduce-scatters its gradient after backward, as in training
    return sum((p * p).sum() for p in self.parameters()) * 0.5


def _model_loss(self):
    own = sum((p * p).sum() for name, p in self.named_parameters() if not name.startswith("layers."))
    return sum(layer() for layer in self.layers) + own * 0.5


def _run_fsdp(model, row: str, shape: LlamaShape, steps: int):
    from llama_shapes import DecoderLayer

    from slimtrain.optim import AdamW8bit, GaLoreAdamW8bit
    from slimtrain.optim.shards import local
    from slimtrain.parallel.fsdp import shard_model

    counts = _count_torch_collectives()  # before FSDP2 binds anything
    DecoderLayer.forward, type(model).forward = _layer_loss, _model_loss
    galore_numel = sum(p.numel() for p in model.parameters() if id(p) in _galore_ids(model))
    total_numel = sum(p.numel() for p in model.parameters())
    shard_model(model)
    model.materialize()  # the sharded parameters: each rank allocates and initialises its rows only
    gap = steps + 1  # as the slimtrain rows: the refresh after the timed steady steps is measured
    if row == "fsdp_adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    elif row == "fsdp_adamw8bit":
        opt = AdamW8bit(model.parameters(), lr=1e-3)
    else:
        cls = GaLoreAdamW if row == "fsdp_galore" else GaLoreAdamW8bit
        opt = cls(galore_param_groups(model, rank=shape.galore_rank, update_proj_gap=gap), lr=1e-3)
    params = list(model.parameters())

    def one_step():
        counts["bytes"].clear()
        dist.barrier()
        t0 = time.perf_counter()
        model().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dist.barrier()
        elapsed = time.perf_counter() - t0
        return sum(counts["bytes"].values()), elapsed, dict(counts["bytes"])

    one_step()  # warm-up: creates optimizer state (and, for GaLore, the first projectors)
    out = {"steady": [one_step() for _ in range(steps)]}
    if ROWS[row][2]:
        out["refresh"] = [one_step()]
    out["state_bytes"] = sum(local(v).numel() * local(v).element_size() for st in opt.state.values()
                             for v in st.values() if isinstance(v, torch.Tensor))
    out["local_param_bytes"] = sum(local(p).numel() * local(p).element_size() for p in params)
    out["galore_fraction"] = galore_numel / total_numel
    return out


# ---------------------------------------------------------------- worker / driver
def _worker(rank, world, port, shape_name, row, steps, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    shape = _shape(shape_name)
    rss_start = _rss_now()
    torch.manual_seed(0)
    # FSDP2 rows shard the model on the meta device, then materialise each rank's rows only
    model = LlamaParams(shape, materialize=not row.startswith("fsdp"))
    if row == "deepspeed":
        res = _run_deepspeed(model, shape, steps)
    elif row.startswith("fsdp"):
        res = _run_fsdp(model, row, shape, steps)
    else:
        res = _run_slimtrain(model, row, shape, steps)
    res["rss_start"] = rss_start
    res["rss_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    res["param_bytes"] = sum(p.numel() * 4 for p in model.parameters())
    res["galore_bytes"] = sum(p.numel() * 4 for p in model.parameters() if id(p) in _galore_ids(model))
    # data parallelism must leave the same weights on every rank, whatever each rank's gradients
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]  # FSDP2 shards
    res["weights_sum"] = float(sum(p.detach().double().sum() for p in full))
    torch.save(res, os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_row(row: str, world: int, shape_name: str, steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(world, _free_port(), shape_name, row, steps, d), nprocs=world,
                           start_method="spawn")
        ranks = [torch.load(os.path.join(d, f"{r}.pt"), weights_only=False) for r in range(world)]
    if len({r["weights_sum"] for r in ranks}) != 1:
        raise RuntimeError(f"{row}: the ranks ended with different weights: {[r['weights_sum'] for r in ranks]}")
    return ranks


def _cells(ranks: list[dict], kind: str):
    """(bytes per rank per step, median step seconds) of ``kind`` steps, max over ranks."""
    nbytes = max(b for r in ranks for b, _, _ in r[kind])
    assert all(b == nbytes for b, _, _ in ranks[0][kind]), "bytes differ between steps of the same kind"
    seconds = statistics.median(t for _, t, _ in ranks[0][kind])  # barriers: rank 0 waits for the slowest
    return nbytes, seconds


def table(world: int, results: dict[str, list[dict]]) -> str:
    any_ranks = next(iter(results.values()))
    total, galore_full = any_ranks[0]["param_bytes"], any_ranks[0]["galore_bytes"]
    lines = [f"### {world} ranks (gradients {total / MiB:.1f} MiB, of which GaLore matrices "
             f"{galore_full / MiB:.1f} MiB)", "",
             "| step | MiB sent | vs DDP | GaLore-matrix MiB | GaLore saving (x) | step ms | vs DDP "
             "| weights MiB/rank | opt. state MiB/rank | peak RSS MiB/rank | RSS at start MiB | MiB by collective |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    base_bytes, base_time = _cells(results["ddp"], "steady")

    def galore_part(ranks, nbytes):
        if "other_bytes" in ranks[0]:
            return nbytes - max(r["other_bytes"] for r in ranks)
        return nbytes * ranks[0]["galore_fraction"]  # DeepSpeed: flat buffers, every element travels alike

    # the saving on GaLore matrices is against AdamW at the same ZeRO stage (stage 0: DDP)
    reference = {0: galore_part(results["ddp"], base_bytes)}
    if "zero2" in results:
        reference[2] = galore_part(results["zero2"], _cells(results["zero2"], "steady")[0])
    for row, ranks in results.items():
        label = ROWS[row][0]
        for kind in ("steady", "refresh"):
            if kind not in ranks[0]:
                continue
            nbytes, seconds = _cells(ranks, kind)
            g = galore_part(ranks, nbytes)
            g_txt = f"{g / MiB:.1f}" + ("" if "other_bytes" in ranks[0] else " (pro rata)")
            ref = reference.get(ROWS[row][1])
            saving = f"{ref / g:.2f}" if ref else "-"
            name = label + (f", {kind} step" if ROWS[row][2] else "")
            state = max(r["state_bytes"] for r in ranks)
            rss = max(r["rss_peak"] for r in ranks)
            start = max(r["rss_start"] for r in ranks)
            ops = ranks[0][kind][0][2]
            ops_txt = " + ".join(f"{op} {b / MiB:.1f}" for op, b in sorted(ops.items(), key=lambda kv: -kv[1]))
            held = max(r.get("local_param_bytes", r["param_bytes"]) for r in ranks)
            lines.append(f"| {name} | {nbytes / MiB:.1f} | {nbytes / base_bytes:.3f} | {g_txt} | "
                         f"{saving} | {seconds * 1e3:,.0f} | {seconds / base_time:.2f} | {held / MiB:.1f} | "
                         f"{state / MiB:.1f} | {rss / MiB:,.0f} | {start / MiB:,.0f} | {ops_txt} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="60m", choices=sorted(SHAPES))
    ap.add_argument("--quick", action="store_true", help="a small Llama (hidden 256, 2 layers, vocab 8000)")
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, default=3, help="timed steady steps per row (median reported)")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    args = ap.parse_args(argv)
    if "ddp" not in args.rows:
        args.rows.insert(0, "ddp")  # the reference of every ratio
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator at import
    shape_name = "quick" if args.quick else args.shape
    shape = _shape(shape_name)
    print(f"Llama-{shape_name} shapes, GaLore rank {shape.galore_rank}, gloo on CPU, 1 thread per rank, torch "
          f"{torch.__version__}; payload bytes per rank per step; step = sync + clip + optimizer step + broadcast")
    for world in args.world_sizes:
        results = {}
        for row in args.rows:
            t0 = time.perf_counter()
            try:
                results[row] = run_row(row, world, shape_name, args.steps)
            except Exception as exc:  # a row that cannot run here is reported, not fatal
                print(f"[{row} at {world} ranks failed: {type(exc).__name__}: {exc}]", file=sys.stderr)
                continue
            print(f"[{row} at {world} ranks: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
        print()
        print(table(world, results), flush=True)


if __name__ == "__main__":
    main()
