"""Start-up checks of a layer-wise run (``optim.args.layerwise=true``): every tensor is updated
inside backward and its gradient freed there, so whatever needs the whole gradient (global-norm
clipping, ZeRO's flat partitions, a zeroth-order estimate) cannot be combined with it. Each
refusal names the reason and what to use instead, before anything is built. What an optimizer
can do comes from its declared spec (:func:`slimtrain.optim.registry.optimizer_spec`)."""

from __future__ import annotations

from ..optim.registry import available_optimizers, optimizer_spec
from .config import Config, ConfigError, optimizer_kwargs


def layerwise_optimizers() -> list[str]:
    """Registry names whose optimizer offers the layer-wise (update-in-backward) mode."""
    return [name for name in available_optimizers() if optimizer_spec(name).layerwise_capable]


def check_layerwise_config(cfg: Config) -> None:
    """Raise :class:`ConfigError` if ``cfg`` asks for layer-wise updates it cannot have."""
    if not cfg.optim.args.get("layerwise", False) or cfg.optim.name not in available_optimizers():
        return
    name = cfg.optim.name
    spec = optimizer_spec(name, **optimizer_kwargs(cfg.optim))
    alternatives = ", ".join(layerwise_optimizers())
    if spec.zeroth_order:
        raise ConfigError(f"optim.args.layerwise=true with optim.name={name!r}: a zeroth-order optimizer computes "
                          "no gradient (two forward passes per step), so there is no backward to update in; drop "
                          f"optim.args.layerwise (it already holds no gradient), or use one of {alternatives}")
    if not spec.layerwise:
        raise ConfigError(f"optim.args.layerwise=true with optim.name={name!r}: this optimizer has no layer-wise "
                          "(update-in-backward) path, it updates all tensors together in step(); use one of "
                          f"{alternatives} (e.g. adamw8bit for AdamW)")
    if cfg.dist.engine == "deepspeed" or cfg.dist.zero_stage > 0:
        raise ConfigError(f"optim.args.layerwise=true with dist.engine={cfg.dist.engine!r} dist.zero_stage="
                          f"{cfg.dist.zero_stage}: ZeRO shards gradients and optimizer state into flat partitions "
                          "updated after the whole backward, while layer-wise updates each whole tensor inside "
                          "backward; use dist.engine=torch dist.zero_stage=0, or drop layerwise to shard")
    if cfg.train.max_grad_norm > 0:
        raise ConfigError(f"train.max_grad_norm={cfg.train.max_grad_norm} with optim.args.layerwise=true: global-norm "
                          "clipping needs the whole gradient before any update, which a layer-wise step never "
                          "holds; set train.max_grad_norm=0 and clip per tensor with optim.args.max_grad_norm=<norm> "
                          "(docs/big_models.md)")
    accumulation = cfg.optim.args.get("accumulation_steps", 1)
    if accumulation != cfg.train.grad_accum:
        raise ConfigError(f"optim.args.accumulation_steps={accumulation} must equal train.grad_accum="
                          f"{cfg.train.grad_accum} for a layer-wise optimizer (it updates after the last micro-batch)")


__all__ = ["check_layerwise_config", "layerwise_optimizers"]
