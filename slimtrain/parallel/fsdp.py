"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for slimtrain's models, the torchtitan way.

Each decoder layer is its own FSDP unit (its parameters are all-gathered just before its forward
and freed after it, reduce-scattered after its backward) and the root module holds the rest
(embeddings, final norm, head). Parameters become ``DTensor``s sharded on dim 0, so weights,
gradients and any optimizer state created from them take ~1/N per rank. ``bf16``:
``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`` (compute in bf16, gradients
reduced and kept in fp32 against the fp32 sharded master weights); ``cpu_offload``:
``CPUOffloadPolicy`` (sharded parameters, gradients and optimizer state live in host memory).
"""

from __future__ import annotations

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a decoder (the longest ``nn.ModuleList`` whose entries share a class),
    e.g. ``model.model.layers`` of a Hugging Face Llama."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            kinds = {type(m) for m in module}
            if len(kinds) == 1:
                best = list(module)
    if not best:
        raise ValueError(f"{type(model).__name__} has no list of repeated layers to shard with FSDP2 "
                         "(expected an nn.ModuleList of decoder layers, like model.model.layers)")
    return best


def shard_model(model: nn.Module, *, bf16: bool = False, cpu_offload: bool = False) -> nn.Module:
    """``fully_shard`` every decoder layer, then the root; returns ``model`` (sharded in place)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        # the last layer's parameters are needed again at once by backward: keep them gathered
        fully_shard(layer, reshard_after_forward=i < len(layers) - 1, **kwargs)
    fully_shard(model, **kwargs)
    return model


__all__ = ["decoder_layers", "shard_model"]
