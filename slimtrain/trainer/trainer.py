"""The training loop: config -> build (distributed, data, model, optimizer, engine) -> train -> close.

The pieces live beside this file, in the order a run uses them: :mod:`.distributed` (process
group and device), :mod:`.engines` (how a step is synced and applied, chosen from the optimizer's
declared spec; refused combinations), :mod:`.steps` (the backprop and the zeroth-order step as
functions), :mod:`.schedule` (the LR schedule); config, data, model, checkpoint files, metrics
and the run wrap-up are shared with the federated mode in :mod:`slimtrain.run`.

Batches: position ``i`` of the global sample stream is a fixed block (see :class:`BlockOrder`);
step ``s``, micro-batch ``m`` on rank ``r`` reads positions
``(s * grad_accum + m) * world * batch_size + r * batch_size`` onwards, so 2 ranks x batch b sees
exactly the samples of 1 rank x batch 2b.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
import warnings

import numpy as np
import torch

from ..optim.registry import available_optimizers, build_optimizer, optimizer_spec
from ..parallel.fsdp import shard_model
from ..run import checkpoint as ckpt
from ..run.config import TRAIN_RESUME_SCHEDULE, Config, ConfigError, check_resume_config, optimizer_kwargs, to_dict
from ..run.data import BlockOrder, build_tokenizer
from ..run.export import export_model
from ..run.guard import DivergenceGuard
from ..run.layerwise import check_layerwise_config
from ..run.metrics import MetricsWriter, peak_memory_mb
from ..run.resume import rescale_lr
from ..run.rundir import claim_output_dir
from ..run.tasks import build_task, format_metrics
from ..run.model import build_model, count_parameters
from ..run.wrapup import finish_run, write_run_config
from .distributed import setup_distributed
from .engines import build_engine, check_combination
from .schedule import warmup_cosine
from .steps import StepOutcome, backprop_step, zeroth_order_step


class TrainingStopped(RuntimeError):
    """Training stopped on bad input (non-finite loss / gradients, divergence); the message names a
    verified checkpoint to resume from."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_optimizer_spec(cfg: Config):
    """What the optimizer ``cfg.optim`` names can do, known before it is built."""
    known = available_optimizers()
    if cfg.optim.name not in known:
        raise ConfigError(f"optim.name={cfg.optim.name!r}: allowed choices are {known}")
    return optimizer_spec(cfg.optim.name, **optimizer_kwargs(cfg.optim))


def build_run_optimizer(cfg: Config, model):
    """The optimizer ``cfg.optim`` names, over ``model``, with every config error named."""
    known = available_optimizers()
    if cfg.optim.name not in known:
        raise ConfigError(f"optim.name={cfg.optim.name!r}: allowed choices are {known}")
    try:
        return build_optimizer(cfg.optim.name, model, **optimizer_kwargs(cfg.optim))
    except (TypeError, ValueError) as e:  # an argument the optimizer does not take, or a bad value
        raise ConfigError(f"optim.name={cfg.optim.name!r} with optim.lr={cfg.optim.lr!r} optim.args={cfg.optim.args!r}: "
                          f"{e}") from None


