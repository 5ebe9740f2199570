"""The one training loop, for pretraining (mt4ssl/train/pretrain.py) and CTC fine-tuning
(mt4ssl/finetune/train.py). A task object says what differs (see `Task`); everything else is
here: devices and DDP, precision, gradient accumulation, checkpoints, exact resume, signals
and requeue, logging, validation and the best checkpoint.

One update:
  task.before_update(model, n)
  for each of `update_freq` micro-batches (DDP syncs gradients on the last one only):
      loss, sample_size, logs = task.loss(net, batch)       loss summed over the batch
      backward (through the fp16 gradient scaler when precision=fp16)
  sample_size summed over micro-batches and workers (one all-reduce, with the logs)
  gradients *= world_size / sample_size      (DDP averaged them: now sum / sample_size)
  gradient norm; a non-finite loss or norm skips the update (counted: `nonfinite`; an fp16
  overflow is the scaler's skip: `overflows`), else [clip], optimizer step, lr schedule step,
  task.after_update(model, n + 1), task.check(stats, n + 1) (on an error: save, re-raise).
This is fairseq's normalisation (masked frames for pretraining, sentences for CTC with
fairseq's sentence_avg): the result does not depend on how the global batch is split into
micro-batches and workers.

Non-finite values never reach the weights: a skipped update changes no weight, optimizer
moment, schedule step or EMA teacher (its batches are consumed; every worker sees the same
all-reduced loss and the same synchronised gradients, so all skip together). Each skip is a
warning naming the update, and log rows carry the running counts `nonfinite` and `overflows`.
After `run.max_skipped_in_a_row` skipped updates in a row the run saves checkpoint_last (the
weights of the last finite update) and stops with `TrainingStopped`. A checkpoint is never
written from weights that are not finite (`TrainingStopped` instead; the files already there
stay as they are).

Every update reseeds torch/numpy/python from (seed, rank, update): masks, dropout and
layerdrop of update n are the same in an uninterrupted run and in a resumed one, on any
number of workers. Checkpoints hold the task's model fields, optimizer, scaler, schedule and
the sampler's position, so a resumed run repeats the uninterrupted one exactly (on CPU; GPU
kernels may be nondeterministic).

`run.init_from=CKPT`: a new run (no checkpoint_last yet) starts from the weights of another
mt4ssl checkpoint (a pretraining one, a fine-tuned one, or one from `mt4ssl convert fairseq`;
`task.init_weights` says which parts it takes) with a fresh optimizer, schedule, sampler and
update counter 0. A run that has a checkpoint_last resumes from it and ignores init_from.

Validation, every `run.valid_interval` updates and after the last one, on the task's valid
split in fixed length-sorted batches of whole utterances (at most data.max_tokens), in eval
mode, without gradients, in the training's autocast precision. Rank r validates batches
r, r + W, ...; the task's sums are all-reduced once and turned into `valid_*` values by the
task. The row goes into the log row of its update; when `task.best_metric` is the lowest so
far, checkpoint_best.pt is written (the value is in the training state as
`best_<metric>`, so a resumed run keeps it).

Signals: SIGUSR1, SIGUSR2 and SIGTERM stop the run at the end of the current update, after
saving checkpoint_last; under submitit, its timeout/preemption signal (USR2) is deferred the
same way, then handed to submitit, which requeues the job, and SIGTERM (what SLURM sends on a
preemption unless the cluster sets PreemptParameters=send_user_signal, on scancel and at the
time limit, then SIGKILL after GraceTime or KillWait) saves checkpoint_last at the end of the
current update, after which the job trains no further and waits to be killed (a preempted
job is then requeued by SLURM) or for submitit's signal. DataLoader workers ignore these
signals (`ignore_stop_signals`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from mt4ssl.config import config_diff, config_from_dict, config_to_dict, save_config
from mt4ssl.data.sampler import BucketBatchSampler
from mt4ssl.errors import InputError
from mt4ssl.models.checkpoint import load_checkpoint, nonfinite_weight
from mt4ssl.models.cnn import SAMPLE_RATE
from mt4ssl.models.mt4ssl import ModelConfig
from mt4ssl.train import distributed
from mt4ssl.train.checkpoint import CheckpointDir
from mt4ssl.train.log import TrainLog
from mt4ssl.train.schedule import lr_multiplier
from mt4ssl.utils.precision import DTYPES, resolve_precision

log = logging.getLogger("mt4ssl.train")

_ACTIVE: "Trainer | None" = None  # the training running in this process, for on_preemption()


class Preempted(Exception):
    """The run stopped on a signal after saving checkpoint_last; rerun to resume."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite updates in a row, weights that are not finite); the
    message says why and which checkpoint holds the last good state."""


class Task(Protocol):
    """What a training task tells the loop. Batches are dicts of tensors (and dicts of
    tensors) with a "samples" count; stats and sums are dicts of scalar tensors."""

    name: str  # "pretrain", "finetune": the progress bar's label
    best_metric: str  # the valid_* value whose lowest value makes checkpoint_best.pt
    train_set: Dataset  # with .sizes (samples per item) and .where(i) (for error messages)
    valid_set: Dataset | None  # the same; None: no validation
    collate: Callable[[list], dict]  # dataset items -> a training batch
    find_unused_parameters: bool  # DDP: some parameters get no gradient in some updates
    log_keys: tuple[str, ...]  # keys of a log row shown on the progress line

    def build_model(self, source: dict | None) -> nn.Module:
        """A fresh model (torch is seeded with run.seed); `source` is the checkpoint the
        weights will come from (checkpoint_last or run.init_from), or None."""

    def checkpoint_state(self, model: nn.Module) -> dict:
        """The model fields of a checkpoint: "model_config", "model" and task extras."""

    def load_state(self, model: nn.Module, state: dict, where: str) -> None:
        """Load a checkpoint of this task written by checkpoint_state (resume)."""

    def init_weights(self, model: nn.Module, state: dict, where: str) -> None:
        """Take the weights of another checkpoint (run.init_from)."""

    def before_update(self, model: nn.Module, num_updates: int) -> None: ...

    def loss(self, net: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(loss summed over the batch, its sample size, stats summed over the batch)."""

    def after_update(self, model: nn.Module, num_updates: int) -> None: ...

    def check(self, stats: dict[str, float], num_updates: int) -> None:
        """Raise to stop the training (the loop saves checkpoint_last first)."""

    def log_row(self, sums: dict[str, float], updates: float) -> dict:
        """The task's values of a log row, from stats summed over the log interval."""

    def valid_batch(self, ids: list[int]) -> dict:
        """The validation batch of valid_set items `ids` (on the CPU)."""

    def valid_stats(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Sums over one validation batch (the model is in eval mode, without gradients)."""

    def valid_row(self, sums: dict[str, float]) -> dict:
        """`valid_*` values from the sums over the whole valid split."""


def seed_update(seed: int, rank: int, update: int) -> None:
    s = np.random.SeedSequence([seed, rank, update]).generate_state(2)
    torch.manual_seed(int(s[0]))
    np.random.seed(int(s[1]))
    random.seed(int(s[1]))


class Trainer:
    def __init__(self, cfg, d: distributed.Dist, task: Task):
        self.cfg, self.d, self.task = cfg, d, task
        run = cfg.run
        self.out = Path(run.out_dir)
        if run.threads:
            torch.set_num_threads(run.threads)
        self.dataset = task.train_set
        self.valid_set = task.valid_set if run.valid_interval else None
        self.valid_batches = self._valid_batches() if self.valid_set is not None else []
        self.ckpt = CheckpointDir(self.out / "checkpoints", run.keep_last)
        last, self.resumed_from = self.ckpt.load_resume(map_location=d.device) or (None, None)
        init = load_checkpoint(run.init_from, d.device) if run.init_from and last is None else None
        if init is not None and (bad := nonfinite_weight(init.get("model", {}))) is not None:
            raise InputError(f"{run.init_from}: run.init_from: weight {bad} holds NaN or infinite values "
                             f"(a diverged run?); start from an earlier checkpoint")
        torch.manual_seed(run.seed)  # the same initial weights on every rank
        self.model = task.build_model(last or init).to(d.device)
        if init is not None:
            task.init_weights(self.model, init, run.init_from)
            log.info("weights from %s (run.init_from); fresh optimizer and schedule", run.init_from)
        del init
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW if cfg.optim.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = opt(self.params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                             weight_decay=cfg.optim.weight_decay, fused=d.device.type == "cuda" or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_multiplier(cfg.optim, run.max_updates))
        self.precision, why = resolve_precision(run.precision, d.device)
        if d.main:
            log.info("precision %s (%s)", self.precision, why)
        self.dtype = DTYPES[self.precision]
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=self.precision == "fp16")
        self.sampler = BucketBatchSampler(self.dataset.sizes, cfg.data.max_tokens, seed=run.seed, rank=d.rank,
                                          world_size=d.world_size, where=self.dataset.where)
        self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=task.collate,
                                 num_workers=cfg.data.num_workers, pin_memory=d.device.type == "cuda",
                                 persistent_workers=cfg.data.num_workers > 0, worker_init_fn=ignore_stop_signals)
        self.net = self.model
        if d.enabled:
            self.net = DistributedDataParallel(
                self.model, device_ids=[d.device] if d.device.type == "cuda" else None,
                find_unused_parameters=task.find_unused_parameters)
        if run.compile:
            # torch's automatic dynamic shapes: the first batch compiles a static graph, a batch
            # of another size, crop length or mask count recompiles with those dimensions
            # dynamic. (dynamic=True from the start, torch 2.8: the label length stayed static,
            # a graph guarded frames <= the longest seen, and one failed a stride assertion.)
            # No inductor layout optimization: with it the static first graph (the CNN's convs
            # have static shapes there) keeps attention tensors channels-last, and the dynamic
            # graph's backward re-strides its saved tensors to those concrete strides, a guard
            # frames <= (or ==) the frames of the batch that compiled it, so every longer crop
            # recompiled and the label length looked static (torch 2.8; issue 11).
            self.net = torch.compile(self.net, options={"layout_optimization": False})
        self.num_updates, self.overflows = 0, 0
        self.nonfinite = 0  # updates skipped for a non-finite loss or gradient norm, in all
        self.skipped_in_a_row = 0  # updates skipped (non-finite or fp16 overflow) since the last applied one
        self.best_valid = math.inf  # the lowest task.best_metric so far (checkpoint_best.pt)
        self.sampler_state = self.sampler.state_dict()  # the position at the last update boundary
        self.saved_at = -1
        self.stop_signal: int | None = None
        self.save_soon = False  # SIGTERM under submitit: save at the end of this update, then wait
        self.updating = False  # inside train_step: the state is not consistent
        self._previous_handlers: dict = {}
        if last is not None:
            self._resume(last)

    # ------------------------------------------------------------------ checkpoints

    @property
    def best_key(self) -> str:
        return f"best_{self.task.best_metric}"

    def state(self) -> dict:
        return {**self.task.checkpoint_state(self.model),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "sampler": self.sampler_state,
                "num_updates": self.num_updates, "overflows": self.overflows, "nonfinite": self.nonfinite,
                self.best_key: self.best_valid, "train_config": config_to_dict(self.cfg)}

    def _check_finite(self) -> None:
        """TrainingStopped when a weight is not finite: such a state is never written."""
        bad = nonfinite_weight(self.model.state_dict())
        if bad is not None:
            good = self.resumed_from if self.saved_at < 0 else self.ckpt.last
            raise TrainingStopped(f"not saving update {self.num_updates}: weight {bad} holds NaN or infinite "
                                  f"values; the checkpoints in {self.ckpt.folder} are left as they were"
                                  + (f" (the last good one: {good})" if good is not None and good.exists() else ""))

    def save(self, numbered: bool = False) -> Path | None:
        """Rank 0 writes the state of the last finished update."""
        if not self.d.main:
            return None
        self._check_finite()
        path = self.ckpt.save(self.state(), self.num_updates, numbered)
        self.saved_at = self.num_updates
        log.info("saved %s (update %d)", path, self.num_updates)
        return path

    def save_best(self, same_as: Path | None) -> None:
        """Rank 0 writes checkpoint_best.pt (a hard link to `same_as`, this update's file)."""
        if self.d.main:
            self._check_finite()
            path = self.ckpt.save_best(self.state(), same_as)
            log.info("saved %s (update %d, %s %.4g)", path, self.num_updates, self.task.best_metric,
                     self.best_valid)

    def _resume(self, state: dict) -> None:
        mine = self.task.checkpoint_state(self.model)["model_config"]
        where = self.resumed_from
        # read through ModelConfig: a key added since the checkpoint was written takes its
        # default (which keeps the earlier behaviour), so a run resumes across an upgrade
        saved = config_to_dict(config_from_dict(ModelConfig, state["model_config"], f"{where}: model_config"))
        if saved != mine:
            diff = "; ".join(config_diff(saved, mine))
            raise InputError(f"{where}: made with another model config ({diff}; checkpoint -> this run); "
                             f"use a new run.out_dir or the same model settings")
        self.task.load_state(self.model, state, str(where))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.sampler_state = self.sampler.state_dict()
        self.num_updates, self.overflows = state["num_updates"], state["overflows"]
        self.nonfinite = int(state.get("nonfinite", 0))
        self.best_valid = float(state.get(self.best_key, math.inf))
        self.saved_at = self.num_updates if where == self.ckpt.last else -1  # a fallback: rewrite checkpoint_last
        log.info("resumed from %s at update %d", where, self.num_updates)

    # ------------------------------------------------------------------ one update

    def autocast(self):
        return torch.autocast(self.d.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def _to_device(self, batch: dict) -> dict:
        def move(v):
            if torch.is_tensor(v):
                return v.to(self.d.device, non_blocking=True)
            return {k: move(x) for k, x in v.items()} if isinstance(v, dict) else v

        return move(batch)

    def train_step(self, batches: list[dict]) -> dict[str, float]:
        """One update over micro-batches; returns sums over workers (see the module doc)."""
        self.updating = True
        try:
            stats = self.accumulate(batches)
            self.step(stats)
        finally:
            self.updating = False
        return stats

    def accumulate(self, batches: list[dict]) -> dict[str, float]:
        """Forward/backward over the micro-batches; leaves the gradients normalised by the
        sample size of all workers. Returns the stats summed over workers."""
        self.model.train()
        seed_update(self.cfg.run.seed, self.d.rank, self.num_updates)
        self.task.before_update(self.model, self.num_updates)
        acc: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.d.device))
        for i, batch in enumerate(batches):
            batch = self._to_device(batch)
            sync = i == len(batches) - 1 or not self.d.enabled
            with contextlib.nullcontext() if sync else self.net.no_sync():
                with self.autocast():
                    loss, sample_size, logs = self.task.loss(self.net, batch)
                self.scaler.scale(loss).backward()
            acc["sample_size"] += sample_size
            acc["loss"] += loss.detach().float()
            acc["samples"] += batch["samples"]
            acc["micro_batches"] += 1
            for key, value in logs.items():
                acc[key] += value.detach().float()
        acc["stop"] += float(self.stop_signal is not None)
        keys = sorted(acc)
        total = distributed.all_reduce_sum(torch.stack([acc[k] for k in keys]).float(), self.d)
        stats = dict(zip(keys, total.tolist()))

        self.scaler.unscale_(self.optimizer)
        if stats["sample_size"] > 0:
            torch._foreach_mul_([p.grad for p in self.params if p.grad is not None],
                                self.d.world_size / stats["sample_size"])
        return stats

    def step(self, stats: dict[str, float]) -> None:
        """Gradient norm, then clip, optimizer and schedule step and the task's after_update;
        skipped (and counted) for a non-finite loss or gradient norm, and on fp16 overflow
        (the scaler's own skip). Sets stats["grad_norm"] and stats["nonfinite"] (1 or 0)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
                     ) if grads else 0.0
        stats["grad_norm"] = norm
        scaled = self.scaler.is_enabled()
        # fp16: inf/NaN gradients of a finite loss are an overflow, the scaler skips the step
        nonfinite = not math.isfinite(stats["loss"]) or (not math.isfinite(norm) and not scaled)
        stats["nonfinite"] = float(nonfinite)
        if nonfinite:
            if scaled:
                self.scaler.update()  # ends this update's unscale_ (and halves the scale after inf gradients)
            self.nonfinite += 1
            self.skipped_in_a_row += 1
            log.warning("update %d skipped: non-finite loss %s / gradient norm %s (%d in a row, %d in all)",
                        self.num_updates + 1, stats["loss"], norm, self.skipped_in_a_row, self.nonfinite)
        else:
            clip = self.cfg.optim.clip_norm
            if clip > 0 and clip / (norm + 1e-6) < 1:
                torch._foreach_mul_(grads, clip / (norm + 1e-6))  # clip_grad_norm_'s coefficient
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if scaled and self.scaler.get_scale() < scale:
                self.overflows += 1  # fp16 overflow: the update was skipped
                self.skipped_in_a_row += 1
            else:
                self.scheduler.step()
                self.num_updates += 1
                self.skipped_in_a_row = 0
                self.task.after_update(self.model, self.num_updates)
        self.optimizer.zero_grad(set_to_none=True)
        self.sampler_state = self.sampler.state_dict()

    # ------------------------------------------------------------------ validation

    def _valid_batches(self) -> list[list[int]]:
        """The valid split's fixed batches (sorted by length, at most data.max_tokens)."""
        valid = self.valid_set
        batches = BucketBatchSampler(valid.sizes, self.cfg.data.max_tokens, shuffle=False, where=valid.where).batches
        return [b.tolist() for b in batches]

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """The task's valid_* values on the valid split, summed over workers (module doc)."""
        self.model.eval()
        batches, weight = self.valid_batches[self.d.rank::self.d.world_size], 1.0
        if not batches:  # fewer batches than workers: one with weight 0 (every rank reduces the same keys)
            batches, weight = self.valid_batches[:1], 0.0
        acc: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.d.device))
        for ids in batches:
            batch = self._to_device(self.task.valid_batch(ids))
            with self.autocast():
                values = self.task.valid_stats(self.model, batch)
            for key, value in values.items():
                acc[key] += torch.nan_to_num(torch.as_tensor(value, device=self.d.device).float()) * weight
        self.model.train()
        keys = sorted(acc)
        total = distributed.all_reduce_sum(torch.stack([acc[k] for k in keys]), self.d)
        return self.task.valid_row(dict(zip(keys, total.tolist())))

    def valid_due(self) -> bool:
        every, n = self.cfg.run.valid_interval, self.num_updates
        return every > 0 and (n % every == 0 or n >= self.cfg.run.max_updates)

    # ------------------------------------------------------------------ the loop

    def _batches(self):
        while True:
            yield from self.sampler.counted(self.loader)

    def _next_batches(self, data) -> list[dict]:
        """The next update's micro-batches; bad data (an InputError of the dataset, maybe
        from a DataLoader worker) saves the last update's state first, then is re-raised
        with its own message."""
        try:
            return [next(data) for _ in range(self.cfg.run.update_freq)]
        except InputError as e:
            message = str(e)
            if message.startswith("Caught InputError in DataLoader"):  # the worker's traceback, as text
                message = message.rstrip().splitlines()[-1].removeprefix("mt4ssl.errors.InputError: ")
            if self.num_updates > 0 and self.saved_at != self.num_updates:
                self.save()
            saved = f", saved in {self.ckpt.last}" if self.saved_at == self.num_updates else ""
            raise InputError(f"{message} (the run stopped at update {self.num_updates}{saved}; fix the data "
                             f"and run the same command again)") from None

    def _stop_if_skipping(self, stats: dict[str, float]) -> None:
        """After run.max_skipped_in_a_row skipped updates in a row: save the last finite
        update's state, log the counts and stop (TrainingStopped)."""
        limit = self.cfg.run.max_skipped_in_a_row
        if self.skipped_in_a_row < limit:
            return
        if self.saved_at != self.num_updates:
            self.save()
        what = (f"a non-finite loss ({stats['loss']:.4g}) or gradient norm ({stats['grad_norm']:.4g})"
                if stats.get("nonfinite") else "an fp16 overflow")
        raise TrainingStopped(
            f"stopped: {limit} updates in a row were skipped (run.max_skipped_in_a_row), the last for {what}; "
            f"{self.nonfinite} non-finite and {self.overflows} fp16 overflow(s) in all. No weight was changed by "
            f"them: {self.ckpt.last} holds update {self.num_updates}, the last finite one. Look for bad data "
            f"near this point of the run, or lower optim.lr / set optim.clip_norm; to go back further, copy an "
            f"earlier checkpoint_<N>.pt of {self.ckpt.folder} over checkpoint_last.pt")

    def fit(self) -> dict:
        run = self.cfg.run
        if self.num_updates >= run.max_updates:
            log.info("already finished: %d of %d updates", self.num_updates, run.max_updates)
            if self.saved_at != self.num_updates:  # resumed from a fallback: checkpoint_last is the damaged one
                self.save()
            return {"num_updates": self.num_updates, "finished": True}
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / "config.yaml")
        logger = TrainLog(self.out, run.max_updates, self.num_updates, enabled=self.d.main,
                          desc=self.task.name, shown=self.task.log_keys)
        data = self._batches()
        interval: dict[str, float] = defaultdict(float)
        t_start = t_log = time.perf_counter()
        try:
            while self.num_updates < run.max_updates:
                t0 = time.perf_counter()
                batches = self._next_batches(data)
                interval["data_wait"] += time.perf_counter() - t0
                before = self.num_updates
                stats = self.train_step(batches)
                if not stats["nonfinite"]:  # a skipped non-finite update adds nothing to the averages
                    for key, value in stats.items():
                        interval[key] += value
                interval["updates"] += self.num_updates - before
                logger.update(self.num_updates - before)
                if self.skipped_in_a_row >= run.max_skipped_in_a_row:  # the stop's row
                    logger.write({"update": self.num_updates, "nonfinite": self.nonfinite,
                                  "overflows": self.overflows, "skipped_in_a_row": self.skipped_in_a_row,
                                  "time": time.time()})
                self._stop_if_skipping(stats)
                try:
                    if not stats["nonfinite"]:  # statistics of a non-finite forward are not checked
                        self.task.check(stats, self.num_updates)
                except Exception:
                    if nonfinite_weight(self.model.state_dict()) is None:
                        self.save()
                    else:
                        log.error("not saving update %d: its weights are not finite", self.num_updates)
                    raise
                advanced, row, improved, saved = self.num_updates != before, {}, False, None
                if advanced and self.num_updates % run.log_interval == 0:
                    now = time.perf_counter()
                    row = self._log_row(interval, now - t_log)
                    interval, t_log = defaultdict(float), now
                if advanced and self.valid_due():
                    t0 = time.perf_counter()
                    valid = self.validate()
                    seconds = time.perf_counter() - t0
                    t_log += seconds  # not training time
                    row = {"update": self.num_updates, **row, **valid, "valid_seconds": seconds,
                           "time": time.time()}
                    if valid[self.task.best_metric] < self.best_valid:  # NaN never is
                        self.best_valid, improved = valid[self.task.best_metric], True
                if row:
                    logger.write(row)
                last = self.num_updates == run.max_updates  # saved here too: checkpoint_best may link to it
                if advanced and (self.num_updates % run.save_interval == 0 or last):
                    saved = self.save(numbered=True)
                if improved:
                    self.save_best(same_as=saved)
                if self.save_soon:
                    self._save_and_wait()
                if stats["stop"] > 0:
                    self._stop()
            if self.saved_at != self.num_updates:
                self.save(numbered=True)
        finally:
            logger.close()
        return {"num_updates": self.num_updates, "overflows": self.overflows, "nonfinite": self.nonfinite,
                "finished": True,
                "seconds": time.perf_counter() - t_start, "checkpoint": str(self.ckpt.last),
                self.best_key: self.best_valid}

    def _log_row(self, s: dict, seconds: float) -> dict:
        updates = max(s["updates"], 1.0)
        row = {"update": self.num_updates, **self.task.log_row(s, updates)}
        row.update({
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": s["grad_norm"] / updates,
            "audio_s_per_s": s["samples"] / SAMPLE_RATE / seconds,
            "updates_per_s": s["updates"] / seconds,
            "data_wait_frac": s["data_wait"] / seconds,
            "overflows": self.overflows,
            "nonfinite": self.nonfinite,
            "mem_gb": peak_memory_gb(self.d.device),
            "time": time.time(),
        })
        return row

    def _stop(self) -> None:
        """Save, then stop (plain signal) or hand the signal to submitit (requeue)."""
        signum, self.stop_signal = self.stop_signal, None
        self._save_last()
        distributed.barrier(self.d)  # no worker exits while rank 0 is still writing
        handler = self._previous_handlers.get(signum) if signum is not None else None
        if callable(handler) and os.environ.get("SUBMITIT_EXECUTOR"):
            handler(signum, None)  # submitit: checkpoint() -> on_preemption(), requeue, exit
        name = signal.Signals(signum).name if signum is not None else "a signal on another worker"
        raise Preempted(f"stopped by {name} at update {self.num_updates}; checkpoint saved in "
                        f"{self.ckpt.folder}; run the same command again to resume")

    def _save_last(self) -> None:
        """Make checkpoint_last hold this update: written now, or already by this update's
        numbered save (then no second write of the whole state in a job's grace time)."""
        if self.saved_at != self.num_updates:
            self.save()
        elif self.d.main:
            log.info("%s already holds update %d", self.ckpt.last, self.num_updates)

    def _save_and_wait(self) -> None:
        """After SIGTERM under submitit: save, then make no further update (it would be lost at
        the kill that follows) until the job is killed or submitit's USR2 comes (then requeued)."""
        self.save_soon = False
        self._save_last()
        log.warning("checkpoint_last holds update %d: waiting for the job to be stopped or requeued",
                    self.num_updates)
        while self.stop_signal is None:
            time.sleep(0.2)
        self._stop()

    def stop_workers(self) -> None:
        """End the DataLoader's worker processes now. At interpreter exit torch leaves them to
        multiprocessing, which sends SIGTERM and waits, and the workers ignore SIGTERM
        (`ignore_stop_signals`): an exit with them alive (an exception holding the trainer)
        would wait forever. (PyTorch Lightning ends its workers the same way.)"""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None

    # ------------------------------------------------------------------ signals

    def install_signal_handlers(self) -> None:
        under_submitit = bool(os.environ.get("SUBMITIT_EXECUTOR"))
        signals = [signal.SIGUSR1, signal.SIGUSR2] + ([] if under_submitit else [signal.SIGTERM])
        for signum in signals:
            try:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: no handlers
                return
        if under_submitit:  # submitit only logs SIGTERM; the kill may follow it
            self._previous_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_term)

    def restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum, frame) -> None:
        log.warning("received %s: stopping after this update", signal.Signals(signum).name)
        self.stop_signal = signum

    def _on_term(self, signum, frame) -> None:
        log.warning("received SIGTERM (a preemption, scancel or the time limit): saving checkpoint_last "
                    "after this update")
        self.save_soon = True


