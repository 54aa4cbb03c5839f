"""Pre-train a small Llama with GaLoreAdamW on real English text, offline, on CPU.

The text is the ~465 KB of English documentation that Python itself ships
(``pydoc_data.topics``), read as bytes (a byte-level model needs no tokenizer download).
The model is built from a ``transformers.LlamaConfig``; GaLore projects every linear layer of
the decoder, embeddings and head train with plain AdamW (as in the GaLore paper).

    python examples/galore_pretrain.py --steps 200
    python examples/galore_pretrain.py --layerwise --accumulation 4   # update-in-backward mode
"""

from __future__ import annotations

import argparse
import time

import torch
from pydoc_data.topics import topics
from transformers import LlamaConfig, LlamaForCausalLM

from slimtrain.optim import GaLoreAdamW, galore_param_groups


def corpus_bytes() -> torch.Tensor:
    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--layerwise", action="store_true", help="update each matrix in its backward hook")
    ap.add_argument("--accumulation", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    data = corpus_bytes()
    split = int(0.95 * len(data))
    train, held_out = data[:split], data[split:]
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.seq)
    model = LlamaForCausalLM(cfg)
    groups = galore_param_groups(model, rank=args.rank, update_proj_gap=50, scale=0.25)
    opt = GaLoreAdamW(groups, lr=args.lr, weight_decay=0.0, layerwise=args.layerwise,
                      accumulation_steps=args.accumulation)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    gen = torch.Generator().manual_seed(args.seed)

    def batch(source):
        idx = torch.randint(0, len(source) - args.seq - 1, (args.batch,), generator=gen)
        return torch.stack([source[i : i + args.seq] for i in idx])  # (B, T)

    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {len(data) / 1e3:.0f} KB of text")
    t0 = time.time()
    for step in range(1, args.steps + 1):
        total = 0.0
        for _ in range(args.accumulation):
            x = batch(train)
            loss = model(input_ids=x, labels=x).loss / args.accumulation
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        sched.step()
        if step % 20 == 0 or step == 1:
            with torch.no_grad():
                x = batch(held_out)
                eval_loss = model(input_ids=x, labels=x).loss.item()
            print(f"step {step:4d}  train loss {total:.3f}  eval loss {eval_loss:.3f}  {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
