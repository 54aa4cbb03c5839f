"""slimtrain.trainer: the training loop (one model, backprop or zeroth-order steps, any engine)."""

from ..run.config import Config, ConfigError, describe, load_config
from ..run.data import DataError
from .trainer import Trainer, TrainingStopped

__all__ = ["Config", "ConfigError", "DataError", "Trainer", "TrainingStopped", "describe", "load_config"]
