"""Peak memory of one QGaLoreAdamW8bit update of an INT8 matrix: whole matrix vs row pieces.

The matrix is Llama-7B's MLP shape (11008 x 4096, INT8 group 256), rank 256, randomized
projector. Step 1 computes the projector; the peak RSS of step 2's update above its start is
read from VmHWM after resetting it (``/proc/self/clear_refs``, Linux). Each setting runs in a
fresh process so neither sees the other's freed memory.

    python bench/int8_update.py
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHAPE = (11008, 4096)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(chunk: int | None) -> None:
    import torch

    from slimtrain.optim import QGaLoreAdamW8bit, qgalore_param_groups, quantize_weights

    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False))
    quantize_weights(model, group_size=256)
    groups = qgalore_param_groups(model, rank=256, update_proj_gap=200, scale=0.25, proj_method="randomized")
    opt = QGaLoreAdamW8bit(groups, lr=1e-4, int8_update_chunk=chunk)
    weight, grad = model[0].weight, torch.randn(*SHAPE, generator=torch.Generator().manual_seed(0))
    for step in range(2):
        weight.float_grad = grad.clone()  # what QuantLinear's backward leaves
        if step == 1:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak: measure step 2 only (projector already computed)
            start = _status("VmRSS")
        opt.step()
        opt.zero_grad()
    extra = (_status("VmHWM") - start) / 2**20
    label = "whole matrix" if chunk is None else f"pieces of {chunk} elements"
    print(f"| {label} | {extra:.0f} |", flush=True)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(None if sys.argv[2] == "0" else int(sys.argv[2]))
        return
    print(f"INT8 {SHAPE[0]} x {SHAPE[1]} update, step 2 (fp32 gradient of {SHAPE[0] * SHAPE[1] * 4 / 2**20:.0f} MiB "
          "alive before it)\n\n| update | peak RSS above the step's start (MiB) |\n|---|---:|", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    for chunk in ("0", str(1 << 20)):
        subprocess.run([sys.executable, os.path.abspath(__file__), "--child", chunk], env=env, check=True)


if __name__ == "__main__":
    main()
