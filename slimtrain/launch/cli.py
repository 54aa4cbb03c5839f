"""The ``slimtrain`` command. Subcommands are an explicit dict from name to (help, add_arguments, run).

The same command line works under every launcher:

    slimtrain train train.steps=100                          # or: python -m slimtrain train ...
    torchrun --nproc_per_node 2 -m slimtrain train ...
    deepspeed --num_gpus 2 --module slimtrain train ...      # passes --local_rank=N; accepted here

Launchers describe the process through RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* in the
environment; the trainer reads those. On a machine without CUDA the backend is gloo and
``DS_ACCELERATOR=cpu`` is set before DeepSpeed is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable


def _add_run_args(p: argparse.ArgumentParser, example: str, config_help: str, resume_note: str = "") -> None:
    """What every run command takes: overrides, a config file, --resume, --help-config."""
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {example}")
    p.add_argument("--config", "-c", help=config_help)
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from CHECKPOINT, or without a value from the newest one in <output_dir>/checkpoints"
                        + resume_note)
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh run in an output directory that holds another run's checkpoints, deleting them")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")


def _start(args: argparse.Namespace, describe: Callable[[], list[str]]) -> bool:
    """Handle --help-config (returns False: nothing to run) and an override swallowed by --resume."""
    if args.help_config:
        print("config keys (set in a YAML file or as key=value):")
        print("\n".join(describe()))
        return False
    if isinstance(args.resume, str) and "=" in args.resume and not os.path.isdir(args.resume):
        # `--resume train.steps=9`: argparse took the override for the optional checkpoint path.
        args.overrides.append(args.resume)
        args.resume = True
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return True


def _add_train_args(p: argparse.ArgumentParser) -> None:
    _add_run_args(p, "optim=galore_adamw optim.args.rank=64 train.steps=200 zero_stage=2",
                  "YAML config file (docs/configs/ has one per optimizer)")
    # `deepspeed` passes --local_rank=N (older launchers --local-rank); LOCAL_RANK in the environment
    # says the same, so the value only fills the environment when a launcher left it out.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--allow-lr-change", action="store_true",
                   help="with --resume: apply a changed optim.lr / train.warmup_steps / train.min_lr_ratio "
                        "(same as train.allow_lr_change=true)")


def _run_train(args: argparse.Namespace) -> int:
    from ..run.config import ConfigError, describe, load_config

    if not _start(args, describe):
        return 0
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if args.allow_lr_change:
        args.overrides.append("train.allow_lr_change=true")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"slimtrain train: config error: {e}", file=sys.stderr)
        return 2

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from ..run.checkpoint import CheckpointError
    from ..run.data import DataError
    from ..trainer.trainer import Trainer, TrainingStopped

    trainer = None
    try:
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
        trainer.train()
    except (ConfigError, DataError, FileNotFoundError, CheckpointError) as e:
        print(f"slimtrain train: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"slimtrain train: stopped: {e}", file=sys.stderr)
        return 3
    finally:
        if trainer is not None:
            trainer.close()
    return 0


def _add_federated_args(p: argparse.ArgumentParser) -> None:
    _add_run_args(p, "federated.clients=1000 federated.dp.noise_multiplier=1.1 optim.name=galore_adamw",
                  "YAML config file (docs/configs/federated.yaml)",
                  " (the privacy accountant's history continues: epsilon never resets)")


def _run_federated(args: argparse.Namespace) -> int:
    from ..federated.config import ConfigError, describe_federated, load_config

    if not _start(args, describe_federated):
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"slimtrain federated: config error: {e}", file=sys.stderr)
        return 2

    from ..federated.server import FederatedSimulation
    from ..run.checkpoint import CheckpointError
    from ..run.data import DataError

    try:
        FederatedSimulation(cfg, resume=args.resume, overwrite=args.overwrite).run()
    except (ConfigError, DataError, FileNotFoundError, CheckpointError) as e:
        print(f"slimtrain federated: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. model.name=DIR data.task=classification data.eval_files=[dev.tsv] "
                        "data.label_words=\"{0: ' terrible', 1: ' great'}\"")
    p.add_argument("--checkpoint", help="a checkpoint directory (<output_dir>/checkpoints/step_N): its model and "
                                        "config, overrides on top; without it, model.name as it is (zero-shot)")
    p.add_argument("--config", "-c", help="YAML config file (ignored with --checkpoint)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and meaning")


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from ..run.config import ConfigError, describe, load_config

    if args.help_config:
        print("\n".join(describe()))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ..run.data import DataError
    from ..run.scoring import config_of_checkpoint, score

    try:
        cfg = (config_of_checkpoint(args.checkpoint, args.overrides) if args.checkpoint
               else load_config(args.config, args.overrides))
        metrics = score(cfg, args.checkpoint)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"slimtrain eval: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics))
    return 0


def _add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory (<output_dir>/checkpoints/step_N)")
    p.add_argument("out", metavar="OUT", help="the Hugging Face directory to write")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. export.dtype=bfloat16")


def _run_export(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ..run.config import ConfigError
    from ..run.data import DataError
    from ..run.scoring import export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out, args.overrides)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"slimtrain export: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(f"slimtrain export: wrote {out} (AutoModelForCausalLM.from_pretrained({out!r}))")
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "train": ("train a model (config file and/or key=value overrides)", _add_train_args, _run_train),
    "federated": ("federated simulation with DP aggregation (config file and/or key=value overrides)",
                  _add_federated_args, _run_federated),
    "eval": ("score a checkpoint or a Hugging Face model on a task without training (zero-shot: model.name=DIR)",
             _add_eval_args, _run_eval),
    "export": ("write a checkpoint as a Hugging Face directory (safetensors, config, tokenizer)",
               _add_export_args, _run_export),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimtrain", description="memory-efficient full-parameter training")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line as a Namespace (``command`` is None when none was given)."""
    # `deepspeed --module slimtrain train` puts --local_rank before the subcommand; move it behind.
    lead = [a for a in argv[:1] if a.startswith("--local")]
    if lead and len(argv) > 1 and not argv[1].startswith("-") and "=" not in lead[0]:
        lead.append(argv[1])
    argv = argv[len(lead):] if lead else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv[:1] + lead + argv[1:] if lead else argv)
    # argparse ends a nargs="*" positional at the first option, so `train a=1 --config f.yaml b=2`
    # leaves `b=2` over; overrides are order-free, so take them wherever they stand
    late = [a for a in rest if "=" in a and not a.startswith("-")]
    if late and hasattr(args, "overrides"):
        args.overrides = list(args.overrides or []) + late
        rest = [a for a in rest if a not in late]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.print_help = parser.print_help
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        args.print_help()
        return 2
    return COMMANDS[args.command][2](args)
