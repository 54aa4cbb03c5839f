"""Configuration of ``slimtrain federated``: the trainer's model / data / optim sections plus a
``federated`` section (clients, sampling, strategy, availability, DP, compression, faults).

The dataclass machinery is the trainer's (:mod:`slimtrain.run.config`): the same YAML file
plus ``key=value`` overrides, the same type coercion and error messages naming the key, the
value and what is allowed, and field docs printed by ``--help-config``. Only the root differs
(:class:`FedRunConfig`), so overrides are resolved against it here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


from ..run import config as _config
from ..run.config import ConfigError, DataConfig, ModelConfig, OptimConfig, describe, require, setting, to_dict

from .availability import AVAILABILITY as _AVAILABILITY
from .compression import COMPRESSORS as _COMPRESSORS
from .partition import SCHEMES as _SCHEMES
from .strategies import STRATEGIES as _STRATEGIES

# Config choices are the algorithm registries' names, so the two cannot drift apart.
STRATEGIES = tuple(_STRATEGIES)
PARTITIONS = tuple(_SCHEMES)
AVAILABILITY = tuple(_AVAILABILITY)
COMPRESSORS = tuple(_COMPRESSORS)


@dataclass
class DPConfig:
    """User-level DP-FedAvg (McMahan et al., 2018): clip every client delta to L2 norm
    ``clip_norm``, average with the fixed denominator (expected clients per round), add Gaussian
    noise of std ``noise_multiplier * clip_norm / expected_clients``; Opacus RDP accounting."""

    enabled: bool = setting(True, "clip + noise client deltas and account the privacy loss (epsilon per round)")
    clip_norm: float = setting(0.1, "C: every client's model delta is clipped to this L2 norm")
    noise_multiplier: float = setting(1.0, "z: noise std is z * C / expected clients per round (0 with "
                                 "target_epsilon > 0: the smallest z that reaches target_epsilon after "
                                 "federated.rounds rounds)")
    target_epsilon: float = setting(0.0, "stop before a round would take epsilon past this budget (0: no budget)")
    delta: float = setting(1e-5, "the delta of (epsilon, delta)-DP; should be below 1 / federated.clients")
    adaptive_clip: bool = setting(False, "adapt clip_norm towards a quantile of the client delta norms "
                             "(Andrew et al., 2021); the norm estimate is itself noised")

    def __post_init__(self):
        require(self.clip_norm > 0 and math.isfinite(self.clip_norm), "federated.dp.clip_norm", self.clip_norm,
               "must be a positive number (e.g. 0.1)")
        require(self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier), "federated.dp.noise_multiplier",
               self.noise_multiplier, "must be >= 0")
        require(self.target_epsilon >= 0, "federated.dp.target_epsilon", self.target_epsilon, "must be >= 0 (0: none)")
        require(0.0 < self.delta < 1.0, "federated.dp.delta", self.delta, "must be strictly between 0 and 1 (e.g. 1e-5)")
        require(self.noise_multiplier > 0 or self.target_epsilon > 0 or not self.enabled,
               "federated.dp.noise_multiplier", self.noise_multiplier,
               "is 0 with no federated.dp.target_epsilon: give a noise multiplier or a target epsilon to derive it "
               "from (or federated.dp.enabled=false)")


@dataclass
class FederatedConfig:
    """Simulation of ``clients`` virtual clients; a round samples clients, trains them locally
    (``local_steps`` optimizer steps of the configured slimtrain optimizer) and aggregates."""

    clients: int = setting(100, "number of virtual clients (each holds a share of the training blocks)")
    clients_per_round: int = setting(0, "fixed-size sampling: this many clients per round (set exactly one of "
                                "clients_per_round / participation; DP accounting assumes Poisson sampling)")
    participation: float = setting(0.1, "Poisson sampling: every client joins each round with this probability "
                              "(what the DP accountant assumes); 0 when clients_per_round is used")
    rounds: int = setting(10, "communication rounds")
    local_steps: int = setting(2, "optimizer steps per client per round")
    batch_size: int = setting(4, "sequences per local step")
    max_grad_norm: float = setting(1.0, "per-step gradient-norm clipping inside a client (0: off)")
    partition: str = setting("dirichlet", "how training blocks are split over clients: iid, dirichlet (over source "
                        "documents, Dirichlet(alpha) per client), shards", choices=PARTITIONS)
    alpha: float = setting(0.5, "Dirichlet concentration (smaller: more skewed clients)")
    shards_per_client: int = setting(2, "shards per client for partition=shards")
    strategy: str = setting("fedavg", "server aggregation", choices=STRATEGIES)
    server_lr: float = setting(0.0, "server learning rate applied to the aggregated delta (0: the strategy's default, "
                          "1.0 for fedavg / fedprox / fedau, 0.01 for fedadam / fedyogi)")
    prox_mu: float = setting(0.0, "FedProx: clients add mu/2 ||w - w_global||^2 to their loss (strategy=fedprox)")
    fedau_cutoff: int = setting(50, "FedAU: cutoff K of the online participation-interval estimate")
    availability: str = setting("always", "client availability model", choices=AVAILABILITY)
    availability_args: dict = setting({}, "keyword arguments of the availability model, e.g. {low: 0.1, high: 0.9} for "
                                 "bernoulli, {p_stay_on: 0.8, p_stay_off: 0.8} for markov, {period: 10} "
                                 "for cyclic (see slimtrain.federated.availability.build_availability)")
    compression: str = setting("none", "client-upload compression (DP clip + noise act after decompression)",
                          choices=COMPRESSORS)
    compression_rank: int = setting(8, "rank for compression=lowrank")
    compression_fraction: float = setting(0.01, "kept fraction of entries for compression=topk / ternary")
    spill_replies: bool = setting(True, "keep each reply's (decompressed) delta in a file under <output_dir>/replies "
                             "until aggregation reads it: memory O(model) however many clients reply in a round "
                             "(false: hold them in memory, faster for small models)")
    keep_client_optimizer_state: bool = setting(False, "keep each client's optimizer state on disk between its rounds "
                                           "(disk: clients x optimizer state); false: a fresh optimizer per round")
    fail_prob: float = setting(0.0, "fault injection: probability that an active client fails in a round (raises, "
                          "returns non-finite values, or straggles past timeout_s, chosen at random)")
    timeout_s: float = setting(0.0, "drop a client whose local round takes longer than this (0: no deadline)")
    eval_every: int = setting(1, "evaluate the global model every N rounds (0: only at the end)")
    checkpoint_every: int = setting(1, "server checkpoint every N rounds (0: only at the end)")
    seed: int = setting(0, "seeds partition, sampling, availability, client training, DP noise")
    progress: bool = setting(True, "show a tqdm progress bar")
    dp: DPConfig = field(default_factory=DPConfig)

    def __post_init__(self):
        for key in ("clients", "rounds", "local_steps", "batch_size", "shards_per_client", "fedau_cutoff",
                    "compression_rank"):
            require(getattr(self, key) >= 1, f"federated.{key}", getattr(self, key), "must be >= 1")
        for key in ("eval_every", "checkpoint_every", "clients_per_round"):
            require(getattr(self, key) >= 0, f"federated.{key}", getattr(self, key), "must be >= 0")
        if (self.clients_per_round > 0) == (self.participation > 0):
            raise ConfigError(
                f"federated.clients_per_round={self.clients_per_round} and federated.participation="
                f"{self.participation}: set exactly one of them (the other to 0), e.g. federated.participation=0.1 "
                "(Poisson sampling) or federated.clients_per_round=10 federated.participation=0")
        require(self.clients_per_round <= self.clients, "federated.clients_per_round", self.clients_per_round,
               f"must be <= federated.clients={self.clients}")
        require(0.0 <= self.participation <= 1.0, "federated.participation", self.participation, "must be in [0, 1]")
        require(self.alpha > 0, "federated.alpha", self.alpha, "must be > 0 (e.g. 0.5)")
        require(self.server_lr >= 0 and math.isfinite(self.server_lr), "federated.server_lr", self.server_lr,
               "must be >= 0 (0: the strategy's default)")
        require(self.prox_mu >= 0, "federated.prox_mu", self.prox_mu, "must be >= 0")
        require(self.prox_mu == 0 or self.strategy == "fedprox", "federated.prox_mu", self.prox_mu,
               f"only applies to federated.strategy=fedprox (got {self.strategy!r})")
        require(self.max_grad_norm >= 0, "federated.max_grad_norm", self.max_grad_norm, "must be >= 0 (0: off)")
        require(0.0 < self.compression_fraction <= 1.0, "federated.compression_fraction", self.compression_fraction,
               "must be in (0, 1]")
        require(0.0 <= self.fail_prob <= 1.0, "federated.fail_prob", self.fail_prob, "must be in [0, 1]")
        require(self.timeout_s >= 0, "federated.timeout_s", self.timeout_s, "must be >= 0 (0: no deadline)")
        # FedAU's whole point is its per-client weights; DP-FedAvg averages uniformly (that is what
        # bounds the sensitivity to C/m), so combining them would silently drop FedAU's weighting.
        require(not (self.dp.enabled and self.strategy == "fedau"), "federated.strategy", self.strategy,
               "FedAU's per-client weights break DP-FedAvg's uniform C/m sensitivity; use federated.dp.enabled=false "
               "or another strategy (fedavg, fedprox, fedadam, fedyogi)")

    @property
    def sample_rate(self) -> float:
        """The per-round client sampling rate q the accountant uses (exact for Poisson sampling)."""
        return self.participation if self.participation > 0 else self.clients_per_round / self.clients

    @property
    def expected_clients(self) -> float:
        """Expected clients per round: the DP estimator's fixed denominator."""
        return self.participation * self.clients if self.participation > 0 else float(self.clients_per_round)


