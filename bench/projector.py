"""Subspace refresh: exact SVD vs the randomized range finder, on real gradients.

Trains a Llama of the GaLore paper's 60M (or 130M) shape on tiny-shakespeare for a few AdamW
steps (so gradients are no longer those of a random init), takes the gradients of one decoder
layer's matrices, and for each matrix times the exact SVD and the randomized range finder
(with 0/1/2 power iterations) and reports the fraction of the gradient's energy
(||P G||^2 / ||G||^2) each projector captures, against the exact SVD's (the optimum).

    python bench/projector.py --shape 60m
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from llama_shapes import SHAPES  # noqa: E402

from slimtrain.optim import projector as proj  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def real_gradients(shape_name: str, warm_steps: int, batch: int, seq: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPES[shape_name]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
                      max_position_embeddings=seq)
    model = LlamaForCausalLM(cfg)
    data = torch.frombuffer(bytearray(DATA.read_bytes()), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(warm_steps + 1):
        idx = torch.randint(0, len(data) - seq, (batch,), generator=g)
        x = torch.stack([data[i : i + seq] for i in idx])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if step < warm_steps:
            opt.step()
            opt.zero_grad()
    print(f"Llama-{shape_name} (byte vocab) after {warm_steps} AdamW steps on tiny-shakespeare: loss {loss.item():.3f}")
    layer = model.model.layers[s.layers // 2]
    return {name: getattr(mod, name.split(".")[-1]).weight.grad.clone()
            for name, mod in (("self_attn.q_proj", layer.self_attn), ("self_attn.o_proj", layer.self_attn),
                              ("mlp.gate_proj", layer.mlp), ("mlp.down_proj", layer.mlp))}, s.galore_rank


def timed(fn, repeat=5):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="60m", choices=["60m", "130m"])
    ap.add_argument("--warm-steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--ranks", type=int, nargs="+", default=None,
                    help="default: the paper's rank for the shape and a quarter of it")
    args = ap.parse_args(argv)
    grads, paper_rank = real_gradients(args.shape, args.warm_steps, args.batch, args.seq)
    for rank in args.ranks or [paper_rank, paper_rank // 4]:
        table(grads, rank)


def table(grads, rank):
    # Gradients of LLM matrices are close to low-rank, so captured energy is ~1 for both methods;
    # the informative number is the energy each projector *loses*, 1 - ||P G||^2 / ||G||^2.
    print(f"\nrank {rank}; time = best of 5; lost = 1 - ||P G||^2 / ||G||^2 (exact SVD is the optimum)\n")
    print("| matrix | shape | method | time ms | time vs SVD | energy lost | lost vs SVD |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, grad in grads.items():
        side = proj.projection_side(tuple(grad.shape), "std")
        r = proj.effective_rank(rank, tuple(grad.shape), side)
        exact, t_svd = timed(lambda: proj.compute_projector(grad, r, side, method="svd"))
        lost_svd = 1.0 - proj.captured_energy(grad, *exact)
        print(f"| {name} | {tuple(grad.shape)} | exact SVD | {t_svd * 1e3:.1f} | 1.00 | {lost_svd:.2e} | 1.00 |")
        for iters in (0, 1, 2):
            gen = torch.Generator().manual_seed(0)
            approx, t = timed(lambda: proj.compute_projector(grad, r, side, method="randomized",
                                                            power_iters=iters, generator=gen.manual_seed(0)))
            lost = 1.0 - proj.captured_energy(grad, *approx)
            print(f"| {name} | {tuple(grad.shape)} | randomized, {iters} power it. | {t * 1e3:.1f} | "
                  f"{t / t_svd:.2f} | {lost:.2e} | {lost / max(lost_svd, 1e-12):.2f} |")


if __name__ == "__main__":
    main()
