"""``slimtrain eval`` and ``slimtrain export``: a model from a checkpoint or a Hugging Face directory,
scored on a task or written out, without training.

A checkpoint directory (``<output_dir>/checkpoints/step_N``) carries its resolved config in
``trainer.pt``; the model is rebuilt from it (``model.name`` / ``model.gguf_file``) and its
``model.pt`` tensors are loaded (an FSDP2 checkpoint's ``dcp/`` shards joined, a DeepSpeed ZeRO
one's partitions consolidated), INT8 Q-GaLore weights dequantized. Command-line overrides apply
on top of that config (e.g. ``data.eval_files=...`` to score another split).
"""

from __future__ import annotations

import contextlib
import os

import torch

from . import checkpoint as ckpt
from .config import Config, ConfigError, apply_override, from_dict, to_dict
from .data import build_tokenizer
from .export import export_model, plain_state_dict
from .model import build_model
from .sharded_checkpoint import has_sharded_state, load_full_model
from .tasks import build_task


def config_of_checkpoint(path: str, overrides: list[str] = ()) -> Config:
    if not os.path.isfile(os.path.join(path, "trainer.pt")):
        raise ConfigError(f"{path!r} is not a slimtrain checkpoint directory (no trainer.pt); give "
                          "<output_dir>/checkpoints/step_N")
    if os.path.isfile(os.path.join(path, ckpt.MANIFEST)):  # older checkpoints have none
        problem = ckpt.verify_checkpoint(path)
        if problem:
            raise ConfigError(f"checkpoint {path!r} fails verification: {problem}; use an earlier "
                              "checkpoint of the run")
    data = ckpt.load_file(path, "trainer.pt")["config"]
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(data)


def _checkpoint_weights(checkpoint: str, model) -> dict:
    """The model tensors of a slimtrain checkpoint; an FSDP2 one (``dcp/`` shards) is joined by
    ``torch.distributed.checkpoint`` into ``model``'s layout, a DeepSpeed ZeRO one (its
    ``deepspeed/`` partitions) by DeepSpeed's own ``zero_to_fp32``."""
    if has_sharded_state(checkpoint):
        return load_full_model(checkpoint, model.state_dict())
    if not os.path.isdir(os.path.join(checkpoint, "deepspeed")):
        return ckpt.load_file(checkpoint, "model.pt")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(os.path.join(checkpoint, "deepspeed"), tag="state")


def load_model(cfg: Config, checkpoint: str | None = None):
    """(model, tokenizer): ``cfg``'s model, with a checkpoint's weights when one is given."""
    tokenizer = build_tokenizer(cfg.data, cfg.model)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, tokenizer.vocab_size, cfg.data.seq_len, tokenizer.bos_token_id,
                        tokenizer.eos_token_id)
    if checkpoint:
        state = plain_state_dict(state=_checkpoint_weights(checkpoint, model))
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()})
    model.eval()
    return model, tokenizer


def score(cfg: Config, checkpoint: str | None = None, batch_size: int | None = None) -> dict:
    """The task's held-out metrics for a checkpoint or ``cfg.model`` as it is (zero-shot)."""
    model, tokenizer = load_model(cfg, checkpoint)
    task = build_task(cfg.data, tokenizer, eval_only=True)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.train.bf16
                else contextlib.nullcontext)
    metrics = task.evaluate(model, batch_size or cfg.train.batch_size, device, autocast=autocast)
    return {"examples": task.n_eval, **metrics}


def export_checkpoint(checkpoint: str, out: str, overrides: list[str] = ()) -> str:
    cfg = config_of_checkpoint(checkpoint, overrides)
    model, tokenizer = load_model(cfg, checkpoint)
    return export_model(model, out, tokenizer, dtype=cfg.export.dtype)


__all__ = ["score", "export_checkpoint", "load_model", "config_of_checkpoint", "to_dict"]
