"""slimtrain optimizers: drop-in ``torch.optim`` classes with their functional steps."""

from .galore_adamw import GaLoreAdamW, galore_adamw
from .galore_adafactor import GaLoreAdafactor, galore_adafactor
from .param_groups import galore_param_groups
from .lisa import LISA, find_layer_list
from .mezo import MeZO, SparseMeZO, magnitude_thresholds, noise_like, perturb_, spsa_grad, zo_update_
from .adamw8bit import AdamW8bit, adamw8bit
from .galore_adamw8bit import GaLoreAdamW8bit, galore_adamw8bit
from .qgalore import QGaLoreAdamW8bit, QuantLinear, qgalore_param_groups, quantize_weights
from .apollo import APOLLOAdamW, APOLLOMini, apollo_adamw, apollo_param_groups
from .apollo_adamw8bit import APOLLOAdamW8bit, APOLLOMini8bit, apollo_adamw8bit
from .fira import FiraAdamW, fira_adamw
from .welore import LowRankLinear, welore_compress, welore_merge, welore_param_groups
from . import projector

__all__ = [
    "GaLoreAdamW",
    "galore_adamw",
    "GaLoreAdafactor",
    "galore_adafactor",
    "galore_param_groups",
    "projector",
    "LISA",
    "find_layer_list",
    "MeZO",
    "SparseMeZO",
    "perturb_",
    "spsa_grad",
    "zo_update_",
    "noise_like",
    "magnitude_thresholds",
    "AdamW8bit",
    "adamw8bit",
    "GaLoreAdamW8bit",
    "galore_adamw8bit",
    "QGaLoreAdamW8bit",
    "QuantLinear",
    "qgalore_param_groups",
    "quantize_weights",
    "APOLLOAdamW",
    "APOLLOMini",
    "apollo_adamw",
    "apollo_param_groups",
    "APOLLOAdamW8bit",
    "APOLLOMini8bit",
    "apollo_adamw8bit",
    "FiraAdamW",
    "fira_adamw",
    "LowRankLinear",
    "welore_compress",
    "welore_merge",
    "welore_param_groups",
]
