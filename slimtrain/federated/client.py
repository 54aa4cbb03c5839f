"""Virtual clients: local training of one client on one shared model instance.

The simulation holds a single model. For each active client :class:`ClientRunner` copies the
global parameters into it, builds the configured slimtrain optimizer (fresh, or restored from
the client's saved state), runs ``local_steps`` steps on the client's own blocks and returns the
model delta ``client - global``. Nothing per client stays in memory afterwards: the caller saves
the returned state (data position, optional optimizer state) in the :class:`~.store.ClientStore`.

Every client-round is seeded from ``(seed, round, client)`` alone, so a client's result does not
depend on which clients ran before it, and a resumed run repeats it exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..optim.registry import build_optimizer, optimizer_spec
from ..optim.spec import lowrank_step_of
from ..run.data import BlockOrder
from .strategies import ClientUpdate

Params = dict[str, Tensor]

FAULTS = ("raise", "nonfinite", "timeout")


class ClientFailure(RuntimeError):
    """An injected client failure (fault injection: ``federated.fail_prob``)."""


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, round, client): distinct streams per client-round."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
               % (1 << 63))


@dataclass
class ClientResult:
    """One client's finished round: the update to upload, its next on-disk state, the GaLore
    projectors its optimizer used (for low-rank compression), its mean local loss, and the time
    it took (wall clock plus any injected straggler delay)."""

    update: ClientUpdate
    state: dict
    projectors: dict[str, tuple[Tensor | None, Tensor | None]]
    loss: float
    seconds: float
    straggle_s: float = 0.0


class ClientRunner:
    """Runs clients one at a time on ``model`` (shared by all of them: memory O(model)).

    ``blocks`` (N, T) are the training blocks, ``client_blocks[i]`` the block ids of client ``i``.
    ``optim_name`` / ``optim_kwargs`` (``lr`` and the rest, as
    :func:`slimtrain.run.config.optimizer_kwargs` builds them) make the local optimizer through
    :func:`slimtrain.optim.registry.build_optimizer`; what it can do comes from its declared spec:
    zeroth-order optimizers (MeZO) are stepped with a closure, gradient ones with backward +
    optional norm clipping (not for layer-wise ones, which update inside backward).
    """

    def __init__(self, model: nn.Module, blocks: Tensor, client_blocks: list[np.ndarray], *, optim_name: str,
                 optim_kwargs: dict, batch_size: int = 8, local_steps: int = 1,
                 max_grad_norm: float = 0.0, seed: int = 0, keep_optimizer_state: bool = False):
        self.model = model
        self.blocks = blocks
        self.client_blocks = client_blocks
        self.optim_name, self.optim_kwargs = optim_name, dict(optim_kwargs)
        self.batch_size, self.local_steps = int(batch_size), int(local_steps)
        self.max_grad_norm, self.seed = float(max_grad_norm), int(seed)
        self.keep_optimizer_state = bool(keep_optimizer_state)
        self.device = next(model.parameters()).device
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self._params = dict(model.named_parameters())
        self.spec = optimizer_spec(optim_name, **self.optim_kwargs)
        # arguments are checked once, here, rather than by the first client of the first round
        self._remove_hooks(build_optimizer(optim_name, model, **self.optim_kwargs))

    # ------------------------------------------------------------------ parameters
    def global_params(self) -> Params:
        """The model's trainable parameters as fp32 CPU tensors (the server's global model)."""
        return {n: self._params[n].detach().float().cpu().clone() for n in self.names}

    @torch.no_grad()
    def load_params(self, params: Params) -> None:
        for n in self.names:
            self._params[n].copy_(params[n])

    def param_bytes(self) -> int:
        """Bytes of one broadcast of the global model (fp32 trainable parameters)."""
        return sum(self._params[n].numel() * 4 for n in self.names)

    # ------------------------------------------------------------------ local training
    def _batch(self, client_id: int, order: BlockOrder, position: int) -> Tensor:
        ids = self.client_blocks[client_id]
        local = order.blocks(position, self.batch_size)  # positions -> indices into the client's blocks
        return self.blocks[torch.as_tensor(ids)[local]].to(self.device)  # (B, T)

    def _prox(self, global_dev: Params, mu: float) -> Tensor:
        # FedProx: mu/2 ||w - w_global||^2 keeps the client near the model it started from.
        return 0.5 * mu * sum(((self._params[n].float() - global_dev[n]) ** 2).sum() for n in self.names)

    def _optimizer(self, client_id: int, round_idx: int, state: dict):
        kwargs = dict(self.optim_kwargs)
        if self.spec.zeroth_order and "seed" not in kwargs:
            # one perturbation stream per client-round; a shared seed would give every client the
            # same perturbation directions and so correlated (less informative) estimates
            kwargs["seed"] = mix_seed(self.seed, round_idx, client_id, 1)
        optimizer = build_optimizer(self.optim_name, self.model, **kwargs)
        if self.keep_optimizer_state and "optim" in state:
            optimizer.load_state_dict(state["optim"])
        return optimizer

    def run(self, client_id: int, round_idx: int, global_params: Params, state: dict, *, prox_mu: float = 0.0,
            fault: str | None = None, straggle_s: float = 0.0) -> ClientResult:
        """Train client ``client_id`` in round ``round_idx`` (0-based) from ``global_params``.

        ``state`` is what :meth:`run` returned last time for this client (``{}`` the first time).
        ``fault`` injects a failure: ``raise`` (raises :class:`ClientFailure` after the first
        step), ``nonfinite`` (a NaN in the delta), ``timeout`` (reports ``straggle_s`` simulated
        seconds of delay, which the server adds to the time it measured, so its deadline drops it).
        """
        t0 = time.perf_counter()
        torch.manual_seed(mix_seed(self.seed, round_idx, client_id, 0))
        self.load_params(global_params)
        n_blocks = len(self.client_blocks[client_id])
        if n_blocks == 0:
            raise ValueError(f"client {client_id} holds no training blocks; use fewer federated.clients")
        order = BlockOrder(n_blocks, mix_seed(self.seed, client_id, 2) % (1 << 31))
        position = int(state.get("position", 0))
        optimizer = self._optimizer(client_id, round_idx, state)
        global_dev = ({n: global_params[n].to(self.device) for n in self.names} if prox_mu > 0 else None)
        self.model.train()
        losses = []
        try:
            for step in range(self.local_steps):
                ids = self._batch(client_id, order, position)
                position += self.batch_size
                if self.spec.zeroth_order:
                    seen = []

                    def closure(ids=ids):
                        with torch.no_grad():
                            loss = self.model(input_ids=ids, labels=ids).loss.float()
                            if global_dev is not None:
                                loss = loss + self._prox(global_dev, prox_mu)
                        seen.append(loss)
                        return loss

                    optimizer.step(closure)
                    loss = seen[0]
                else:
                    loss = self.model(input_ids=ids, labels=ids).loss.float()
                    total = loss + self._prox(global_dev, prox_mu) if global_dev is not None else loss
                    total.backward()
                    if self.max_grad_norm > 0 and not self.spec.layerwise:
                        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None],
                                                       self.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                if fault == "raise":
                    raise ClientFailure(f"injected failure of client {client_id} in round {round_idx + 1}")
            delta = {n: self._params[n].detach().float().cpu() - global_params[n] for n in self.names}
            if fault == "nonfinite":
                delta[self.names[0]] = delta[self.names[0]].clone()
                delta[self.names[0]].view(-1)[0] = float("nan")
            projectors = self._projectors(optimizer)
            new_state = {"position": position, "round": round_idx + 1}
            if self.keep_optimizer_state:
                new_state["optim"] = optimizer.state_dict()
        finally:
            self._remove_hooks(optimizer)
            self.model.zero_grad(set_to_none=True)
        examples = self.local_steps * self.batch_size
        loss = float(np.mean(losses)) if losses else math.nan
        update = ClientUpdate(client_id=int(client_id), delta=delta, num_examples=examples, metrics={"loss": loss})
        return ClientResult(update=update, state=new_state, projectors=projectors, loss=loss,
                            seconds=time.perf_counter() - t0, straggle_s=straggle_s if fault == "timeout" else 0.0)

    def _remove_hooks(self, optimizer) -> None:
        if self.spec.layerwise:  # layer-wise hooks must not outlive the client's optimizer
            optimizer.remove_hooks()

    def _projectors(self, optimizer) -> dict[str, tuple[Tensor | None, Tensor | None]]:
        """``{name: (left, right)}`` of the GaLore projectors the client's optimizer holds (empty for
        optimizers without a low-rank step): the low-rank compressor reuses this subspace for the upload."""
        lowrank = lowrank_step_of(optimizer)
        if lowrank is None:
            return {}
        names = {id(p): n for n, p in self.model.named_parameters()}
        cpu = (lambda t: None if t is None else t.detach().float().cpu())
        return {names[id(p)]: (cpu(left), cpu(right)) for p, (left, right) in lowrank.projectors().items()
                if id(p) in names}


def all_finite(delta: Params) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in delta.values())


__all__ = ["ClientRunner", "ClientResult", "ClientFailure", "FAULTS", "all_finite", "mix_seed"]
