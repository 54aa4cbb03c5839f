"""Running slimtrain clients and slimtrain's server strategy (with DP-FedAvg) under Flower.

Optional extra: ``pip install 'flwr[simulation]'`` (Flower >= 1.13; tested with 1.41). The
pieces are the simulation's own, so a Flower round computes what a simulation round computes:

* :class:`SlimtrainNumPyClient` (a ``flwr.client.NumPyClient``): ``fit`` loads the client's
  state from the :class:`~.store.ClientStore`, runs :class:`~.client.ClientRunner` from the
  received global weights and returns the **model delta** (client - global, fp32, one array per
  trainable tensor in ``named_parameters`` order) plus ``metrics["client_id"]``, not the new
  weights: the server clips exactly what the simulation clips, with no ``(g + d) - g``
  rounding. ``get_properties`` reports the slimtrain client id.
* :class:`SlimtrainFlowerStrategy` (a ``flwr.server.strategy.Strategy``): samples clients with
  :func:`~.availability.sample_clients` (Poisson at ``federated.participation``, the accountant's
  assumption; Flower's own strategies sample a fixed number), aggregates with the configured
  slimtrain strategy or DP-FedAvg (fixed denominator, noise never lowered by failures, which
  Flower reports separately and which are simply left out of the sum), steps the Opacus RDP
  accountant every round, stops sampling once the next round would exceed
  ``federated.dp.target_epsilon``, and evaluates the global model centrally.
* :func:`client_app` / :func:`server_app` build a ``ClientApp`` / ``ServerApp`` from a
  :class:`~.config.FedRunConfig`; a node's slimtrain client id is its ``partition-id``.

Not carried over from the simulation: upload compression (Flower sends the arrays as they are),
fault injection and server checkpoints (Flower's own machinery applies).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import yaml

from ..run.config import to_dict
from .availability import sample_clients
from .client import all_finite
from .config import FedRunConfig
from .server import FederatedSimulation
from .strategies import ClientUpdate

try:
    from flwr.client import NumPyClient
    from flwr.clientapp import ClientApp
    from flwr.common import (Code, Context, FitIns, GetPropertiesIns, Parameters, ndarrays_to_parameters,
                             parameters_to_ndarrays)
    from flwr.server import ServerAppComponents, ServerConfig
    from flwr.server.client_manager import ClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import Strategy as FlowerStrategy
    from flwr.serverapp import ServerApp
except ImportError as e:  # optional extra
    raise ImportError("slimtrain.federated.flower needs Flower: pip install 'flwr[simulation]>=1.13' "
                      f"(optional extra slimtrain[flower]); import failed with: {e}") from e


_SIMULATIONS: dict[str, FederatedSimulation] = {}


def simulation_for(cfg: FedRunConfig, server: bool = False) -> FederatedSimulation:
    """One :class:`FederatedSimulation` per config and process (data, partition, model, store):
    Flower builds a client object per message, the data and model must not be rebuilt each time.
    Only the server side clears client files of an earlier run: client processes share the store."""
    key = yaml.safe_dump(to_dict(cfg), sort_keys=True)
    if key not in _SIMULATIONS:
        _SIMULATIONS[key] = FederatedSimulation(cfg, clear_clients=server)
    return _SIMULATIONS[key]


def to_arrays(params: dict, names: list[str]) -> list[np.ndarray]:
    return [params[n].detach().cpu().numpy() for n in names]


def from_arrays(arrays: list[np.ndarray], names: list[str]) -> dict:
    if len(arrays) != len(names):
        raise ValueError(f"got {len(arrays)} arrays for {len(names)} trainable tensors; client and server must "
                         "build the same model (same model.name)")
    return {n: torch.from_numpy(np.array(a, dtype=np.float32, copy=True)) for n, a in zip(names, arrays)}


class SlimtrainNumPyClient(NumPyClient):
    """Slimtrain client ``client_id`` of ``sim`` as a Flower NumPyClient (``fit`` returns the delta)."""

    def __init__(self, sim: FederatedSimulation, client_id: int):
        if not 0 <= client_id < sim.cfg.federated.clients:
            raise ValueError(f"partition-id {client_id} is outside federated.clients={sim.cfg.federated.clients}; "
                             "start as many Flower nodes as federated.clients")
        self.sim, self.client_id = sim, int(client_id)
        self.names = sim.runner.names

    def get_properties(self, config):
        return {"client_id": self.client_id}

    def get_parameters(self, config):
        return to_arrays(self.sim.global_params, self.names)

    def fit(self, parameters, config):
        round_idx = int(config["round"]) - 1
        global_params = from_arrays(parameters, self.names)
        state = self.sim.store.load(self.client_id)
        res = self.sim.runner.run(self.client_id, round_idx, global_params, state,
                                  prox_mu=float(config.get("prox_mu", 0.0)))
        self.sim.store.save(self.client_id, round_idx + 1, res.state)
        return (to_arrays(res.update.delta, self.names), res.update.num_examples,
                {"client_id": self.client_id, "loss": float(res.loss)})

    def evaluate(self, parameters, config):
        """Loss of the received weights on one batch of this client's own blocks."""
        sim = self.sim
        sim.runner.load_params(from_arrays(parameters, self.names))
        ids = sim.data.train[torch.as_tensor(sim.client_blocks[self.client_id][: sim.cfg.federated.batch_size])]
        with torch.no_grad():
            loss = float(sim.model(input_ids=ids.to(sim.runner.device), labels=ids.to(sim.runner.device)).loss)
        return loss, len(ids), {"client_id": self.client_id}


