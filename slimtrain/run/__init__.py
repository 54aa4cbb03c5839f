"""slimtrain.run: the pieces every kind of run shares — config loading, data, model building,
checkpoint I/O and metrics.

``slimtrain.trainer`` (one model trained by backprop or zeroth-order steps) and
``slimtrain.federated`` (many simulated clients) are siblings that both build on this package;
neither imports the other's internals. Layering: ``kernels <- optim <- parallel <- run <-
trainer <- federated <- launch``.
"""

from .config import ConfigError, describe, load_config
from .data import DataError

__all__ = ["ConfigError", "DataError", "describe", "load_config"]
