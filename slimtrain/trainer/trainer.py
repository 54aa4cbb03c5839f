"""The training loop: config -> build (distributed, data, model, optimizer, engine) -> train -> close.

Distribution is chosen by ``dist.engine``:

- ``torch``: the model stays a plain module and :class:`slimtrain.parallel.DataParallelOptimizer`
  synchronises after the last micro-batch: gradients that exist are averaged over ranks (what
  DDP does, but tolerant of parameters whose ``grad`` is None or whose ``requires_grad``
  changes between steps, as LISA needs), GaLore matrices exchange projected gradients
  (``dist.lowrank_sync``), and ``dist.zero_stage`` 1/2 shards optimizer state by whole tensors.
  A layer-wise optimizer averages each gradient inside its backward hook instead.
- ``deepspeed``: a DeepSpeed engine wraps model and optimizer and does the gradient scaling for
  accumulation, the all-reduce, clipping, and (ZeRO >= 1) partitioned optimizer state. ZeRO
  flattens parameters into 1-D partitions, which a shape-dependent optimizer (GaLore) cannot
  use, so at stages 1/2 those take the ``torch`` path above (DeepSpeed still launches and
  forms the process group); stage 3 with them is refused with the alternatives.

Zeroth-order optimizers (``optimizer.zeroth_order``, MeZO) never run backward: the trainer calls
``optimizer.step(closure)`` with a closure that returns the rank-averaged loss under
``torch.no_grad()``; they run on the plain module under either engine (DeepSpeed has nothing to
add without a backward), with no clipping.

Batches: position ``i`` of the global sample stream is a fixed block (see :class:`BlockOrder`);
step ``s``, micro-batch ``m`` on rank ``r`` reads positions
``(s * grad_accum + m) * world * batch_size + r * batch_size`` onwards, so 2 ranks x batch b sees
exactly the samples of 1 rank x batch 2b.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import socket
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import yaml

from ..optim.galore_base import GaLoreOptimizerBase
from ..optim.qgalore import QGaLoreAdamW8bit
from ..optim.registry import available_optimizers, build_optimizer
from ..parallel.data_parallel import DataParallelOptimizer, galore_optimizer_of
from ..run import checkpoint as ckpt
from ..run.config import Config, ConfigError, to_dict
from ..run.data import BlockOrder, build_tokenizer, pack
from ..run.metrics import MetricsWriter, format_summary, peak_memory_mb, plot_losses, read_metrics
from ..run.layerwise import check_layerwise_config
from ..run.model import build_model, count_parameters


class TrainingStopped(RuntimeError):
    """Training stopped on bad input (non-finite loss); the message names the checkpoint to resume from."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier for update ``s`` (0-based): linear warmup, then cosine to ``min_ratio``."""

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def is_shape_dependent(optimizer) -> bool:
    return (isinstance(optimizer, GaLoreOptimizerBase) or galore_optimizer_of(optimizer) is not None
            or bool(getattr(optimizer, "shape_dependent", False)))