class Trainer:
    """Train ``cfg`` (see :mod:`slimtrain.run.config`); ``resume`` is a checkpoint directory,
    ``True`` (the newest verified one under ``<output_dir>/checkpoints``) or None. The output
    directory is locked until :meth:`close`; ``overwrite`` lets a fresh run delete another run's
    checkpoints there (refused otherwise)."""

    def __init__(self, cfg: Config, resume: str | bool | None = None, overwrite: bool = False):
        self.cfg = cfg
        self.overwrite = overwrite
        self.run_lock = None
        self.dist = setup_distributed(cfg.dist.engine)
        self.world, self.rank, self.device = self.dist.world, self.dist.rank, self.dist.device
        try:
            self._build(resume)
        except BaseException:
            self.close()  # a bad config must not leave a process group behind
            raise

    def _build(self, resume) -> None:
        cfg = self.cfg
        # before anything is read, deleted or written there
        self.run_lock = claim_output_dir(cfg.output_dir, resuming=bool(resume), overwrite=self.overwrite,
                                         command="train", rank=self.rank)
        check_layerwise_config(cfg)  # before anything is built: what a layer-wise run cannot have
        seed_everything(cfg.train.seed)
        self.ckpt_root = os.path.join(cfg.output_dir, "checkpoints")

        self.tokenizer = build_tokenizer(cfg.data, cfg.model)
        self.task = build_task(cfg.data, self.tokenizer)  # lm / sft / classification: batches and metrics
        self.order = BlockOrder(self.task.n_train, cfg.train.seed)

        torch.manual_seed(cfg.train.seed)  # model init depends on the seed only, not on data loading
        self.model = build_model(cfg.model, self.tokenizer.vocab_size, cfg.data.seq_len,
                                 self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, seed=cfg.train.seed,
                                 progress=cfg.train.progress and self.rank == 0).to(self.device)
        if cfg.dist.engine == "fsdp":  # the optimizer must be built over the sharded parameters
            check_combination(cfg, run_optimizer_spec(cfg), self._say)
            shard_model(self.model, bf16=cfg.train.bf16, cpu_offload=cfg.dist.fsdp_cpu_offload)
        self.optimizer = build_run_optimizer(cfg, self.model)
        self.spec = run_optimizer_spec(cfg)
        check_combination(cfg, self.spec, self._say)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(cfg.train.warmup_steps, cfg.train.steps, cfg.train.min_lr_ratio))
        self.engine = build_engine(cfg, self.model, self.optimizer, self.spec, self.dist)

        self.step = 0
        self.nan_skips = 0
        self.resumed_from = None
        self.divergence = DivergenceGuard(cfg.train.divergence_margin)
        if resume:
            self._load(ckpt.resolve_resume(self.ckpt_root, resume))
        self.last_checkpoint = ckpt.latest_good_checkpoint(self.ckpt_root, warn=False)

    # ------------------------------------------------------------------ data and loss
    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size * self.cfg.train.grad_accum * self.world

    def micro_batches(self, step: int):
        """The micro-batches of ``step`` on this rank, read lazily: the task's model inputs
        (``input_ids`` / ``labels`` / ``attention_mask``, (B, T))."""
        b, ga = self.cfg.train.batch_size, self.cfg.train.grad_accum
        for m in range(ga):
            start = (step * ga + m) * self.world * b + self.rank * b
            yield {k: v.to(self.device) for k, v in self.task.batch(self.order.blocks(start, b)).items()}

    def _autocast(self):
        if not self.cfg.train.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def loss_of(self, module, batch: dict) -> torch.Tensor:
        with self._autocast():
            return module(**batch).loss.float()

    def run_step(self) -> StepOutcome:
        """One optimizer step of the configured kind (the schedule advances in the loop)."""
        cfg = self.cfg.train
        if self.spec.zeroth_order:
            return zeroth_order_step(self.optimizer, self.micro_batches(self.step), self.loss_of, self.engine,
                                     self.dist, cfg.grad_accum)
        return backprop_step(self.engine, self.micro_batches(self.step), self.loss_of, self.dist, cfg.grad_accum,
                             cfg.max_grad_norm)

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict:
        """The task's held-out metrics (``eval_loss`` and ``eval_ppl`` or ``eval_accuracy``), sharded over ranks."""
        self.model.eval()
        rank, world = self.engine.eval_ranks()
        metrics = self.task.evaluate(self.model, self.cfg.train.batch_size, self.device, rank, world, self._autocast)
        self.engine.after_forward_without_backward()
        self.model.train()
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> str | None:
        """Checkpoint the current step; on a failed write (e.g. disk full) warn and keep the last good one."""
        trainer_state = {"step": self.step, "data_position": self.step * self.global_batch, "world_size": self.world,
                         "scheduler": self.scheduler.state_dict(), "nan_skips": self.nan_skips,
                         "config": to_dict(self.cfg), "initial_eval_loss": self.divergence.initial}
        try:
            path = ckpt.save_checkpoint(self.ckpt_root, self.step, rank=self.rank, trainer_state=trainer_state,
                                        keep=self.cfg.checkpoint.keep, **self.engine.checkpoint_parts())
        except ckpt.NonFiniteState as e:
            raise TrainingStopped(f"{e}. {self._resume_hint()}") from None
        except OSError as e:
            self._say(f"WARNING: could not save the checkpoint of step {self.step} ({e}); training goes on, "
                      f"the last good checkpoint is {self.last_checkpoint}")
            return None
        self.last_checkpoint = path
        return path

    def _load(self, path: str) -> None:
        state = ckpt.load_file(path, "trainer.pt")
        changed = check_resume_config(path, state["config"], to_dict(self.cfg),
                                      allow_schedule_change=self.cfg.train.allow_lr_change)
        if changed:
            self._say(f"resume: applying changed settings: {'; '.join(changed)}")
        if state["world_size"] != self.world and self.rank == 0:
            warnings.warn(f"resuming a {state['world_size']}-rank checkpoint on {self.world} ranks: the data order "
                          "continues, but the run is no longer bit-identical to an uninterrupted one")
        self.engine.load(path, state["config"])
        self.scheduler.load_state_dict(state["scheduler"])
        if any(line.split(":")[0] in TRAIN_RESUME_SCHEDULE for line in changed):
            rescale_lr(self.scheduler, self.cfg.optim.lr / state["config"]["optim"]["lr"])
        self.step, self.nan_skips = state["step"], state["nan_skips"]
        self.divergence.initial = state.get("initial_eval_loss")
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
        if self.rank == 0:
            write_run_config(cfg.output_dir, cfg)
        writer = MetricsWriter(cfg.output_dir, self.step if self.resumed_from else None) if self.rank == 0 else None
        self._say(self._banner())
        tokens_per_step = self.global_batch * cfg.data.seq_len
        bar = tqdm(total=cfg.train.steps, initial=self.step, disable=self.rank != 0 or not cfg.train.progress,
                   unit="step", dynamic_ncols=True)
        self.model.train()
        if self.divergence.enabled and self.divergence.initial is None:
            self.divergence.initial = self.evaluate()["eval_loss"]  # what the divergence check compares with
        start, trained_steps, consecutive_skips = time.perf_counter(), 0, 0
        try:
            while self.step < cfg.train.steps:
                t0 = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                outcome = self.run_step()
                consecutive_skips = 0 if outcome.applied else consecutive_skips + 1
                if not outcome.applied:
                    self._handle_skip(outcome, consecutive_skips)
                with warnings.catch_warnings():  # torch warns when no optimizer step preceded it
                    warnings.simplefilter("ignore", UserWarning)
                    self.scheduler.step()  # skipped steps too: the schedule follows the data position
                self.step += 1
                trained_steps += 1
                dt = time.perf_counter() - t0
                mem = peak_memory_mb(self.device)
                record = {"step": self.step, "loss": outcome.loss, "lr": lr, "tokens_per_s": tokens_per_step / dt,
                          "peak_mem_mb": mem}
                if math.isfinite(outcome.grad_norm):
                    record["grad_norm"] = outcome.grad_norm
                bar.update(1)
                bar.set_postfix(loss=f"{outcome.loss:.3f}", tok_s=f"{tokens_per_step / dt:.0f}", mem=f"{mem:.0f}MB")
                if writer and (self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps):
                    writer.write(record)
                last = self.step == cfg.train.steps
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and not last:
                    self._evaluate_and_log(writer)
                if last or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                    self.save()
            train_time = time.perf_counter() - start
            metrics = self._evaluate_and_log(writer, say=False)
            if cfg.export.dir:  # a Hugging Face directory of the final weights
                with self.engine.full_weights():
                    export_model(self.model, cfg.export.dir, self.tokenizer, dtype=cfg.export.dtype, rank=self.rank,
                                 state=self.engine.export_state())
                self.dist.barrier()  # no rank tears the engine down while rank 0 still writes
        finally:
            bar.close()
            if writer:
                writer.close()
        summary = {
            "steps": self.step, "steps_this_run": trained_steps, "parameters": count_parameters(self.model),
            "ranks": self.world, "wall_time_s": train_time,
            "tokens_per_s": trained_steps * tokens_per_step / train_time if train_time > 0 else 0.0,
            "peak_memory_mb": peak_memory_mb(self.device),
            "peak_memory_kind": "cuda max allocated" if self.device.type == "cuda" else "rss (rank 0)",
            **{f"final_{k}": v for k, v in metrics.items()}, "nan_skips": self.nan_skips,
            "checkpoint": self.last_checkpoint, **({"export": cfg.export.dir} if cfg.export.dir else {}),
        }
        return finish_run(cfg.output_dir, summary, self._say) if self.rank == 0 else summary

    def _banner(self) -> str:
        cfg = self.cfg
        return (f"slimtrain: {count_parameters(self.model) / 1e6:.2f}M parameters ({cfg.model.name}), "
                f"optimizer {cfg.optim.name}, {self.task.describe()}, {self.world} rank(s), "
                f"engine {cfg.dist.engine} ({self.engine.name})"
                + (f", resumed from {self.resumed_from}" if self.resumed_from else ""))

    def _evaluate_and_log(self, writer, say: bool = True) -> dict:
        """Evaluate, log, and stop a run that diverged (eval loss too far above the initial one)."""
        metrics = self.evaluate()
        if writer:
            writer.write({"step": self.step, **metrics})
        if say:
            self._say(f"step {self.step}: {format_metrics(metrics)}")
        why = self.divergence.check(metrics["eval_loss"], self.step)
        if why is not None:
            raise TrainingStopped(f"{why}. {self._resume_hint()} with a lower optim.lr (--allow-lr-change), or "
                                  "raise train.divergence_margin (0 turns the check off)")
        return metrics

    def _resume_hint(self) -> str:
        good = ckpt.latest_good_checkpoint(self.ckpt_root, warn=False) if self.rank == 0 else self.last_checkpoint
        return (f"resume with: slimtrain train ... --resume {good}" if good
                else "no checkpoint was written yet; restart from scratch")

    def _handle_skip(self, outcome: StepOutcome, consecutive: int) -> None:
        """A step that was not applied: stop (policy, limit, zeroth-order) or warn and go on."""
        self.nan_skips += 1
        policy = self.cfg.train
        if policy.nan_policy == "stop" or self.spec.zeroth_order or consecutive > policy.max_nan_skips:
            raise TrainingStopped(self._nan_message(outcome.loss, consecutive))
        self._say(f"WARNING: non-finite loss or gradients (loss {outcome.loss}) at step {self.step + 1}; step skipped "
                  f"({consecutive} in a row, limit train.max_nan_skips={policy.max_nan_skips})")

    def _nan_message(self, loss: float, skips: int) -> str:
        why = "train.nan_policy=stop" if self.cfg.train.nan_policy == "stop" else (
            f"{skips} consecutive skipped steps > train.max_nan_skips" if not self.spec.zeroth_order
            else "a zeroth-order step cannot be skipped")
        what = f"non-finite loss {loss}" if not math.isfinite(loss) else f"non-finite gradients (loss {loss})"
        return (f"{what} at step {self.step + 1} ({why}); parameters from that step were not applied. "
                f"{self._resume_hint()} (consider a lower optim.lr, train.bf16=false, or train.nan_policy=skip)")

    def close(self) -> None:
        if self.run_lock is not None:
            self.run_lock.release()
        self.dist.close()


__all__ = ["Trainer", "TrainingStopped", "build_run_optimizer", "seed_everything", "warmup_cosine"]
