"""The beginning and end every run shares (``slimtrain train`` and ``slimtrain federated``).

Start: the resolved config is written next to the outputs. End: the summary gets the loss plot
(from ``metrics.jsonl``), is written to ``summary.json`` and printed. Both kinds of run call these,
so their run directories read the same.
"""

from __future__ import annotations

import os
from typing import Callable

import yaml

from .config import to_dict
from .metrics import Curve, TRAINER_CURVES, dump_json, format_summary, plot_curves, read_metrics


def write_run_config(output_dir: str, cfg) -> None:
    """``config.yaml``: the resolved config of this run (every default spelled out)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "config.yaml"), "w") as fh:
        yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)


def finish_run(output_dir: str, summary: dict, say: Callable[[str], None], *, x: str = "step",
               curves: tuple[Curve, ...] = TRAINER_CURVES, twin: Curve | None = None) -> dict:
    """Add the loss plot to ``summary``, write ``summary.json``, print it; returns ``summary``."""
    metrics = read_metrics(os.path.join(output_dir, "metrics.jsonl"))
    summary["loss_plot"] = plot_curves(metrics, os.path.join(output_dir, "loss.png"), x=x, curves=curves, twin=twin)
    with open(os.path.join(output_dir, "summary.json"), "w") as fh:
        dump_json(summary, fh, indent=2)  # strict JSON: a non-finite value is null
    say(format_summary(summary))
    return summary


__all__ = ["finish_run", "write_run_config"]