def ignore_stop_signals(worker_id: int) -> None:
    """In a DataLoader worker: leave the stop signals to the training process. SLURM (scancel,
    preemption, time limit) and `kill -- -PGID` signal every process; a worker killed by
    SIGTERM or SIGUSR1 made torch raise "DataLoader worker ... is killed by signal" in the
    training process, wherever it was (even mid-save), so the stop saved nothing. The worker
    still ends with the training process (`Trainer.stop_workers`, or it sees its parent gone)."""
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def on_preemption() -> Path | None:
    """Save the training running in this process (called by mt4ssl.launch's submitit job
    through the task module, which re-exports this function).

    The trainer defers signals to update boundaries and saves there before handing the
    signal to submitit, so this normally finds the state saved. Called mid-update (a signal
    that reached submitit's handler directly), it does not save a half-updated state: the
    requeued job resumes from the last checkpoint."""
    trainer = _ACTIVE
    if trainer is None or not trainer.d.main:
        return None
    if trainer.saved_at != trainer.num_updates and not trainer.updating:
        return trainer.save()
    return trainer.ckpt.last if trainer.ckpt.last.exists() else None


def run(cfg, make_trainer: Callable[[distributed.Dist], Trainer]) -> dict:
    """Run (or resume) a training in this process: `make_trainer(dist)` builds the trainer."""
    global _ACTIVE
    d = distributed.setup(cfg.run.device)
    try:
        trainer = make_trainer(d)
        _ACTIVE = trainer
        trainer.install_signal_handlers()
        try:
            return trainer.fit()
        finally:
            trainer.restore_signal_handlers()
            trainer.stop_workers()
            _ACTIVE = None
    finally:
        distributed.teardown(d)
