"""slimtrain.federated: federated simulation with differentially-private aggregation.

Algorithm modules (see docs/federated_algorithms.md):

* :mod:`.partition`: IID / Dirichlet / shard splits of a dataset across clients;
* :mod:`.availability`: simulated client availability and the server's client sampling;
* :mod:`.strategies`: FedAvg, FedProx, FedAdam, FedYogi, FedAU;
* :mod:`.privacy`: DP-FedAvg (clipping, fixed-denominator noised mean, adaptive clipping) and
  the RDP privacy accountant (Opacus);
* :mod:`.compression`: low-rank, top-k with error feedback, 8-bit and ternary (ComPEFT) compression of deltas.

The simulation (see docs/federated.md): :mod:`.config` (``slimtrain federated``'s keys),
:mod:`.client` (one model instance runs every client), :mod:`.store` (per-client state on disk),
:mod:`.server` (rounds, faults, DP accounting, checkpoints); :mod:`.flower` is the optional
Flower adapter (``pip install slimtrain[flower]``), not imported here.

This package may import slimtrain.optim, slimtrain.kernels and slimtrain.run; none of
those imports it.
"""

from .availability import (
    AVAILABILITY,
    AlwaysAvailable,
    Availability,
    BernoulliAvailability,
    CyclicAvailability,
    MarkovAvailability,
    build_availability,
    heterogeneous_probs,
    sample_clients,
)
from .compression import (
    COMPRESSORS,
    Compressor,
    LowRankCompressor,
    NoCompression,
    QuantizedCompressor,
    TernaryCompressor,
    TopKCompressor,
    build_compressor,
)
from .partition import SCHEMES, partition, partition_dirichlet, partition_iid, partition_shards
from .privacy import (
    DPFedAvgAggregator,
    DPStrategy,
    PrivacyAccountant,
    clip_delta,
    global_norm,
    noise_multiplier_for,
)
from .strategies import (
    STRATEGIES,
    ClientUpdate,
    FedAdam,
    FedAU,
    FedAvg,
    FedProx,
    FedYogi,
    Strategy,
    build_strategy,
    weighted_sum,
)

from .client import ClientResult, ClientRunner  # noqa: E402  (the simulation builds on the above)
from .config import DPConfig, FederatedConfig, FedRunConfig, load_config  # noqa: E402
from .server import FederatedSimulation  # noqa: E402
from .store import ClientStore  # noqa: E402

__all__ = [
    "ClientResult",
    "ClientRunner",
    "ClientStore",
    "DPConfig",
    "FederatedConfig",
    "FedRunConfig",
    "FederatedSimulation",
    "load_config",
    "AVAILABILITY",
    "COMPRESSORS",
    "SCHEMES",
    "STRATEGIES",
    "AlwaysAvailable",
    "Availability",
    "BernoulliAvailability",
    "ClientUpdate",
    "Compressor",
    "CyclicAvailability",
    "DPFedAvgAggregator",
    "DPStrategy",
    "FedAU",
    "FedAdam",
    "FedAvg",
    "FedProx",
    "FedYogi",
    "LowRankCompressor",
    "MarkovAvailability",
    "NoCompression",
    "PrivacyAccountant",
    "QuantizedCompressor",
    "Strategy",
    "TernaryCompressor",
    "TopKCompressor",
    "build_availability",
    "build_compressor",
    "build_strategy",
    "clip_delta",
    "global_norm",
    "heterogeneous_probs",
    "noise_multiplier_for",
    "partition",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
    "sample_clients",
    "weighted_sum",
]
