"""The GaLore family side by side: state bytes per parameter, step time with the projector refresh
amortised, and eval loss after the same training budget.

Part A (memory, time) uses the Llama-60M shapes of the GaLore paper (58M parameters, rank 128,
random gradients, as ``bench/optim_memory.py``); state bytes per parameter for the whole model
and for the projected matrices alone (embeddings and head are plain AdamW in every GaLore-family
optimizer, and dominate at this size); step times are the process's CPU time (the machine is
shared); the refresh step's extra time is spread over ``--gap`` steps:
``amortised = (refresh + (gap - 1) * steady) / gap``.

Part B (quality) trains a *reduced* Llama (``--hidden`` 128, 2 layers, byte vocabulary: a 60M
model for hundreds of steps is beyond a CPU budget) on ``../shared/data/tinyshakespeare.txt``
(first 90% train, last 10% eval) for ``--steps`` steps from the same initialisation and batches,
for each learning rate of a 3-point grid per optimizer, and reports the best eval loss (mean
over ``--eval-batches`` fixed held-out batches). Ranks are hidden/4 (the paper's 128/512), the
projector gap ``--train-gap``. Names missing from the registry (e.g. ``natural_galore_adamw`` on
branches without it) are skipped with a note.

    OMP_NUM_THREADS=1 python bench/family.py                 # both parts (~7 min, one core)
    OMP_NUM_THREADS=1 python bench/family.py --skip-quality  # part A only
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import pathlib
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from llama_shapes import SHAPES, LlamaParams, parameter_count  # noqa: E402
from optim_memory import tensor_bytes  # noqa: E402

from slimtrain.optim import registry  # noqa: E402

warnings.filterwarnings("ignore")
DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def family(rank: int) -> list[tuple[str, str, dict, list[float]]]:
    """(label, registry name, kwargs, learning-rate grid) in table order. Grids were centred on
    each optimizer's best rate in a first run (GaLore's ``scale=0.25`` shrinks its updates, so its
    grid sits higher; APOLLO-Mini's ``sqrt(128)`` enlarges them, so lower)."""
    galore = dict(rank=rank, scale=0.25)
    return [
        ("AdamW", "adamw", dict(), [1e-3, 3e-3, 1e-2]),
        ("GaLore AdamW", "galore_adamw", galore, [1e-2, 3e-2, 1e-1]),
        ("Natural GaLore AdamW", "natural_galore_adamw", galore, [1e-2, 3e-2, 1e-1]),
        ("APOLLO", "apollo_adamw", dict(rank=rank, scale=1.0), [3e-3, 1e-2, 3e-2]),
        ("APOLLO-Mini", "apollo_mini", dict(scale=128.0), [1e-3, 3e-3, 1e-2]),
        ("Fira", "fira_adamw", dict(rank=rank, scale=1.0), [3e-3, 1e-2, 3e-2]),
        ("GaLore AdamW 8-bit", "galore_adamw8bit", dict(galore, weight_decay=0.0), [1e-2, 3e-2, 1e-1]),
        ("Q-GaLore AdamW 8-bit", "qgalore_adamw8bit", dict(galore, weight_decay=0.0), [1e-2, 3e-2, 1e-1]),
    ]


def available(rows):
    known = set(registry.available_optimizers())
    for label, name, *_ in rows:
        if name not in known:
            print(f"note: {name!r} is not in this registry; skipped ({label})", file=sys.stderr)
    return [r for r in rows if r[1] in known]


# ---------------------------------------------------------------------- part A: memory and time
def measure(model, name: str, kwargs: dict, steps: int):
    """(state bytes of all tensors, of tensors in ``rank`` groups, parameters in ``rank`` groups,
    steady step CPU seconds, first (refresh) step CPU seconds). CPU time of this process, not
    wall time: the machine is shared, and one thread's CPU time is its compute."""
    opt = registry.build_optimizer(name, model, **kwargs)
    # INT8 weights (qgalore's QuantLinear) do not require grad; their gradient lives in float_grad
    params = [p for p in model.parameters() if p.requires_grad or p.dtype == torch.int8]
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        for p in params:
            g = torch.randn(p.shape, generator=gen) * 1e-3
            if p.dtype == torch.int8:
                p.float_grad = g
            else:
                p.grad = g.to(p.dtype)
        t0 = time.process_time()
        opt.step()
        times.append(time.process_time() - t0)
    projected = {id(p) for g in opt.param_groups if "rank" in g for p in g["params"]}
    state_all = state_proj = n_proj = 0
    for p, s in opt.state.items():
        b = sum(tensor_bytes(v) for v in s.values())
        state_all += b
        if id(p) in projected:
            state_proj += b
            n_proj += p.numel()
    del opt
    gc.collect()
    return state_all, state_proj, n_proj, sum(times[1:]) / max(1, len(times) - 1), times[0]