class SlimtrainFlowerStrategy(FlowerStrategy):
    """slimtrain's aggregation (and DP-FedAvg + Opacus accounting) as a Flower server strategy.

    Holds the global parameters of ``sim`` as the source of truth; per round ``history`` gets
    ``{"round", "sampled", "replied", "failures", "epsilon"}``.
    """

    def __init__(self, sim: FederatedSimulation):
        super().__init__()
        self.sim = sim
        self.names = sim.runner.names
        self.history: list[dict] = []
        self._ids: dict[str, int] = {}  # Flower node id -> slimtrain client id

    def __repr__(self) -> str:
        return f"SlimtrainFlowerStrategy({self.sim.cfg.federated.strategy}, dp={self.sim.accountant is not None})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(to_arrays(self.sim.global_params, self.names))

    def _client_ids(self, proxies: dict[str, ClientProxy]) -> dict[int, ClientProxy]:
        for cid, proxy in proxies.items():
            if cid not in self._ids:
                res = proxy.get_properties(GetPropertiesIns({}), timeout=None, group_id=None)
                self._ids[cid] = int(res.properties["client_id"])
        return {self._ids[cid]: proxy for cid, proxy in proxies.items()}

    def select(self, server_round: int, client_ids: list[int]) -> list[int]:
        """The round's clients among ``client_ids``: the simulation's sampling (same seed, same
        clients), restricted to the nodes that are connected (the others are unavailable)."""
        fc = self.sim.cfg.federated
        how = ({"clients_per_round": fc.clients_per_round} if fc.clients_per_round > 0
               else {"participation": fc.participation})
        available = np.zeros(fc.clients, dtype=bool)
        available[[i for i in client_ids if 0 <= i < fc.clients]] = True
        available &= np.asarray(self.sim.availability.available(server_round - 1), dtype=bool)
        return sample_clients(server_round - 1, fc.clients, seed=fc.seed, available=available, **how).tolist()

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        if self.sim._budget_exhausted():  # stop before the budget is exceeded: nobody trains any more
            return []
        by_id = self._client_ids(client_manager.all())
        chosen = self.select(server_round, sorted(by_id))
        config = {"round": server_round, "prox_mu": float(self.sim.strategy.client_prox_mu)}
        return [(by_id[i], FitIns(parameters, config)) for i in chosen]

    def aggregate_fit(self, server_round: int, results, failures):
        round_idx = server_round - 1
        updates = []
        for _, fit_res in results:
            if fit_res.status.code != Code.OK:
                continue
            delta = from_arrays(parameters_to_ndarrays(fit_res.parameters), self.names)
            if not all_finite(delta):  # dropped like a failed client; DP noise stays calibrated to m
                continue
            updates.append(ClientUpdate(int(fit_res.metrics["client_id"]), delta, int(fit_res.num_examples),
                                        {"loss": float(fit_res.metrics.get("loss", math.nan))}))
        updates.sort(key=lambda u: u.client_id)  # the simulation's order: sums are bit-identical
        sim = self.sim
        sim.aggregate(updates, round_idx)
        sim.round = server_round
        metrics = {"replied": len(updates), "failures": len(failures)}
        if sim.accountant is not None:
            metrics["epsilon"] = sim.epsilon
        self.history.append({"round": server_round, **metrics})
        return ndarrays_to_parameters(to_arrays(sim.global_params, self.names)), metrics

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        return []  # evaluation is central (held-out blocks), see evaluate()

    def aggregate_evaluate(self, server_round: int, results, failures):
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters):
        loss = self.sim.evaluate(from_arrays(parameters_to_ndarrays(parameters), self.names))
        metrics = {"epsilon": self.sim.epsilon} if self.sim.accountant is not None else {}
        return loss, metrics


def client_app(cfg: FedRunConfig) -> ClientApp:
    """A Flower ``ClientApp`` whose node with ``partition-id`` i is slimtrain client i."""

    def client_fn(context: Context):
        cid = int(context.node_config["partition-id"])
        return SlimtrainNumPyClient(simulation_for(cfg), cid).to_client()

    return ClientApp(client_fn=client_fn)


def server_app(cfg: FedRunConfig, strategies: list | None = None) -> ServerApp:
    """A Flower ``ServerApp`` running :class:`SlimtrainFlowerStrategy` for ``federated.rounds``
    rounds; the strategy built for a run is appended to ``strategies`` when given (for tests)."""

    def server_fn(context: Context):
        strategy = SlimtrainFlowerStrategy(simulation_for(cfg, server=True))
        if strategies is not None:
            strategies.append(strategy)
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=cfg.federated.rounds))

    return ServerApp(server_fn=server_fn)


__all__ = ["SlimtrainNumPyClient", "SlimtrainFlowerStrategy", "client_app", "server_app", "simulation_for"]
