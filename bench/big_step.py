"""Peak memory of full-parameter training steps on the GaLore paper's Llama shapes, one fresh
process per row, peak RSS read from outside (the child's ``ru_maxrss`` from ``os.wait4``).

Each row builds the model on the meta device straight into its training format
(:mod:`slimtrain.run.materialize`), then runs ``--steps`` full steps (forward, backward,
update) on one sequence of ``--seq`` random token ids (32000-token vocabulary) with activation
checkpointing, and reports a breakdown measured inside the child:

* weights: bytes of parameters and buffers (INT8 codes + scales for Q-GaLore);
* state: bytes of every tensor in ``optimizer.state`` after the steps;
* gradient: the most gradient bytes alive at once during backward (counted in the gradient
  hooks: the whole gradient for an ordinary step; one tensor's for a layer-wise one, an INT8
  weight's fp32 gradient counted from its shape);
* activations: bytes the forward saved for backward (distinct storages, via
  ``torch.autograd.graph.saved_tensors_hooks``);
* runtime: RSS of the child after imports, before building (Python, torch, transformers);
* workspace: the rest of the peak (update transients, recomputation, allocator slack).

Rows whose footprint cannot run here (AdamW at 7B; bf16-weight rows at 7B, whose bf16 weights
alone are 13.5 GB) are *computed* from the same byte rules, marked "computed".

    python bench/big_step.py --shape llama-350m
    python bench/big_step.py --shape llama-7b      # docs/configs/llama7b_small_box.yaml's optimizer and rank
    python bench/big_step.py --shape llama-7b --optim qgalore_adamw8bit --rank 512 --int8-update-chunk 0
    python bench/big_step.py --shape llama-7b --layers 2 --trace-peak   # where the peak is, in minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

OPTIMS = ("adamw", "adamw8bit", "galore_adamw8bit", "qgalore_adamw8bit")
LABELS = {
    "adamw": "AdamW (torch), bf16 weights + bf16 moments, ordinary step",
    "adamw8bit": "AdamW8bit layer-wise, bf16 weights + SR",
    "galore_adamw8bit": "GaLoreAdamW8bit layer-wise, bf16 weights + SR",
    "qgalore_adamw8bit": "QGaLoreAdamW8bit layer-wise, INT8 weights + SR",
}
RANKS = {"llama-60m": 128, "llama-350m": 256, "llama-1b": 512, "llama-7b": 1024}  # the papers' ranks
# Llama-7B without --optim / --rank runs the <= 10 GB recipe, read from its config file so the
# measured row and the recipe cannot drift apart (tests/test_big_step.py checks the rest agrees).
SMALL_BOX = os.path.join(ROOT, "docs", "configs", "llama7b_small_box.yaml")
GALORE = dict(update_proj_gap=200, scale=0.25)  # projector settings of every GaLore row
VOCAB = 32000
GiB = 2**30


def small_box() -> dict:
    """Optimizer name and arguments, model, data and batch settings of ``SMALL_BOX``."""
    import yaml

    with open(SMALL_BOX) as f:
        return yaml.safe_load(f)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakTracer:
    """``--trace-peak``: where the RSS peaks. A thread samples RSS every ``interval`` s and keeps,
    per place (the innermost slimtrain/bench frames and the innermost frame of the main thread),
    the highest RSS seen there. Sampling misses spikes shorter than the interval and costs a
    little memory itself; the table's peak stays the parent's ``ru_maxrss``."""

    def __init__(self, interval: float = 0.002):
        import threading

        self.places: dict[str, int] = {}
        self.main = threading.main_thread().ident
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _place(self, frame) -> str:
        import traceback

        def name(fs) -> str:
            path = os.path.relpath(fs.filename, ROOT) if fs.filename.startswith(ROOT) else os.path.basename(fs.filename)
            return f"{path}:{fs.lineno} {fs.name}"

        stack = traceback.extract_stack(frame)
        ours = [name(fs) for fs in stack if fs.filename.startswith(ROOT)][-3:]
        return " < ".join(reversed(ours)) + " | " + (name(stack[-1]) if stack else "?")

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = _rss()
            frame = sys._current_frames().get(self.main)
            if frame is not None:
                place = self._place(frame)
                if rss > self.places.get(place, 0):
                    self.places[place] = rss
            time.sleep(self.interval)

    def top(self, n: int = 8) -> list[tuple[int, str]]:
        """The ``n`` places with the highest RSS; stops sampling (a thread still running at
        interpreter exit aborts the process)."""
        self._stop.set()
        self._thread.join()
        return sorted(((v, k) for k, v in self.places.items()), reverse=True)[:n]


# ---------------------------------------------------------------------------- child
def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from slimtrain.optim import (AdamW8bit, GaLoreAdamW8bit, QGaLoreAdamW8bit, galore_param_groups,
                                 qgalore_param_groups)
    from slimtrain.optim.qgalore import GRAD_ATTR
    from slimtrain.run.config import ModelConfig
    from slimtrain.run.model import build_model

    runtime = _rss()
    tracer = PeakTracer() if args.trace_peak else None
    if args.layers:  # diagnostic: the shape's widths with fewer decoder layers (this process only)
        from slimtrain.run import model as model_module

        preset = model_module.MODEL_PRESETS[args.shape]
        model_module.MODEL_PRESETS[args.shape] = lambda: {**preset(), "num_hidden_layers": args.layers}
    int8 = args.optim == "qgalore_adamw8bit"
    cfg = ModelConfig(name=args.shape, dtype="bfloat16", init_device="meta", int8_weights=int8,
                      activation_checkpointing=True)
    t0 = time.perf_counter()
    model = build_model(cfg, VOCAB, args.seq, 1, 2, seed=0)
    build_s = time.perf_counter() - t0
    build_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))

    # gradient bytes alive at once (registered before the optimizer's hooks, so they run first)
    params = list(model.parameters())
    int8_grad = max((p.numel() * 4 for p in params if p.dtype == torch.int8), default=0)
    grad_peak = [int8_grad]

    def count(_):
        live = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        live += sum(getattr(p, GRAD_ATTR).numel() * 4 for p in params if getattr(p, GRAD_ATTR, None) is not None)
        grad_peak[0] = max(grad_peak[0], live)

    for p in params:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(count)

    galore = dict(rank=args.rank, proj_method=args.proj_method, **GALORE)
    layerwise = dict(layerwise=True, stochastic_rounding=True)
    if args.optim == "adamw":
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False)
    elif args.optim == "adamw8bit":
        opt = AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-4, **layerwise)
    elif args.optim == "galore_adamw8bit":
        opt = GaLoreAdamW8bit(galore_param_groups(model, **galore), lr=1e-4, **layerwise)
    else:
        # --int8-update-chunk: elements of an INT8 weight updated at a time (0: the whole matrix)
        chunk = {} if args.int8_update_chunk is None else dict(int8_update_chunk=args.int8_update_chunk or None)
        opt = QGaLoreAdamW8bit(qgalore_param_groups(model, **galore), lr=1e-4, **layerwise, **chunk)

    saved: dict[int, int] = {}

    def pack(t):
        try:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (args.steps, args.batch, args.seq), generator=gen)
    times, losses = [], []
    for s in range(args.steps):
        t0 = time.perf_counter()
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids[s], labels=ids[s]).loss
        activations = sum(saved.values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        print(f"step {s + 1}: loss {losses[-1]:.4f}, {times[-1]:.1f} s, rss {_rss() / GiB:.2f} GiB", flush=True)

    def nbytes(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(nbytes(v) for v in obj.values())
        return 0

    state = sum(nbytes(s) for s in opt.state.values())
    return dict(shape=args.shape, optim=args.optim, rank=args.rank, params=sum(p.numel() for p in params),
                int8_update_chunk=getattr(opt, "int8_update_chunk", None),
                runtime=runtime, weights=weights, state=state, grad=grad_peak[0], activations=activations,
                build_s=build_s, build_peak=build_peak, times=times, losses=losses,
                peak_places=tracer.top() if tracer else [])


# ---------------------------------------------------------------------------- computed rows
def computed(shape: str, optim: str, rank: int) -> dict:
    """Bytes of weights, state and the gradient transient from the parameter shapes alone."""
    import torch

    from slimtrain.run.config import ModelConfig
    from slimtrain.run.materialize import parameters_on_meta
    from slimtrain.run.model import _hf_config
    from transformers import AutoModelForCausalLM

    hf, _ = _hf_config(ModelConfig(name=shape), VOCAB, 256, 1, 2)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(hf)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    n_params = sum(math.prod(s) for s in shapes.values())

    def state8(numel):  # 8-bit moments (fp32 below min_8bit_size)
        return 2 * numel + 8 * math.ceil(numel / 256) + 4 if numel >= 4096 else 8 * numel

    def layer_matrix(name, s):
        return len(s) == 2 and "layers." in name

    weights = 2 * n_params
    if optim == "qgalore_adamw8bit":  # INT8 codes + an fp32 scale per 256 for the decoder's matrices
        weights = sum(math.prod(s) * (1 + 4 / 256) if layer_matrix(n, s) else 2 * math.prod(s)
                      for n, s in shapes.items())
    if optim == "adamw":
        state, grad = 4 * n_params, 2 * n_params  # bf16 moments; the whole bf16 gradient
    elif optim == "adamw8bit":
        state = sum(state8(math.prod(s)) for s in shapes.values())
        grad = max(2 * math.prod(s) for s in shapes.values())
    else:
        state, grad = 0, 0
        int8 = optim == "qgalore_adamw8bit"
        for name, s in shapes.items():
            if layer_matrix(name, s):
                m, n = max(s), min(s)
                # low-rank moments + projector (fp32, or INT4 with a scale and min per 128)
                state += state8(m * rank) + (rank * n * (0.5 + 8 / 128) if int8 else 4 * rank * n)
                grad = max(grad, (4 if int8 else 2) * math.prod(s))  # INT8 weights: fp32 gradient
            else:
                state += state8(math.prod(s))
                grad = max(grad, 2 * math.prod(s))
    return dict(shape=shape, optim=optim, rank=rank, params=n_params, weights=weights, state=state, grad=grad,
                computed=True)


# ---------------------------------------------------------------------------- parent
def run_row(args, optim: str) -> dict:
    out = os.path.join(args.workdir, f"{args.shape}_{optim}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--shape", args.shape, "--optim", optim,
           "--rank", str(args.rank), "--steps", str(args.steps), "--seq", str(args.seq), "--batch", str(args.batch),
           "--threads", str(args.threads), "--proj-method", args.proj_method, "--out", out,
           "--layers", str(args.layers)] + (["--trace-peak"] if args.trace_peak else [])
    if args.int8_update_chunk is not None:
        cmd += ["--int8-update-chunk", str(args.int8_update_chunk)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": ROOT}
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        return dict(shape=args.shape, optim=optim, rank=args.rank, failed=proc.returncode)
    with open(out) as f:
        row = json.load(f)
    row["peak"] = usage.ru_maxrss * 1024  # kB -> bytes, read by the parent
    return row


def fmt(row: dict) -> str:
    g = lambda b: f"{b / GiB:.2f}" if b is not None else "-"  # noqa: E731
    label = LABELS[row["optim"]] + (f", rank {row['rank']}" if "galore" in row["optim"] else "")
    if row.get("failed") is not None:
        return f"| {label} | failed (exit {row['failed']}) |" + " |" * 9
    if row.get("computed"):
        total = row["weights"] + row["state"] + row["grad"]
        return (f"| {label} | computed: >= {g(total)} | - | {g(row['weights'])} | {g(row['state'])} | {g(row['grad'])} "
                "| - | - | - | - |")
    work = row["peak"] - row["runtime"] - row["weights"] - row["state"] - row["grad"] - row["activations"]
    t = row["times"]
    return (f"| {label} | **{g(row['peak'])}** ({row['peak'] / 1e9:.2f} GB) | {g(row['runtime'])} | {g(row['weights'])} "
            f"| {g(row['state'])} | {g(row['grad'])} | {g(row['activations'])} | {g(work)} | {t[0]:.1f} | "
            f"{t[-1]:.1f} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments with the defaults filled in (llama-7b: ``SMALL_BOX``'s optimizer,
    rank and INT8 update chunk unless given)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-350m", choices=sorted(RANKS))
    ap.add_argument("--optim", nargs="*", default=None, choices=OPTIMS,
                    help="rows to run (default: all that fit; the others are computed)")
    ap.add_argument("--computed", nargs="*", default=None, choices=OPTIMS, help="rows to compute instead of run")
    ap.add_argument("--rank", type=int, default=None,
                    help="GaLore rank (default: the paper's for the shape; for llama-7b, the small-box config's)")
    ap.add_argument("--int8-update-chunk", type=int, default=None,
                    help="QGaLoreAdamW8bit: elements of an INT8 weight updated at a time, 0 = whole matrix "
                         "(default: the optimizer's; for llama-7b, the small-box config's if it sets one)")
    ap.add_argument("--proj-method", default="randomized", choices=("svd", "randomized"))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default="/tmp/slimtrain_big_step")
    ap.add_argument("--layers", type=int, default=0,
                    help="diagnostic: build the shape with this many decoder layers (0: the shape's own)")
    ap.add_argument("--trace-peak", action="store_true",
                    help="diagnostic: sample RSS in a thread and print the highest RSS per code location")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.shape == "llama-7b" and not args.child:
        box = small_box()
        if args.optim is None:
            args.optim = [box["optim"]["name"]]
        if args.rank is None:
            args.rank = box["optim"]["args"]["rank"]
        if args.int8_update_chunk is None:
            args.int8_update_chunk = box["optim"]["args"].get("int8_update_chunk")
    args.rank = args.rank or RANKS[args.shape]
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        args.optim = args.optim[0]
        row = child(args)
        with open(args.out, "w") as f:
            json.dump(row, f)
        return
    os.makedirs(args.workdir, exist_ok=True)
    big = args.shape == "llama-7b"
    run = args.optim if args.optim is not None else (["qgalore_adamw8bit"] if big else list(OPTIMS))
    # computed rows are for the whole shape: none by default with --layers
    comp = args.computed if args.computed is not None else ([] if args.layers else [o for o in OPTIMS if o not in run])
    import torch

    print(f"torch {torch.__version__}, {args.threads} thread(s); {args.shape}, batch {args.batch} x {args.seq}, "
          f"{args.steps} steps, activation checkpointing, projector {args.proj_method}\n")
    rows = [run_row(args, o) for o in run] + [computed(args.shape, o, args.rank) for o in comp]
    order = {o: i for i, o in enumerate(OPTIMS)}
    rows.sort(key=lambda r: order[r["optim"]])
    params = next((r["params"] for r in rows if "params" in r), 0)
    layers = f", {args.layers} decoder layers" if args.layers else ""
    print(f"\n### {args.shape}{layers}: {params / 1e6:.1f}M parameters (GiB unless stated)\n")
    print("| configuration | peak RSS | runtime | weights | optimizer state | largest gradient | activations "
          "| workspace | s step 1 | s step 2 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(fmt(r))
    for r in rows:
        if "losses" in r:
            chunk = f", INT8 update chunk {r['int8_update_chunk']}" if r["optim"] == "qgalore_adamw8bit" else ""
            print(f"\n{r['optim']}: peak RSS {r['peak']} bytes, losses {['%.4f' % x for x in r['losses']]}{chunk}, "
                  f"build {r['build_s']:.1f} s "
                  f"(peak while building {r['build_peak'] / GiB:.2f} GiB)", end="")
            if r.get("peak_places"):
                print("\n\nhighest sampled RSS per place (GiB; innermost slimtrain/bench frames | innermost frame):")
                for rss, place in r["peak_places"]:
                    print(f"  {rss / GiB:.3f}  {place}", end="\n")
    print()


if __name__ == "__main__":
    main()