class Trainer:
    """Train ``cfg`` (see :mod:`slimtrain.run.config`); ``resume`` is a checkpoint directory,
    ``True`` (the newest one under ``<output_dir>/checkpoints``) or None."""

    def __init__(self, cfg: Config, resume: str | bool | None = None):
        self.cfg = cfg
        self._owns_pg = False
        self._setup_distributed()
        try:
            self._build(resume)
        except BaseException:
            self.close()  # a bad config must not leave a process group behind
            raise

    def _build(self, resume) -> None:
        cfg = self.cfg
        check_layerwise_config(cfg)  # before anything is built: what a layer-wise run cannot have
        self._seed_everything(cfg.train.seed)
        self.ckpt_root = os.path.join(cfg.output_dir, "checkpoints")

        self.tokenizer = build_tokenizer(cfg.data)
        self.data = pack(cfg.data, self.tokenizer)
        self.order = BlockOrder(len(self.data.train), cfg.train.seed)

        torch.manual_seed(cfg.train.seed)  # model init depends on the seed only, not on data loading
        self.model = build_model(cfg.model, self.tokenizer.vocab_size, cfg.data.seq_len,
                                 self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, seed=cfg.train.seed,
                                 progress=cfg.train.progress and self.rank == 0).to(self.device)
        self.optimizer = self._build_optimizer()
        self.zeroth_order = bool(getattr(self.optimizer, "zeroth_order", False))
        self.layerwise = bool(getattr(self.optimizer, "layerwise", False))
        self._check_combination()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(cfg.train.warmup_steps, cfg.train.steps, cfg.train.min_lr_ratio))
        self.engine = self._build_engine()
        self.dp = None
        if self.engine is None and not self.zeroth_order and not self.layerwise:
            self.dp = DataParallelOptimizer(self.optimizer, zero_stage=cfg.dist.zero_stage,
                                            lowrank=cfg.dist.lowrank_sync)
        if self.layerwise and self.world > 1:
            self.optimizer.grad_reducer = self._average_in_place

        self.step = 0
        self.nan_skips = 0
        self.resumed_from = None
        if resume:
            self._load(ckpt.resolve_resume(self.ckpt_root, resume))
        self.last_checkpoint = ckpt.latest_checkpoint(self.ckpt_root)

    # ------------------------------------------------------------------ build
    def _setup_distributed(self) -> None:
        env = os.environ
        self.world = int(env.get("WORLD_SIZE", "1"))
        self.rank = int(env.get("RANK", "0"))
        self.local_rank = int(env.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", self.local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        backend = "nccl" if cuda else "gloo"
        if self.cfg.dist.engine == "deepspeed":
            if not cuda:
                # DeepSpeed picks its accelerator when first imported; without CUDA it must be cpu.
                os.environ.setdefault("DS_ACCELERATOR", "cpu")
            if "MASTER_ADDR" not in env:  # a single process started without any launcher
                env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0")
            import deepspeed

            self._owns_pg = not dist.is_initialized()
            deepspeed.init_distributed(dist_backend=backend)
        elif self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend)
            self._owns_pg = True
        if dist.is_initialized():
            self.world, self.rank = dist.get_world_size(), dist.get_rank()

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _build_optimizer(self):
        cfg = self.cfg.optim
        known = available_optimizers()
        if cfg.name not in known:
            raise ConfigError(f"optim.name={cfg.name!r}: allowed choices are {known}")
        kwargs = {"lr": cfg.lr, **cfg.args}
        try:
            return build_optimizer(cfg.name, self.model, **kwargs)
        except (TypeError, ValueError) as e:  # an argument the optimizer does not take, or a bad value
            raise ConfigError(f"optim.name={cfg.name!r} with optim.lr={cfg.lr!r} optim.args={cfg.args!r}: {e}") from None

    @property
    def _route_around_zero(self) -> bool:
        """DeepSpeed ZeRO 1/2 requested for an optimizer that needs whole matrices: slimtrain shards instead."""
        cfg = self.cfg
        # At stage 0 the engine could carry GaLore (whole tensors), but it all-reduces full
        # gradients; low-rank sync is slimtrain's, so the engine only stays with lowrank_sync off.
        return (cfg.dist.engine == "deepspeed" and is_shape_dependent(self.optimizer) and not self.zeroth_order
                and not self.layerwise and (cfg.dist.zero_stage in (1, 2) or cfg.dist.lowrank_sync))

    def _check_combination(self) -> None:
        cfg = self.cfg
        stage = cfg.dist.zero_stage
        if stage == 3 and is_shape_dependent(self.optimizer):
            raise ConfigError(
                f"dist.zero_stage=3 with optim.name={cfg.optim.name!r}: ZeRO-3 hands the optimizer flat 1-D "
                "partitions of every parameter, but this optimizer needs each weight's matrix shape (GaLore "
                "projects gradients). Use dist.zero_stage=2 (slimtrain shards optimizer state by whole tensors and "
                "syncs projected gradients), or a shape-independent optimizer such as adamw with ZeRO-3. "
                "docs/distributed.md describes how parameter sharding would carry GaLore.")
        if stage >= 1 and isinstance(self.optimizer, QGaLoreAdamW8bit):
            raise ConfigError(
                f"dist.zero_stage={stage} with optim.name={cfg.optim.name!r}: its INT8 weights are updated with "
                "their group scales outside torch's parameter machinery and are not sharded yet; use "
                "dist.zero_stage=0 (data parallel, gradients of the INT8 weights averaged) or galore_adamw8bit")
        if self._route_around_zero and self.rank == 0:
            why = (f"DeepSpeed ZeRO-{stage} would flatten parameters into 1-D partitions, which {cfg.optim.name} "
                   f"cannot use; slimtrain shards its optimizer state by whole tensors instead (ZeRO-{stage} "
                   "semantics)" if stage else
                   f"the DeepSpeed engine would all-reduce full gradients; slimtrain syncs {cfg.optim.name}'s "
                   "projected gradients instead (dist.lowrank_sync=false keeps the engine)")
            self._say(f"note: {why}; DeepSpeed provides the launch and the process group")
        if cfg.dist.engine == "deepspeed" and cfg.train.nan_policy == "skip" and not self.zeroth_order:
            raise ConfigError("train.nan_policy='skip' with dist.engine='deepspeed': the engine applies every "
                              "accumulated step; use train.nan_policy=stop or dist.engine=torch")
        if self.layerwise:
            if cfg.dist.engine == "deepspeed" or stage > 0:
                raise ConfigError(f"optim.args.layerwise=True with dist.engine={cfg.dist.engine!r} "
                                  f"dist.zero_stage={stage}: the layer-wise mode updates each weight inside "
                                  "backward, right after averaging its gradient over ranks itself; use "
                                  "dist.engine=torch dist.zero_stage=0 (optimizer state is replicated)")
            if getattr(self.optimizer, "accumulation_steps", 1) != cfg.train.grad_accum:
                raise ConfigError(f"optim.args.accumulation_steps must equal train.grad_accum="
                                  f"{cfg.train.grad_accum} for a layer-wise optimizer")

    def _build_engine(self):
        cfg = self.cfg
        if self._route_around_zero:
            return None
        if cfg.dist.engine != "deepspeed" or self.zeroth_order:
            if cfg.dist.engine == "deepspeed" and self.rank == 0:
                warnings.warn(f"{cfg.optim.name} is zeroth-order (no backward): it runs on the plain model, "
                              "DeepSpeed only provides the process group")
            return None
        import deepspeed

        user = {}
        if cfg.dist.deepspeed_config:
            with open(cfg.dist.deepspeed_config) as fh:
                user = json.load(fh)
        for key in ("fp16", "bf16"):
            if user.get(key, {}).get("enabled"):
                raise ConfigError(f"dist.deepspeed_config enables {key}: slimtrain keeps fp32 parameters and "
                                  "optimizer state and autocasts instead; remove it and set train.bf16=true")
        zero = {**user.get("zero_optimization", {}), "stage": cfg.dist.zero_stage}
        ds = {**user, "train_micro_batch_size_per_gpu": cfg.train.batch_size,
              "gradient_accumulation_steps": cfg.train.grad_accum,
              "train_batch_size": cfg.train.batch_size * cfg.train.grad_accum * self.world,
              "gradient_clipping": cfg.train.max_grad_norm, "zero_optimization": zero,
              "steps_per_print": user.get("steps_per_print", 10**9)}
        engine, optimizer, _, _ = deepspeed.initialize(model=self.model, optimizer=self.optimizer, config=ds)
        self.ds_optimizer = optimizer
        return engine

    # ------------------------------------------------------------------ data
    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.grad_accum * self.world

    def _micro_batch(self, step: int, micro: int) -> torch.Tensor:
        b = self.cfg.train.batch_size
        start = (step * self.cfg.train.grad_accum + micro) * self.world * b + self.rank * b
        return self.data.train[self.order.blocks(start, b)].to(self.device)  # (B, T)

    def _autocast(self):
        if not self.cfg.train.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _loss(self, module, ids: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return module(input_ids=ids, labels=ids).loss.float()

    def _average_in_place(self, t: torch.Tensor) -> None:
        dist.all_reduce(t)
        t /= self.world

    def _mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world
        return value

    # ------------------------------------------------------------------ one step
    def _step_zeroth_order(self, step: int) -> tuple[torch.Tensor, float]:
        ga = self.cfg.train.grad_accum
        batches = [self._micro_batch(step, m) for m in range(ga)]
        seen = []

        def closure():
            with torch.no_grad():
                total = sum(self._loss(self.model, ids) for ids in batches) / ga
                total = self._mean_over_ranks(total)
            seen.append(total)
            return total

        returned = self.optimizer.step(closure)
        loss = returned if isinstance(returned, torch.Tensor) else seen[0]
        self.scheduler.step()
        return loss.detach().float(), float("nan")

    def _step_backprop(self, step: int) -> tuple[torch.Tensor, float, bool]:
        ga = self.cfg.train.grad_accum
        total = torch.zeros((), device=self.device)
        module = self.engine if self.engine is not None else self.model
        for m in range(ga):
            ids = self._micro_batch(step, m)
            loss = self._loss(module, ids)
            if self.engine is not None:
                self.engine.backward(loss)  # the engine divides by grad_accum
            else:
                (loss / ga).backward()
            total += loss.detach() / ga
        total = self._mean_over_ranks(total)
        finite = bool(torch.isfinite(total))
        grad_norm = float("nan")
        if self.engine is not None:
            if not finite:
                return total, grad_norm, False
            for _ in range(ga):  # the engine counts micro-steps; only the last one updates
                self.engine.step()
            norm = self.engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else float("nan")
        else:
            if not finite:
                self.optimizer.zero_grad(set_to_none=True)
                return total, grad_norm, False
            if self.layerwise:
                self.optimizer.step()  # flushes what the hooks did not update
            else:
                self.dp.sync_gradients()
                if self.cfg.train.max_grad_norm > 0:
                    grad_norm = self.dp.clip_grad_norm_(self.cfg.train.max_grad_norm)
                self.dp.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return total, grad_norm, True

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Mean loss over the held-out blocks (sharded over ranks, summed exactly) and perplexity."""
        self.model.eval()
        blocks = self.data.eval
        b = self.cfg.train.batch_size
        mine = blocks[self.rank:: self.world]
        stats = torch.zeros(2, dtype=torch.float64)  # (sum of per-block losses, blocks)
        for i in range(0, len(mine), b):
            ids = mine[i: i + b].to(self.device)
            loss = self._loss(self.model, ids)
            stats += torch.tensor([float(loss) * len(ids), len(ids)], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(stats)
        self.model.train()
        mean = float(stats[0] / stats[1])
        return mean, math.exp(min(mean, 50.0))

    # ------------------------------------------------------------------ checkpoints
    def _trainer_state(self) -> dict:
        return {"step": self.step, "data_position": self.step * self.global_batch, "world_size": self.world,
                "scheduler": self.scheduler.state_dict(), "nan_skips": self.nan_skips, "config": to_dict(self.cfg)}

    def save(self) -> str | None:
        """Checkpoint the current step; on a failed write (e.g. disk full) warn and keep the last good one."""
        partitioned = self.engine is not None and self.cfg.dist.zero_stage >= 1
        sharded = self.dp is not None and self.dp.sharded  # every rank holds a different part of the state
        try:
            path = ckpt.save_checkpoint(
                self.ckpt_root, self.step, rank=self.rank,
                model_state=None if partitioned else self.model.state_dict(),
                optim_state=None if partitioned or sharded else self.optimizer.state_dict(),
                trainer_state=self._trainer_state(), engine=self.engine if partitioned else None,
                keep=self.cfg.checkpoint.keep, rank_files={"optim": self.dp.state_dict()} if sharded else None)
        except OSError as e:
            self._say(f"WARNING: could not save the checkpoint of step {self.step} ({e}); training goes on, "
                      f"the last good checkpoint is {self.last_checkpoint}")
            return None
        self.last_checkpoint = path
        return path

    def _load(self, path: str) -> None:
        state = ckpt.load_file(path, "trainer.pt")
        if state["world_size"] != self.world and self.rank == 0:
            warnings.warn(f"resuming a {state['world_size']}-rank checkpoint on {self.world} ranks: the data order "
                          "continues, but the run is no longer bit-identical to an uninterrupted one")
        if os.path.isdir(os.path.join(path, "deepspeed")):
            if self.engine is None or self.cfg.dist.zero_stage == 0:
                raise ConfigError(f"{path!r} was saved with ZeRO >= 1 (DeepSpeed format); resume it with "
                                  f"dist.engine=deepspeed dist.zero_stage={state['config']['dist']['zero_stage']}")
            self.engine.load_checkpoint(os.path.join(path, "deepspeed"), tag="state", load_lr_scheduler_states=False)
        else:
            self.model.load_state_dict(ckpt.load_file(path, "model.pt"))
            shards = ckpt.load_rank_files(path, "optim")
            if not shards:  # replicated state: one file, valid for any number of ranks
                full = ckpt.load_file(path, "optim.pt")
                if self.dp is None or not self.dp.sharded:
                    self.optimizer.load_state_dict(full)
                    shards = None
                else:
                    shards = [{"world_size": 1, "zero_stage": 0, "owners": torch.full((len(self.dp.owners),), -1),
                               "optimizer": full}]
            if shards is not None:
                if self.dp is None:
                    raise ConfigError(f"{path!r} holds optimizer state sharded over {len(shards)} ranks "
                                      f"(dist.zero_stage={state['config']['dist']['zero_stage']}); resume it with "
                                      "dist.engine=torch and any dist.zero_stage (the shards are merged)")
                self.dp.load_state_dict(shards)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.nan_skips = state["step"], state["nan_skips"]
        if state["data_position"] != self.step * self.global_batch and self.rank == 0:
            warnings.warn(f"the global batch changed since the checkpoint ({state['data_position']} samples "
                          f"after {self.step} steps); the data order continues from step {self.step}")
        rng_file = f"rng_rank{self.rank}.pt"
        if os.path.exists(os.path.join(path, rng_file)):
            ckpt.set_rng_state(ckpt.load_file(path, rng_file))
        self.resumed_from = path

    # ------------------------------------------------------------------ loop
    def _say(self, msg: str) -> None:
        if self.rank == 0:
            from tqdm import tqdm

            tqdm.write(msg)

    def train(self) -> dict:
        """Run to ``train.steps``; returns the summary (also written to ``summary.json``)."""
        from tqdm import tqdm

        cfg = self.cfg
        os.makedirs(cfg.output_dir, exist_ok=True)
        if self.rank == 0:
            with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as fh:
                yaml.safe_dump(to_dict(cfg), fh, sort_keys=False)
        writer = MetricsWriter(cfg.output_dir, self.step if self.resumed_from else None) if self.rank == 0 else None
        self._say(f"slimtrain: {count_parameters(self.model) / 1e6:.2f}M parameters ({cfg.model.name}), "
                  f"optimizer {cfg.optim.name}, {len(self.data.train)} train / {len(self.data.eval)} eval blocks of "
                  f"{cfg.data.seq_len} tokens, {self.world} rank(s), engine {cfg.dist.engine}"
                  + (f", resumed from {self.resumed_from}" if self.resumed_from else ""))
        tokens_per_step = self.global_batch * cfg.data.seq_len
        bar = tqdm(total=cfg.train.steps, initial=self.step, disable=self.rank != 0 or not cfg.train.progress,
                   unit="step", dynamic_ncols=True)
        self.model.train()
        start, trained_steps, consecutive_skips = time.perf_counter(), 0, 0
        try:
            while self.step < cfg.train.steps:
                t0 = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                if self.zeroth_order:
                    loss, grad_norm = self._step_zeroth_order(self.step)
                    ok = bool(torch.isfinite(loss))
                else:
                    loss, grad_norm, ok = self._step_backprop(self.step)
                loss = float(loss)
                if not ok or not math.isfinite(loss):
                    consecutive_skips += 1
                    self.nan_skips += 1
                    if cfg.train.nan_policy == "stop" or self.zeroth_order or consecutive_skips > cfg.train.max_nan_skips:
                        raise TrainingStopped(self._nan_message(loss, consecutive_skips))
                    self._say(f"WARNING: non-finite loss {loss} at step {self.step + 1}; step skipped "
                              f"({consecutive_skips} in a row, limit train.max_nan_skips={cfg.train.max_nan_skips})")
                    with warnings.catch_warnings():  # torch warns when no optimizer step preceded it
                        warnings.simplefilter("ignore", UserWarning)
                        self.scheduler.step()  # the schedule stays aligned with the data position
                else:
                    consecutive_skips = 0
                self.step += 1
                trained_steps += 1
                dt = time.perf_counter() - t0
                mem = peak_memory_mb(self.device)
                record = {"step": self.step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_step / dt,
                          "peak_mem_mb": mem}
                if math.isfinite(grad_norm):
                    record["grad_norm"] = grad_norm
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:.0f}", mem=f"{mem:.0f}MB")
                if writer and (self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps):
                    writer.write(record)
                last = self.step == cfg.train.steps
                if (cfg.train.eval_every and self.step % cfg.train.eval_every == 0) and not last:
                    eval_loss, ppl = self.evaluate()
                    if writer:
                        writer.write({"step": self.step, "eval_loss": eval_loss, "eval_ppl": ppl})
                    self._say(f"step {self.step}: eval loss {eval_loss:.4f}, perplexity {ppl:.2f}")
                if last or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                    self.save()
            train_time = time.perf_counter() - start
            eval_loss, ppl = self.evaluate()
            if writer:
                writer.write({"step": self.step, "eval_loss": eval_loss, "eval_ppl": ppl})
        finally:
            bar.close()
            if writer:
                writer.close()
        summary = {
            "steps": self.step,
            "steps_this_run": trained_steps,
            "parameters": count_parameters(self.model),
            "ranks": self.world,
            "wall_time_s": train_time,
            "tokens_per_s": trained_steps * tokens_per_step / train_time if train_time > 0 else 0.0,
            "peak_memory_mb": peak_memory_mb(self.device),
            "peak_memory_kind": "cuda max allocated" if self.device.type == "cuda" else "rss (rank 0)",
            "final_eval_loss": eval_loss,
            "final_eval_ppl": ppl,
            "nan_skips": self.nan_skips,
            "checkpoint": self.last_checkpoint,
        }
        if self.rank == 0:
            metrics = read_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"))
            summary["loss_plot"] = plot_losses(metrics, os.path.join(cfg.output_dir, "loss.png"))
            with open(os.path.join(cfg.output_dir, "summary.json"), "w") as fh:
                json.dump(summary, fh, indent=2)
            self._say(format_summary(summary))
        return summary

    def _nan_message(self, loss: float, skips: int) -> str:
        resume = (f"resume with: slimtrain train ... --resume {self.last_checkpoint}" if self.last_checkpoint
                  else "no checkpoint was written yet; restart from scratch")
        why = "train.nan_policy=stop" if self.cfg.train.nan_policy == "stop" else (
            f"{skips} consecutive skipped steps > train.max_nan_skips" if not self.zeroth_order
            else "a zeroth-order step cannot be skipped")
        return (f"non-finite loss {loss} at step {self.step + 1} ({why}); parameters from that step were not "
                f"applied. {resume} (consider a lower optim.lr, train.bf16=false, or train.nan_policy=skip)")

    def close(self) -> None:
        if self._owns_pg and dist.is_initialized():
            dist.destroy_process_group()
