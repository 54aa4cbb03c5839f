"""Optimizer-state memory and step time on the GaLore paper's Llama shapes.

For each shape and optimizer: build the parameters, give every trainable one a random
gradient, run steps, and count the bytes of every tensor the optimizer holds (and of the
weights, which quantized-weight optimizers shrink). Shapes that fit are measured whole; larger
ones (``--whole`` decides) are measured as embeddings/head + one decoder layer, plus one bare
decoder layer whose bytes and time are multiplied by the remaining layer count (every decoder layer has identical
shapes, so this extrapolation is exact for bytes and linear for time). AdamW and galore-torch
are measured in the same run; ratios are against AdamW.

    python bench/optim_memory.py                 # 60m, 130m whole; 350m, 1b per-layer
    python bench/optim_memory.py --shapes 60m --steps 3
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from llama_shapes import SHAPES, LlamaParams, parameter_count  # noqa: E402

from slimtrain.optim import registry  # noqa: E402

warnings.filterwarnings("ignore")


def tensor_bytes(obj) -> int:
    """Bytes of every tensor reachable from an optimizer state value (galore-torch keeps its
    projector inside a Python object, so look inside objects and lists too)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o) for o in obj.values())
    if hasattr(obj, "__dict__"):
        return sum(tensor_bytes(o) for o in vars(obj).values())
    return 0


def model_bytes(model) -> int:
    return sum(tensor_bytes(t) for t in list(model.parameters()) + list(model.buffers()))


def rows_for(rank: int) -> list[tuple[str, str, dict]]:
    galore = dict(rank=rank, update_proj_gap=200, scale=0.25)
    rows = [
        ("AdamW (torch, foreach)", "adamw", dict(lr=1e-3, foreach=True)),
        ("galore-torch GaLoreAdamW", "galore_torch_adamw", dict(lr=1e-3, **galore)),
        ("slimtrain GaLoreAdamW", "galore_adamw", dict(lr=1e-3, **galore)),
        ("slimtrain GaLoreAdamW (randomized)", "galore_adamw", dict(lr=1e-3, proj_method="randomized", **galore)),
        ("slimtrain GaLoreAdafactor", "galore_adafactor", dict(lr=1e-3, relative_step=False, beta1=0.9, **galore)),
        ("bitsandbytes AdamW8bit", "bnb_adamw8bit", dict(lr=1e-3)),
        ("slimtrain AdamW8bit", "adamw8bit", dict(lr=1e-3)),
        ("slimtrain GaLoreAdamW8bit", "galore_adamw8bit", dict(lr=1e-3, **galore)),
        ("slimtrain QGaLoreAdamW8bit", "qgalore_adamw8bit", dict(lr=1e-3, **galore)),
    ]
    known = registry.available_optimizers()
    return [r for r in rows if r[1] in known]


def measure(model, name, kwargs, steps):
    """(state bytes, weight bytes, mean step seconds excluding the first, first-step seconds)."""
    opt = registry.build_optimizer(name, model, **kwargs)
    # INT8 weights (qgalore_adamw8bit's QuantLinear) do not require grad: backward leaves their
    # fp32 gradient in `float_grad`, which is where the optimizer reads it.
    params = [p for p in model.parameters() if p.requires_grad or p.dtype == torch.int8]
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        for p in params:
            if p.dtype == torch.int8:
                p.float_grad = torch.randn(p.shape, generator=gen) * 1e-3
            else:
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-3
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    state = sum(tensor_bytes(s) for s in opt.state.values())
    weights = model_bytes(model)
    for p in params:
        p.grad = None
        if p.dtype == torch.int8:
            p.float_grad = None
    del opt
    gc.collect()
    steady = sum(times[1:]) / max(1, len(times) - 1)
    return state, weights, steady, times[0]


def bench_shape(shape, whole: bool, steps: int):
    n_params = parameter_count(shape)
    results = []
    for label, name, kwargs in rows_for(shape.galore_rank):
        if whole:
            model = LlamaParams(shape)
            state, weights, t, t0 = measure(model, name, kwargs, steps)
        else:  # embeddings/head + one layer measured, the other L-1 layers extrapolated
            first = LlamaParams(shape, layers=1)
            s_1, w_1, t_1, t0_1 = measure(first, name, kwargs, steps)
            del first
            layer = LlamaParams(shape, layers=1, with_embeddings=False)
            s_l, w_l, t_l, t0_l = measure(layer, name, kwargs, steps)
            del layer
            extra = shape.layers - 1
            state, weights, t, t0 = s_1 + extra * s_l, w_1 + extra * w_l, t_1 + extra * t_l, t0_1 + extra * t0_l
        gc.collect()
        results.append((label, state, weights, t, t0))
        print(f"  measured {shape.name} {label}", file=sys.stderr, flush=True)
    base_state, base_weights, base_t = results[0][1], results[0][2], results[0][3]
    how = "whole model" if whole else f"measured: embeddings/head + 1 layer, and 1 layer x {shape.layers - 1} more"
    print(f"\n### Llama-{shape.name}: {n_params / 1e6:.1f}M parameters, GaLore rank {shape.galore_rank} ({how})\n")
    print("| optimizer | state MiB | state B/param | weights+state B/param | state vs AdamW | steady step ms | step vs AdamW | refresh step ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, state, weights, t, t0 in results:
        print(
            f"| {label} | {state / 2**20:,.1f} | {state / n_params:.2f} | {(state + weights) / n_params:.2f} | "
            f"{state / base_state:.3f} | {t * 1e3:,.1f} | {t / base_t:.2f} | {t0 * 1e3:,.1f} |"
        )
    sys.stdout.flush()
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["60m", "130m", "350m", "1b"], choices=sorted(SHAPES))
    ap.add_argument("--whole", nargs="*", default=["60m", "130m"], help="shapes measured as a whole model")
    ap.add_argument("--steps", type=int, default=4, help="steps per optimizer (the first includes the SVD)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 weights and gradients")
    for name in args.shapes:
        bench_shape(SHAPES[name], name in args.whole, args.steps)


if __name__ == "__main__":
    main()
