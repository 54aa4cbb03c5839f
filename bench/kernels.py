"""Throughput of the 8-bit AdamW step against fp32 AdamW, bitsandbytes and torchao.

Two tables, every row measured in this one run:

1. single tensors of 1M .. 256M elements (CPU: 1M .. 16M by default): ms per step,
   parameters per second, bytes moved per parameter per step and effective GB/s; on CUDA also
   the percentage of the memory-bandwidth roofline, taken as this device's measured
   device-to-device copy bandwidth (read + write);
2. (CPU) the Llama-60M parameter shapes as one optimizer: step time and the ratio to
   torch.optim.AdamW (default for-loop path and fused), with the compile time of the fused
   ``torch.compile`` 8-bit path and the build time of the C++ path reported separately.

Bytes per parameter per step (the minimum traffic of a fused step): fp32 AdamW reads param,
grad, m, v and writes param, m, v: 28 B; an 8-bit step reads param, grad, two codes and writes
param and two codes: 16 B (+ 16/256 B of absmax).

    python bench/kernels.py            # CPU: sizes 1M, 4M, 16M + Llama-60M shapes
    python bench/kernels.py --quick    # 1M only, 60M shapes with fewer steps
    python bench/kernels.py --sizes 1 16 256   # millions of elements (CUDA)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings

import torch

from slimtrain import kernels
from slimtrain.optim import AdamW8bit

warnings.filterwarnings("ignore")

BYTES = {"fp32": 28.0, "8bit": 16.0 + 2 * 4 / 256}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, n=64 * 2**20) -> float:
    """Measured device copy bandwidth in B/s (bytes read + written)."""
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    _sync(device)
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    _sync(device)
    return 2 * a.numel() * 4 * reps / (time.perf_counter() - t)


def optimizers(device):
    """(label, bytes key, factory(params)) for every optimizer this machine can run."""
    rows = [("torch AdamW (for-loop)", "fp32", lambda ps: torch.optim.AdamW(ps, foreach=False)),
            ("torch AdamW foreach", "fp32", lambda ps: torch.optim.AdamW(ps, foreach=True)),
            ("torch AdamW fused", "fp32", lambda ps: torch.optim.AdamW(ps, fused=True))]
    try:
        import bitsandbytes as bnb

        rows.append(("bitsandbytes AdamW8bit", "8bit", lambda ps: bnb.optim.AdamW8bit(ps)))
    except Exception as e:  # noqa: BLE001 -- reported, the row is skipped
        print(f"(bitsandbytes unavailable: {e})", file=sys.stderr)
    try:
        from torchao.optim import AdamW8bit as AoAdamW8bit

        rows.append(("torchao AdamW8bit", "8bit", lambda ps: AoAdamW8bit(ps)))
    except Exception as e:  # noqa: BLE001
        print(f"(torchao unavailable: {e})", file=sys.stderr)
    if device.type == "cuda":
        rows.append(("slimtrain AdamW8bit (Triton)", "8bit", lambda ps: AdamW8bit(ps, backend="triton")))
    else:
        rows.append(("slimtrain AdamW8bit (eager)", "8bit", lambda ps: AdamW8bit(ps, backend="torch")))
        rows.append(("slimtrain AdamW8bit (compile)", "8bit", lambda ps: AdamW8bit(ps, backend="compile")))
        rows.append(("slimtrain AdamW8bit (cpp)", "8bit", lambda ps: AdamW8bit(ps, backend="cpp")))
    return rows


def time_steps(make, shapes, device, steps, warmup=2):
    """(mean seconds per step after warm-up, seconds of the first step) or None if it failed."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
    try:
        opt = make(params)
        _sync(device)
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        first = time.perf_counter() - t0
        for _ in range(warmup - 1):
            opt.step()
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            opt.step()
        _sync(device)
        return (time.perf_counter() - t) / steps, first
    except Exception as e:  # noqa: BLE001 -- a baseline that cannot run here is reported, not fatal
        print(f"  failed: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
        return None
    finally:
        del params
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def size_table(device, sizes_m, steps, bw):
    print(f"\n### Single tensor, {device.type}: ms per step (bytes/param: fp32 28, 8-bit 16.06)\n")
    head = "| optimizer | elements | ms/step | Mparam/s | B/param | GB/s |"
    head += " % roofline |" if device.type == "cuda" else ""
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for size in sizes_m:
        n = int(size * 2**20)
        for label, key, make in optimizers(device):
            if "eager" in label and n > 4 * 2**20:
                continue  # the eager twin is a reference, not a fast path: skip big sizes
            print(f"  {label} {size}M", file=sys.stderr, flush=True)
            r = time_steps(make, [(n,)], device, steps)
            if r is None:
                print(f"| {label} | {size}M | failed | | | |" + (" |" if device.type == "cuda" else ""))
                continue
            t, _ = r
            gbs = BYTES[key] * n / t / 1e9
            row = f"| {label} | {size}M | {t * 1e3:,.2f} | {n / t / 1e6:,.0f} | {BYTES[key]:.2f} | {gbs:,.1f} |"
            if device.type == "cuda":
                row += f" {100 * gbs * 1e9 / bw:.0f}% |"
            print(row, flush=True)


def llama60m_shapes():
    h, i, vocab, layers = 512, 1376, 32000, 8
    shapes = [(vocab, h), (vocab, h), (h,)]
    for _ in range(layers):
        shapes += [(h, h)] * 4 + [(i, h), (i, h), (h, i), (h,), (h,)]
    return shapes


def llama_table(device, steps):
    shapes = llama60m_shapes()
    n = sum(torch.Size(s).numel() for s in shapes)
    print(f"\n### Llama-60M shapes ({n / 1e6:.1f}M parameters, {len(shapes)} tensors), {device.type}\n")
    print("| optimizer | ms/step | vs AdamW (for-loop) | vs AdamW fused | first step s (incl. compile) |")
    print("|---|---:|---:|---:|---:|")
    results = []
    for label, key, make in optimizers(device):
        if "eager" in label:
            continue  # the reference twin (~25x AdamW here) would dominate the run time
        print(f"  {label} llama-60m", file=sys.stderr, flush=True)
        r = time_steps(make, shapes, device, steps)
        results.append((label, r))
    base = dict(results).get("torch AdamW (for-loop)")
    fused = dict(results).get("torch AdamW fused")
    for label, r in results:
        if r is None:
            print(f"| {label} | failed | | | |")
            continue
        t, first = r
        vs = f"{t / base[0]:.2f}" if base else "-"
        vf = f"{t / fused[0]:.2f}" if fused else "-"
        print(f"| {label} | {t * 1e3:,.1f} | {vs} | {vf} | {first:.1f} |")
    if kernels.COMPILE_SECONDS:
        print(f"\ntorch.compile time of the fused 8-bit step (first call): "
              f"{kernels.COMPILE_SECONDS.get('param', float('nan')):.1f} s")
    from slimtrain.kernels import cpu_fused

    if cpu_fused.BUILD_SECONDS:
        print(f"C++ build time of the fused 8-bit step (0 s when torch's extension cache has it): "
              f"{cpu_fused.BUILD_SECONDS['cpp']:.1f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", help="tensor sizes in millions of elements (2^20)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row")
    ap.add_argument("--quick", action="store_true", help="1M elements only and fewer steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sizes = args.sizes or ([1] if args.quick else ([1, 4, 16, 64, 256] if cuda else [1, 4, 16]))
    steps = args.steps or (3 if args.quick else (20 if cuda else 5))
    bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; measured copy bandwidth {bw / 1e9:,.1f} GB/s"
          + (" (the roofline below)" if cuda else ""))
    size_table(device, sizes, steps, bw)
    if not cuda or not args.quick:
        llama_table(device, steps)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