@dataclass
class FedRunConfig:
    """Root of ``slimtrain federated``'s config: the trainer's model / data / optim sections and
    ``federated``. ``optim`` is every client's local optimizer (``optim.lr`` is constant)."""

    output_dir: str = setting("runs/federated", "run directory: checkpoints/, clients/, metrics.jsonl, loss.png, "
                         "summary.json, config.yaml")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)


# ---------------------------------------------------------------------------- loading
# The trainer's loaders, resolved against this root.
def from_dict(data: dict | None) -> FedRunConfig:
    """Build a :class:`FedRunConfig` from nested plain data (unknown keys / bad values -> ConfigError)."""
    return _config.from_dict(data, FedRunConfig)


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` assignment (value parsed as YAML) to nested ``data``; free-form
    mappings (``optim.args``, ``federated.availability_args``) accept any sub-key."""
    _config.apply_override(data, assignment, FedRunConfig)


def load_config(path: str | None = None, overrides: list[str] | tuple = ()) -> FedRunConfig:
    """A YAML file (optional) plus ``key=value`` overrides, validated into a :class:`FedRunConfig`."""
    return _config.load_config(path, overrides, FedRunConfig)


def describe_federated() -> list[str]:
    """``--help-config`` lines for every key of :class:`FedRunConfig`."""
    return describe(FedRunConfig)


__all__ = ["FedRunConfig", "FederatedConfig", "DPConfig", "ConfigError", "load_config", "from_dict", "to_dict",
           "apply_override", "describe_federated", "STRATEGIES", "PARTITIONS", "AVAILABILITY", "COMPRESSORS"]
