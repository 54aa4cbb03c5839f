"""slimtrain: memory-efficient full-parameter training.

Optimizers live in :mod:`slimtrain.optim`, kernels in :mod:`slimtrain.kernels`, distributed
plumbing in :mod:`slimtrain.parallel`, the pieces every run shares (config, data, model,
checkpoints, metrics) in :mod:`slimtrain.run`, the training loop in :mod:`slimtrain.trainer` and
the federated simulation in :mod:`slimtrain.federated`.
"""

__version__ = "0.1.0"
