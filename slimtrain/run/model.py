"""Models by name: the GaLore paper's Llama shapes as presets, or a local Hugging Face model."""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from .config import ConfigError, ModelConfig


def _llama(hidden: int, intermediate: int, heads: int, layers: int, max_pos: int = 1024) -> Callable[[], dict]:
    def preset() -> dict:
        return dict(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                    num_key_value_heads=heads, num_hidden_layers=layers, max_position_embeddings=max_pos)

    preset.__doc__ = f"Llama: hidden {hidden}, MLP {intermediate}, {heads} heads, {layers} layers"
    return preset


# The shapes of the GaLore repository's configs/llama_*.json (Zhao et al., 2024). The vocabulary
# is not part of a preset: it comes from the tokenizer (32000 with the paper's T5 tokenizer,
# 257 with the built-in byte tokenizer), so "llama-20m" is ~20M parameters only with a 32k vocab.
MODEL_PRESETS: dict[str, Callable[[], dict]] = {
    "llama-20m": _llama(256, 688, 4, 4),
    "llama-60m": _llama(512, 1376, 8, 8),
    "llama-130m": _llama(768, 2048, 12, 12),
    "llama-350m": _llama(1024, 2736, 16, 24),
    "llama-1b": _llama(2048, 5461, 32, 24),
    "llama-7b": _llama(4096, 11008, 32, 32),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _has_weights(path: str) -> bool:
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, n)) for n in names)


def _hf_config(cfg: ModelConfig, vocab_size: int, seq_len: int, bos_id: int | None, eos_id: int):
    """The transformers config of ``cfg`` and the directory its weights are in (None: none)."""
    from transformers import AutoConfig, LlamaConfig

    if cfg.name in MODEL_PRESETS:
        shape = MODEL_PRESETS[cfg.name]()
        shape["max_position_embeddings"] = cfg.max_position_embeddings or max(shape["max_position_embeddings"], seq_len)
        return LlamaConfig(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=None,
                           tie_word_embeddings=False, **shape), None
    if os.path.exists(cfg.name):
        path = cfg.name
        if cfg.gguf_file:
            if not os.path.isfile(os.path.join(path, cfg.gguf_file)):
                raise ConfigError(f"model.gguf_file={cfg.gguf_file!r} is not a file in model.name={path!r}")
            return AutoConfig.from_pretrained(path, gguf_file=cfg.gguf_file), path
        hf = AutoConfig.from_pretrained(path)
        if cfg.max_position_embeddings and hasattr(hf, "max_position_embeddings"):
            hf.max_position_embeddings = cfg.max_position_embeddings
        return hf, (path if _has_weights(path) else None)
    raise ConfigError(
        f"model.name={cfg.name!r} is neither a preset ({sorted(MODEL_PRESETS)}) nor an existing local "
        "Hugging Face model directory / config.json"
    )


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int, bos_id: int | None, eos_id: int,
                seed: int = 0, progress: bool = False) -> nn.Module:
    """The model named by ``cfg`` with an embedding for ``vocab_size`` tokens, in ``cfg.dtype``.

    Initialisation (presets and weightless configs) is per tensor, seeded from ``(seed, name)``
    (:mod:`slimtrain.run.materialize`), so ``init_device=cpu`` and ``init_device=meta`` give the
    same weights. With ``init_device=meta`` no fp32 model ever exists: each tensor is made in
    its final format (and checkpoints are read one tensor at a time).
    """
    from transformers import AutoModelForCausalLM

    from . import materialize as mat

    dtype = DTYPES[cfg.dtype]
    hf, weights = _hf_config(cfg, vocab_size, seq_len, bos_id, eos_id)
    std = getattr(hf, "initializer_range", 0.02)
    group = cfg.int8_group_size if cfg.int8_weights else None
    if cfg.init_device == "meta" and cfg.gguf_file:
        raise ConfigError(f"model.init_device=meta with model.gguf_file={cfg.gguf_file!r}: the meta build reads "
                          "safetensors one tensor at a time, a GGUF file is dequantized whole by transformers; use "
                          "model.init_device=cpu, or export the model (slimtrain export) and build from that directory")
    if cfg.init_device == "meta":
        mat.unmap_large_allocations()  # freed transients must leave the resident set (see there)
        with mat.parameters_on_meta():
            model = AutoModelForCausalLM.from_config(hf)
        values = mat.SafetensorsCheckpoint(weights) if weights else mat.SeededInit(seed, std)
        mat.materialize_(model, values, dtype, int8_group_size=group, progress=progress)
        if getattr(hf, "tie_word_embeddings", False):
            model.tie_weights()
    else:
        if cfg.gguf_file:  # transformers dequantizes the GGUF tensors (needs the `gguf` package)
            model = AutoModelForCausalLM.from_pretrained(weights, gguf_file=cfg.gguf_file, dtype=torch.float32)
        elif weights:
            model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32)
        else:
            model = mat.seeded_init_(AutoModelForCausalLM.from_config(hf), seed, std)
        # Parameters only: buffers (rotary frequencies) stay fp32, as the meta build leaves them.
        for param in model.parameters():
            param.data = param.data.to(dtype)
        if group is not None:
            from ..optim.qgalore import quantize_weights

            quantize_weights(model, group_size=group, exclude=mat.INT8_EXCLUDE)
    emb = model.get_input_embeddings().weight.shape[0]
    if emb < vocab_size:
        raise ConfigError(
            f"model.name={cfg.name!r} embeds {emb} tokens but the tokenizer (data.tokenizer) has {vocab_size}; "
            "use the model's own tokenizer directory or a config with a larger vocab_size"
        )
    if cfg.activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"model.activation_checkpointing=True: {type(model).__name__} does not support it")
        # Non-reentrant checkpointing works with inputs that do not require grad and with
        # parameters whose requires_grad changes between steps (LISA).
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