def part_a(steps: int, gap: int) -> None:
    shape = SHAPES["60m"]
    n_params = parameter_count(shape)
    rows = []
    for label, name, kwargs, lrs in available(family(shape.galore_rank)):
        model = LlamaParams(shape)
        kw = dict(lr=lrs[1]) if name == "adamw" else dict(kwargs, lr=lrs[1], update_proj_gap=gap)
        state, state_proj, n_proj, steady, first = measure(model, name, kw, steps)
        del model
        gc.collect()
        rows.append((label, state, state_proj, n_proj, steady, first, (first + (gap - 1) * steady) / gap))
        print(f"  measured {label}", file=sys.stderr, flush=True)
    base_state, base_time = rows[0][1], rows[0][6]
    print(f"\n### A. Llama-60m shapes: {n_params / 1e6:.1f}M parameters, rank {shape.galore_rank} "
          f"(APOLLO-Mini: 1), refresh every {gap} steps, {torch.get_num_threads()} thread(s), CPU time\n")
    print("| optimizer | state B/param (model) | state B/param (projected matrices) | state vs AdamW | "
          "steady step ms | refresh step ms | amortised step ms | amortised vs AdamW |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, state, state_proj, n_proj, steady, first, amortised in rows:
        proj_col = f"{state_proj / n_proj:.3f}" if n_proj else "(none: 8.000)"
        print(f"| {label} | {state / n_params:.3f} | {proj_col} | {state / base_state:.3f} | {steady * 1e3:,.0f} | "
              f"{first * 1e3:,.0f} | {amortised * 1e3:,.0f} | {amortised / base_time:.2f} |")
    sys.stdout.flush()


# ---------------------------------------------------------------------- part B: quality
def small_llama(hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 64), max_position_embeddings=512,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def batches(data: torch.Tensor, n: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - seq - 1, (n, batch), generator=g)
    return [torch.stack([data[s: s + seq] for s in row.tolist()]) for row in starts]


def train_eval(name, kwargs, lr, args, train, evals) -> float:
    model = small_llama(args.hidden, args.layers, seed=0)
    opt = registry.build_optimizer(name, model, lr=lr, **kwargs)
    warm = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / (args.steps - warm))))
    model.train()
    for b in train:
        loss = model(input_ids=b, labels=b).loss
        if not torch.isfinite(loss):
            return float("nan")
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        return sum(model(input_ids=b, labels=b).loss.item() for b in evals) / len(evals)


def part_b(args) -> None:
    text = torch.frombuffer(bytearray(DATA.read_bytes()), dtype=torch.uint8).long()
    cut = int(len(text) * 0.9)
    train = batches(text[:cut], args.steps, args.batch, args.seq, seed=1)
    evals = batches(text[cut:], args.eval_batches, args.batch, args.seq, seed=2)
    rank = args.hidden // 4
    n_params = sum(p.numel() for p in small_llama(args.hidden, args.layers, 0).parameters())
    rows = []
    for label, name, kwargs, lrs in available(family(rank)):
        kw = dict(kwargs) if name == "adamw" else dict(kwargs, update_proj_gap=args.train_gap)
        t0 = time.perf_counter()
        losses = [train_eval(name, kw, lr, args, train, evals) for lr in lrs]
        finite = [(loss, lr) for loss, lr in zip(losses, lrs) if math.isfinite(loss)]
        best, best_lr = min(finite) if finite else (float("nan"), float("nan"))
        rows.append((label, best, best_lr, losses, lrs))
        print(f"  trained {label}: {[f'{x:.3f}' for x in losses]} in {time.perf_counter() - t0:.0f}s",
              file=sys.stderr, flush=True)
    print(f"\n### B. Eval loss after {args.steps} steps: Llama {args.layers}x{args.hidden} ({n_params / 1e6:.2f}M "
          f"parameters, byte vocabulary), batch {args.batch}x{args.seq}, rank {rank} (APOLLO-Mini: 1), "
          f"projector refresh every {args.train_gap} steps, warmup + cosine to 0.1, best of the lr grid\n")
    print("| optimizer | best eval loss | best lr | eval loss per lr |")
    print("|---|---:|---:|---|")
    for label, best, best_lr, losses, lrs in rows:
        grid = ", ".join(f"{lr:g}: {x:.3f}" for lr, x in zip(lrs, losses))
        print(f"| {label} | {best:.3f} | {best_lr:g} | {grid} |")
    sys.stdout.flush()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timing-steps", type=int, default=4, help="part A steps per optimizer (first = refresh)")
    ap.add_argument("--gap", type=int, default=200, help="part A: refresh interval used for amortising")
    ap.add_argument("--steps", type=int, default=100, help="part B training steps")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--train-gap", type=int, default=25, help="part B: projector refresh interval")
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); fp32")
    if not args.skip_timing:
        part_a(args.timing_steps, args.gap)
    if not args.skip_quality:
        part_b(args)


if __name__ == "__main__":
    main()
