"""The federated simulation: one server and ``federated.clients`` virtual clients in one process.

A round (``round_idx`` is 0-based; logs and checkpoints count completed rounds):

1. stop first if DP is on and one more round would take epsilon past ``target_epsilon``;
2. the server samples clients (fixed size or Poisson) and the availability model removes the
   unreachable ones; the rest are *active* and get the global model (a broadcast, counted);
3. each active client trains on the shared model instance (:class:`~.client.ClientRunner`),
   its state read from and written back to disk (:class:`~.store.ClientStore`); a client that
   raises, exceeds ``timeout_s`` or returns non-finite values is dropped and logged;
4. a survivor's delta is compressed (upload bytes counted), decompressed, and aggregated: with
   DP by DP-FedAvg (clip to C, fixed denominator m = expected clients, noise z C / m; the noise
   never shrinks with the number of replies) then the strategy's server step, else by the
   strategy itself; the accountant adds the round;
5. eval every ``eval_every`` rounds; a server checkpoint every ``checkpoint_every`` rounds.

A checkpoint holds the global parameters, the strategy (and DP aggregator) state, the
accountant's history, the availability state, counters and the RNG states, all tensors or plain
numbers (``torch.load(weights_only=True)``). ``resume=True`` continues from the newest one; the
clients' on-disk versions newer than it are rolled back, so a killed and resumed run produces
the same global model as an uninterrupted one, and epsilon continues from its history.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from typing import Callable

import numpy as np
import torch

from ..optim.registry import available_optimizers, optimizer_spec
from ..run import checkpoint as ckpt
from ..run.config import ConfigError, check_resume_config, optimizer_kwargs, to_dict
from ..run.data import build_tokenizer, pack
from ..run.metrics import MetricsWriter, peak_memory_mb
from ..run.rundir import claim_output_dir
from ..run.model import build_model, count_parameters
from ..run.wrapup import finish_run, write_run_config
from .availability import build_availability, sample_clients
from .client import FAULTS, ClientRunner, all_finite
from .config import FedRunConfig
from .partition import partition
from .store import ClientStore, SpilledDelta
from .strategies import ClientUpdate, build_strategy

# loss.png of a federated run: curves against rounds, epsilon on a second axis
ROUND_CURVES = (("loss", "mean client train loss", "-"), ("eval_loss", "global eval loss", "o-"))

# A function (round_idx, client_id) -> fault name or None; the default draws faults from
# ``federated.fail_prob``. Tests pass their own to fail chosen clients.
FaultFn = Callable[[int, int], "str | None"]

# What a resumed federated run may change (applied and recorded): its length, cadences, progress
# and scratch handling, the fault injection and deadline. Everything else is refused: who holds
# which data, the model, the client optimizer, the strategy and every DP parameter (a changed
# delta or noise would make the reported epsilon meaningless, even lower than before).
_RESUME_MAY_CHANGE = ("output_dir", "federated.rounds", "federated.eval_every", "federated.checkpoint_every",
                      "federated.progress", "federated.spill_replies", "federated.timeout_s", "federated.fail_prob")



class FederatedSimulation:
    """Build everything a :class:`~.config.FedRunConfig` describes, then :meth:`run` it.

    ``resume``: ``True`` (newest checkpoint under ``<output_dir>/checkpoints``), a checkpoint
    directory, or None. ``fault_fn`` overrides the configured fault injection. The server side
    (``clear_clients=True``) locks ``output_dir`` until :meth:`run` ends and, on a fresh start,
    refuses a directory holding checkpoints (``overwrite`` deletes them) and deletes client files
    left by an earlier run; Flower client processes (``clear_clients=False``) share the store.
    """

    def __init__(self, cfg: FedRunConfig, resume: str | bool | None = None, fault_fn: FaultFn | None = None,
                 clear_clients: bool = True, overwrite: bool = False):
        self.cfg = cfg
        # before anything is read, deleted or written there
        self.run_lock = (claim_output_dir(cfg.output_dir, resuming=bool(resume), overwrite=overwrite,
                                          command="federated") if clear_clients else None)
        try:
            self._build(resume, fault_fn, clear_clients)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the output directory (``run`` does it when it ends)."""
        if self.run_lock is not None:
            self.run_lock.release()

    def _build(self, resume, fault_fn, clear_clients) -> None:
        cfg = self.cfg
        fc = cfg.federated
        self.fault_fn = fault_fn if fault_fn is not None else self._configured_fault
        self.ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
        torch.manual_seed(fc.seed)
        np.random.seed(fc.seed % (1 << 32))

        # ---- data: blocks, one source-document id per block, blocks split over clients
        self.tokenizer = build_tokenizer(cfg.data)
        self.data = pack(cfg.data, self.tokenizer)
        labels = self.data.train_docs.numpy()
        try:
            self.client_blocks = partition(fc.partition, labels, fc.clients, alpha=fc.alpha,
                                           shards_per_client=fc.shards_per_client, seed=fc.seed)
        except ValueError as e:
            raise ConfigError(f"federated.partition={fc.partition!r} over {len(labels)} training blocks "
                              f"({len(np.unique(labels))} documents) for federated.clients={fc.clients}: {e}") from None

        # ---- model and the client runner (one model instance for every client)
        if cfg.optim.name not in available_optimizers():
            raise ConfigError(f"optim.name={cfg.optim.name!r}: allowed choices are {available_optimizers()}")
        if optimizer_spec(cfg.optim.name, **optimizer_kwargs(cfg.optim)).rewrites_model:
            # built once per client on one shared model, it would rewrite that model every time
            raise ConfigError(f"optim.name={cfg.optim.name!r} is not supported by slimtrain federated: it replaces "
                              "the model's layers in place when built, which cannot happen once per client on one "
                              "shared model; use galore_adamw8bit instead")
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        torch.manual_seed(fc.seed)  # the initial global model depends on the seed only
        self.model = build_model(cfg.model, self.tokenizer.vocab_size, cfg.data.seq_len,
                                 self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, seed=fc.seed).to(device)
        try:
            self.runner = ClientRunner(self.model, self.data.train, self.client_blocks, optim_name=cfg.optim.name,
                                       optim_kwargs=optimizer_kwargs(cfg.optim), batch_size=fc.batch_size,
                                       local_steps=fc.local_steps, max_grad_norm=fc.max_grad_norm, seed=fc.seed,
                                       keep_optimizer_state=fc.keep_client_optimizer_state)
        except (TypeError, ValueError) as e:  # an argument the optimizer does not take, or a bad value
            raise ConfigError(f"optim.name={cfg.optim.name!r} with optim.lr={cfg.optim.lr!r} "
                              f"optim.args={cfg.optim.args!r}: {e}") from None
        self.global_params = self.runner.global_params()
        self.model_bytes = self.runner.param_bytes()

        # ---- server: strategy (+ DP), availability, compression, accounting
        self.sample_rate = fc.sample_rate
        self.noise_multiplier = 0.0
        self.accountant = None
        self.strategy = self._build_strategy()
        try:
            self.availability = build_availability(fc.availability, fc.clients, fc.seed, **fc.availability_args)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"federated.availability={fc.availability!r} with federated.availability_args="
                              f"{fc.availability_args!r}: {e}") from None
        self.compressor = self._build_compressor()
        self.store = ClientStore(os.path.join(cfg.output_dir, "clients"))
        self.replies_dir = os.path.join(cfg.output_dir, "replies")
        shutil.rmtree(self.replies_dir, ignore_errors=True)  # scratch of an interrupted round

        self.round = 0  # completed rounds
        self.totals = {"bytes_up": 0, "bytes_down": 0, "client_rounds": 0, "dropped": 0, "client_seconds": 0.0}
        self.stop_reason = ""
        self.resumed_from = None
        if resume:
            self._load(ckpt.resolve_resume(self.ckpt_root, resume))
        else:  # claim_output_dir refused a directory with another run's checkpoints
            if clear_clients:
                # client states of an earlier, never checkpointed run would silently change this one
                self.store.clear()
        self.last_checkpoint = ckpt.latest_good_checkpoint(self.ckpt_root, warn=False)

    # ------------------------------------------------------------------ build
    def _build_strategy(self):
        fc = self.cfg.federated
        kwargs: dict = {}
        if fc.server_lr > 0:
            kwargs["server_lr"] = fc.server_lr
        if fc.strategy == "fedprox":
            kwargs["mu"] = fc.prox_mu
        if fc.strategy == "fedau":
            kwargs["cutoff"] = fc.fedau_cutoff
        if fc.dp.enabled and fc.strategy in ("fedavg", "fedprox"):
            kwargs["weighted"] = False  # DP-FedAvg's C/m sensitivity needs uniform weights
        inner = build_strategy(fc.strategy, fc.clients, **kwargs)
        if not fc.dp.enabled:
            return inner
        from .privacy import DPFedAvgAggregator, DPStrategy, PrivacyAccountant, noise_multiplier_for

        dp = fc.dp
        if fc.participation == 0:
            warnings.warn("federated.clients_per_round samples a fixed number of clients; the RDP accountant assumes "
                          "Poisson sampling (federated.participation), so the reported epsilon is approximate")
        z = dp.noise_multiplier
        if z == 0:  # derive the noise from the budget over the configured rounds
            z = noise_multiplier_for(dp.target_epsilon, dp.delta, self.sample_rate, fc.rounds)
        self.noise_multiplier = float(z)
        self.accountant = PrivacyAccountant()
        try:
            aggregator = DPFedAvgAggregator(dp.clip_norm, z, fc.expected_clients, fc.seed, adaptive_clip=dp.adaptive_clip)
        except ValueError as e:
            raise ConfigError(f"federated.dp={to_dict(dp)!r}: {e}") from None
        return DPStrategy(inner, aggregator)

    def _build_compressor(self):
        from .compression import build_compressor

        fc = self.cfg.federated
        kwargs = {"lowrank": {"rank": fc.compression_rank, "seed": fc.seed}, "topk": {"fraction": fc.compression_fraction},
                  "ternary": {"fraction": fc.compression_fraction}}
        return build_compressor(fc.compression, **kwargs.get(fc.compression, {}))

    def _configured_fault(self, round_idx: int, client_id: int) -> str | None:
        fc = self.cfg.federated
        if fc.fail_prob <= 0:
            return None
        rng = np.random.default_rng([fc.seed, round_idx, client_id, 7])  # stream 7: fault injection only
        if rng.random() >= fc.fail_prob:
            return None
        kinds = FAULTS if fc.timeout_s > 0 else tuple(k for k in FAULTS if k != "timeout")
        return kinds[int(rng.integers(len(kinds)))]

    # ------------------------------------------------------------------ one round
    @property
    def epsilon(self) -> float:
        return self.accountant.epsilon(self.cfg.federated.dp.delta) if self.accountant is not None else math.inf

    def _sample(self, round_idx: int) -> tuple[np.ndarray, np.ndarray]:
        """(sampled ids, active ids): active = sampled and available."""
        fc = self.cfg.federated
        how = ({"clients_per_round": fc.clients_per_round} if fc.clients_per_round > 0
               else {"participation": fc.participation})
        sampled = sample_clients(round_idx, fc.clients, seed=fc.seed, **how)
        avail = self.availability.available(round_idx)
        return sampled, sampled[np.asarray(avail, dtype=bool)[sampled]]

    def aggregate(self, updates: list, round_idx: int) -> None:
        """Fold the surviving replies into the global model and charge the round to the privacy
        budget (the Flower adapter calls this too, so both paths aggregate identically)."""
        if self.accountant is not None:  # DP: pure noise even when nobody replied
            avg = self.strategy.combine(updates, round_idx, like=self.global_params)
        else:
            avg = self.strategy.combine(updates, round_idx)
        self.global_params = self.strategy.apply(self.global_params, avg, round_idx)
        if self.accountant is not None:
            self.accountant.step(self.noise_multiplier, self.sample_rate)

    def _run_client(self, cid: int, round_idx: int) -> tuple[ClientUpdate | None, int, str]:
        """Train, check, compress and persist one client: (update or None, upload bytes, drop reason)."""
        fc = self.cfg.federated
        state = self.store.load(cid)
        fault = self.fault_fn(round_idx, cid)
        t0 = time.perf_counter()
        try:
            res = self.runner.run(cid, round_idx, self.global_params, state, prox_mu=self.strategy.client_prox_mu,
                                  fault=fault, straggle_s=fc.timeout_s * 1.5 + 1.0)
        except Exception as e:  # a failing client must not take the round down with it
            return None, 0, f"raised {type(e).__name__}: {e}"
        # Clients run one after another, so the deadline is checked when the reply arrives: a
        # client that took longer (wall clock, plus any injected straggler delay) is ignored, as
        # a server that stopped waiting at timeout_s would have.
        seconds = time.perf_counter() - t0 + res.straggle_s
        self.totals["client_seconds"] += seconds
        if fc.timeout_s > 0 and seconds > fc.timeout_s:
            return None, 0, f"timed out ({seconds:.2f} s > federated.timeout_s={fc.timeout_s})"
        if not all_finite(res.update.delta):
            return None, 0, "returned non-finite values"
        comp_state = state.get("compressor")
        if comp_state:
            self.compressor.load_client_state(cid, comp_state)
        context = {"projectors": res.projectors} if res.projectors else None
        payload = self.compressor.compress(cid, res.update.delta, context=context)
        up = int(self.compressor.nbytes(payload))
        res.state["compressor"] = self.compressor.client_state(cid)
        self.compressor.drop_client_state(cid)  # residuals live on disk, not in the server's memory
        delta = self.compressor.decompress(payload)
        if not all_finite(delta):
            return None, up, "non-finite after decompression"
        self.store.save(cid, round_idx + 1, res.state)
        update = ClientUpdate(cid, delta, res.update.num_examples, dict(res.update.metrics))
        return update, up, ""

    def run_round(self, say=print) -> dict:
        """Run round ``self.round`` (0-based index) and return its metrics record."""
        t0 = time.perf_counter()
        round_idx = self.round
        sampled, active = self._sample(round_idx)
        updates, dropped, up_bytes, losses = [], [], 0, []
        for cid in active.tolist():
            update, up, reason = self._run_client(cid, round_idx)
            up_bytes += up
            if update is None:
                dropped.append({"client": cid, "reason": reason})
                say(f"round {round_idx + 1}: client {cid} dropped: {reason}")
                continue
            if self.cfg.federated.spill_replies:
                os.makedirs(self.replies_dir, exist_ok=True)
                update.delta = SpilledDelta(os.path.join(self.replies_dir, f"{cid}.pt"), update.delta)
            updates.append(update)
            losses.append(update.metrics.get("loss", math.nan))
        down_bytes = len(active) * self.model_bytes  # every active client received the global model
        self.aggregate(updates, round_idx)
        shutil.rmtree(self.replies_dir, ignore_errors=True)
        self.round += 1
        self.totals["bytes_up"] += up_bytes
        self.totals["bytes_down"] += down_bytes
        self.totals["client_rounds"] += len(updates)
        self.totals["dropped"] += len(dropped)
        record = {"step": self.round, "round": self.round, "sampled": int(len(sampled)), "active": int(len(active)),
                  "replied": len(updates), "dropped": dropped, "bytes_up": up_bytes, "bytes_down": down_bytes,
                  "round_s": time.perf_counter() - t0}
        if losses:
            record["loss"] = float(np.mean(losses))
        if self.accountant is not None:
            record["epsilon"] = self.epsilon
            record["clip_norm"] = float(self.strategy.aggregator.clip_norm)
        return record

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self, params: dict | None = None) -> float:
        """Mean loss of ``params`` (default: the global model) over the held-out blocks."""
        self.runner.load_params(self.global_params if params is None else params)
        self.model.eval()
        blocks, b = self.data.eval, self.cfg.federated.batch_size
        total, count = 0.0, 0
        for i in range(0, len(blocks), b):
            ids = blocks[i: i + b].to(self.runner.device)
            total += float(self.model(input_ids=ids, labels=ids).loss) * len(ids)
            count += len(ids)
        self.model.train()
        return total / count

    # ------------------------------------------------------------------ checkpoints
    def _server_state(self) -> dict:
        state = {"round": self.round, "config": to_dict(self.cfg), "totals": dict(self.totals),
                 "availability": self.availability.state_dict(), "noise_multiplier": self.noise_multiplier,
                 "sample_rate": self.sample_rate}
        if self.accountant is not None:
            state["accountant"] = self.accountant.state_dict()
        return state

    def save(self) -> str | None:
        """Checkpoint the completed rounds; on a failed write warn and keep the last good one."""
        try:
            path = ckpt.save_checkpoint(self.ckpt_root, self.round, rank=0, model_state=self.global_params,
                                        optim_state=self.strategy.state_dict(), trainer_state=self._server_state(),
                                        keep=2)
        except OSError as e:
            warnings.warn(f"could not save the server checkpoint of round {self.round} ({e}); the last good one is "
                          f"{self.last_checkpoint}")
            return None
        self.store.commit(self.round)
        self.last_checkpoint = path
        return path

    def _load(self, path: str) -> None:
        state = ckpt.load_file(path, "trainer.pt")
        changed = check_resume_config(path, state["config"], to_dict(self.cfg), may_change=_RESUME_MAY_CHANGE,
                                      schedule=())
        if changed:
            print(f"resume: applying changed settings: {'; '.join(changed)}")
        self.global_params = ckpt.load_file(path, "model.pt")
        self.strategy.load_state_dict(ckpt.load_file(path, "optim.pt"))
        self.availability.load_state_dict(state["availability"])
        if self.accountant is not None:
            if "accountant" not in state:
                raise ConfigError(f"--resume {path}: the checkpoint was written without DP; resume with "
                                  "federated.dp.enabled=false or start a new output_dir")
            self.accountant.load_state_dict(state["accountant"])
            if not math.isclose(state["noise_multiplier"], self.noise_multiplier):
                warnings.warn(f"noise multiplier {self.noise_multiplier} differs from the checkpoint's "
                              f"{state['noise_multiplier']}; the accountant composes both")
        self.round = int(state["round"])
        self.totals = dict(state["totals"])
        self.store.rollback(self.round)
        rng = os.path.join(path, "rng_rank0.pt")
        if os.path.exists(rng):
            ckpt.set_rng_state(ckpt.load_file(path, "rng_rank0.pt"))
        self.resumed_from = path

    # ------------------------------------------------------------------ the loop
    def _budget_exhausted(self) -> bool:
        dp = self.cfg.federated.dp
        if self.accountant is None or dp.target_epsilon <= 0:
            return False
        nxt = self.accountant.epsilon_after(1, self.noise_multiplier, self.sample_rate, dp.delta)
        if nxt > dp.target_epsilon:
            self.stop_reason = (f"privacy budget: round {self.round + 1} would reach epsilon {nxt:.3f} > "
                                f"federated.dp.target_epsilon={dp.target_epsilon}")
            return True
        return False

    def run(self) -> dict:
        """Run to ``federated.rounds`` (or the privacy budget); returns the summary (also written to
        ``summary.json``). The output directory is released when it returns or raises."""
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> dict:
        from tqdm import tqdm

        cfg, fc = self.cfg, self.cfg.federated
        write_run_config(cfg.output_dir, cfg)
        writer = MetricsWriter(cfg.output_dir, self.round if self.resumed_from else None)
        dp_text = (f"DP-FedAvg z={self.noise_multiplier:.3g}, C={fc.dp.clip_norm}, q={self.sample_rate:.3g}, "
                   f"delta={fc.dp.delta}" if self.accountant is not None else "no DP")
        tqdm.write(f"slimtrain federated: {count_parameters(self.model) / 1e6:.2f}M parameters ({cfg.model.name}), "
                   f"{fc.clients} clients ({fc.partition}), {len(self.data.train)} train / {len(self.data.eval)} eval "
                   f"blocks, strategy {fc.strategy}, client optimizer {cfg.optim.name}, {dp_text}"
                   + (f", resumed from {self.resumed_from} (epsilon so far {self.epsilon:.3f})"
                      if self.resumed_from and self.accountant is not None else
                      f", resumed from {self.resumed_from}" if self.resumed_from else ""))
        bar = tqdm(total=fc.rounds, initial=min(self.round, fc.rounds), disable=not fc.progress, unit="round",
                   dynamic_ncols=True)
        start, rounds_this_run, clients_this_run = time.perf_counter(), 0, 0
        eval_loss = math.nan
        try:
            while self.round < fc.rounds and not self._budget_exhausted():
                record = self.run_round(say=tqdm.write)
                rounds_this_run += 1
                clients_this_run += record["replied"]
                last = self.round == fc.rounds
                if (fc.eval_every and self.round % fc.eval_every == 0) or last:
                    eval_loss = self.evaluate()
                    record["eval_loss"] = eval_loss
                record["peak_rss_mb"] = peak_memory_mb(torch.device("cpu"))
                writer.write(record)
                bar.update(1)
                eps = record.get("epsilon")
                bar.set_postfix(eval=f"{eval_loss:.3f}", eps="-" if eps is None else f"{eps:.2f}")
                tqdm.write(f"round {self.round}/{fc.rounds}: eval loss "
                           + (f"{record['eval_loss']:.4f}" if "eval_loss" in record else "-")
                           + (f" | epsilon {eps:.3f} (delta {fc.dp.delta})" if eps is not None else "")
                           + f" | up {record['bytes_up'] / 2**20:.2f} MiB, down {record['bytes_down'] / 2**20:.2f} MiB"
                           + f" | clients replied {record['replied']}/{record['sampled']} sampled"
                           + (f" ({len(record['dropped'])} dropped)" if record["dropped"] else ""))
                if last or (fc.checkpoint_every and self.round % fc.checkpoint_every == 0):
                    self.save()
            if self.stop_reason:
                tqdm.write(f"stopped before round {self.round + 1}: {self.stop_reason}")
                if self.last_checkpoint is None or not self.last_checkpoint.endswith(f"{self.round:08d}"):
                    self.save()
            wall = time.perf_counter() - start
            if math.isnan(eval_loss):
                eval_loss = self.evaluate()
        finally:
            bar.close()
            writer.close()
        summary = {
            "rounds": self.round,
            "rounds_this_run": rounds_this_run,
            "clients": fc.clients,
            "parameters": count_parameters(self.model),
            "epsilon": self.epsilon if self.accountant is not None else None,
            "delta": fc.dp.delta if self.accountant is not None else None,
            "noise_multiplier": self.noise_multiplier if self.accountant is not None else None,
            "stop_reason": self.stop_reason or "rounds done",
            "final_eval_loss": eval_loss,
            "wall_time_s": wall,
            "clients_per_minute": clients_this_run / wall * 60 if wall > 0 else 0.0,
            "client_rounds": self.totals["client_rounds"],
            "dropped_clients": self.totals["dropped"],
            "bytes_up": self.totals["bytes_up"],
            "bytes_down": self.totals["bytes_down"],
            "peak_rss_mb": peak_memory_mb(torch.device("cpu")),
            "client_store_mb": self.store.disk_bytes() / 2**20,
            "checkpoint": self.last_checkpoint,
        }
        return finish_run(cfg.output_dir, summary, tqdm.write, x="round", curves=ROUND_CURVES,
                          twin=("epsilon", "epsilon", "k--"))


__all__ = ["FederatedSimulation"]
