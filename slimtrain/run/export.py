"""A trained model (or a checkpoint) as a Hugging Face directory that ``AutoModelForCausalLM`` loads.

``save_pretrained`` writes safetensors, ``config.json`` and ``generation_config.json``; the run's
tokenizer is saved beside them when it is a Hugging Face one. Whatever optimizer trained the
model, the directory holds plain floating-point weights:

- Q-GaLore's INT8 ``QuantLinear`` weights are dequantized (codes x group scale, the values its
  forward pass computes with) into the ``nn.Linear`` weights of the original architecture;
- tied embeddings stay tied (one tensor in the file; ``tie_word_embeddings`` in the config);
- a plain module's ``state_dict`` is complete under slimtrain's own optimizer-state sharding
  (``dist.zero_stage`` 1/2 shard optimizer state only). DeepSpeed ZeRO-3 partitions the
  parameters themselves: the trainer exports inside ``Engine.full_weights()`` (gathered), and a
  DeepSpeed checkpoint is consolidated by ``slimtrain.run.scoring`` with DeepSpeed's zero_to_fp32.
"""

from __future__ import annotations

import copy
import os

from torch import nn

from .. import kernels
from ..optim.qgalore import QuantLinear
from ..optim.welore import LowRankLinear, welore_merge
from .model import DTYPES


def _group_size(numel: int, n_scales: int) -> int:
    """The power-of-two group size whose ceil(numel / size) groups give ``n_scales`` scales."""
    size = 2
    while (numel + size - 1) // size > n_scales:
        size *= 2
    if (numel + size - 1) // size != n_scales:
        raise ValueError(f"{n_scales} scales do not fit {numel} INT8 weights with any power-of-two group size")
    return size


def plain_state_dict(model: nn.Module | None = None, state: dict | None = None) -> dict:
    """``model``'s (or a checkpoint's) tensors with INT8 QuantLinear weights dequantized to fp32."""
    if model is not None:
        state = dict(model.state_dict())
        for name, module in model.named_modules():
            if isinstance(module, QuantLinear):
                state[f"{name}.weight"] = module.dequantized_weight().float()
                state.pop(f"{name}.weight_scales", None)
        return state
    state = dict(state)
    for key in [k for k in state if k.endswith(".weight_scales")]:
        prefix = key[: -len("weight_scales")]
        codes, scales = state[prefix + "weight"], state.pop(key)
        size = _group_size(codes.numel(), scales.numel())
        state[prefix + "weight"] = kernels.dequantize_int8(codes, scales, size).float()
    return state


def export_model(model: nn.Module, out: str, tokenizer=None, dtype: str = "float32", rank: int = 0,
                 state: dict | None = None) -> str:
    """Write ``model`` (its architecture and config; weights from ``state`` when given, e.g. a
    checkpoint's ``model.pt``) to ``out`` as a Hugging Face directory. Only rank 0 writes."""
    from transformers import AutoModelForCausalLM

    if rank != 0:
        return out
    if state is None and any(isinstance(m, LowRankLinear) for m in model.modules()):
        # WeLore factors are written back as the dense weights A @ B (the model itself keeps them)
        model = welore_merge(copy.deepcopy(model))
    tensors = plain_state_dict(state=state) if state is not None else plain_state_dict(model)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # loaded from GGUF: the weights are plain tensors by now
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])  # the original architecture
    missing, unexpected = fresh.load_state_dict(tensors, strict=False)  # copies, casting to the export dtype
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()  # lm_head shares embed_tokens' tensor again: one tensor in the file
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"export to {out!r}: the model's tensors do not match its architecture "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    fresh.config.use_cache = True
    os.makedirs(out, exist_ok=True)
    fresh.save_pretrained(out)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    return out


__all__ = ["export_model", "plain_state_dict"]
