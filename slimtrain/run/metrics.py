"""What the user sees: metrics as JSONL and TensorBoard events, a summary, a PNG of the loss curves.

Only rank 0 writes. TensorBoard (``torch.utils.tensorboard``) and matplotlib are imported when
first used, so a run without them installed still trains and writes ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import warnings

import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: max allocated on CUDA, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def json_safe(obj):
    """``obj`` with every non-finite float replaced by None (JSON ``null``): ``json.dumps`` would
    otherwise write the bare ``NaN`` / ``Infinity`` that strict JSON readers reject."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dump_json(obj, fh, **kw) -> None:
    """``json.dump`` of :func:`json_safe` ``(obj)``, strict (never writes NaN)."""
    json.dump(json_safe(obj), fh, allow_nan=False, **kw)


def read_metrics(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


class MetricsWriter:
    """``metrics.jsonl`` (one JSON object per line) plus TensorBoard scalars under ``tensorboard/``."""

    def __init__(self, output_dir: str, resume_step: int | None):
        self.dir = output_dir
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if resume_step is None:
            if os.path.exists(self.path):
                os.remove(self.path)
        else:
            # Lines written after the checkpoint we resume from belong to the lost future; drop
            # them (atomically) so the file reads as one uninterrupted run.
            kept = [m for m in read_metrics(self.path) if m["step"] <= resume_step]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as fh:
                fh.writelines(json.dumps(json_safe(m), allow_nan=False) + "\n" for m in kept)
            os.replace(tmp, self.path)
        self._fh = open(self.path, "a")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=resume_step)
        except ImportError:
            warnings.warn("tensorboard is not installed: metrics go to metrics.jsonl only (pip install tensorboard)")

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


# (metrics key, legend label, matplotlib style)
Curve = tuple[str, str, str]
TRAINER_CURVES: tuple[Curve, ...] = (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-"))


def plot_curves(metrics: list[dict], path: str, *, x: str = "step", curves: tuple[Curve, ...] = TRAINER_CURVES,
                twin: Curve | None = None) -> str | None:
    """PNG of ``curves`` (cross-entropy) against ``x``, with ``twin`` (e.g. epsilon) on a second
    axis; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no loss.png (pip install matplotlib)")
        return None

    def series(key):
        return [(m[x], m[key]) for m in metrics if isinstance(m.get(key), (int, float)) and x in m]

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, style in curves:
        points = series(key)
        if points:
            ax.plot(*zip(*points), style, lw=1, label=label)
    ax.set_xlabel(x)
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    if twin is not None and series(twin[0]):
        ax2 = ax.twinx()
        ax2.plot(*zip(*series(twin[0])), twin[2], lw=1, label=twin[1])
        ax2.set_ylabel(twin[1])
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_summary(summary: dict) -> str:
    lines = ["slimtrain summary"]
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        lines.append(f"  {key:<22} {value}")
    return "\n".join(lines)
