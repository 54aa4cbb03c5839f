"""slimtrain.trainer: the typed config, data, models, checkpoints and the training loop."""

from .config import Config, ConfigError, describe, load_config
from .data import DataError
from .trainer import Trainer, TrainingStopped

__all__ = ["Config", "ConfigError", "DataError", "Trainer", "TrainingStopped", "describe", "load_config"]
