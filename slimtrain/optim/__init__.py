"""slimtrain optimizers: drop-in ``torch.optim`` classes with their functional steps."""

from .galore_adamw import GaLoreAdamW, galore_adamw
from .galore_adafactor import GaLoreAdafactor, galore_adafactor
from .param_groups import galore_param_groups
from . import projector

__all__ = [
    "GaLoreAdamW",
    "galore_adamw",
    "GaLoreAdafactor",
    "galore_adafactor",
    "galore_param_groups",
    "projector",
]
