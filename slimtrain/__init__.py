"""slimtrain: memory-efficient full-parameter training.

Optimizers live in :mod:`slimtrain.optim`, kernels in :mod:`slimtrain.kernels`, distributed
plumbing in :mod:`slimtrain.parallel`, the training loop in :mod:`slimtrain.trainer`.
"""

__version__ = "0.1.0"
