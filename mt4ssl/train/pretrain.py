"""`mt4ssl pretrain CONFIG.yaml [key=value ...]`: MT4SSL pretraining and its ablations.

One update:
  for each of `update_freq` micro-batches (DDP syncs gradients on the last one only):
      loss = sum over targets of weight * (loss summed over the masked frames)
      backward (through the fp16 gradient scaler when precision=fp16)
  sample_size = masked frames summed over micro-batches and workers (one all-reduce)
  gradients *= world_size / sample_size      (DDP averaged them: now sum / sample_size)
  [clip], optimizer step (skipped and counted when fp16 overflows), lr schedule step,
  EMA teacher step, collapse guard.
This is fairseq's normalisation: the result does not depend on how the global batch is
split into micro-batches and workers.

Every update reseeds torch/numpy/python from (seed, rank, update): masks, dropout and
layerdrop of update n are the same in an uninterrupted run and in a resumed one, on any
number of workers. Checkpoints hold the model (student, heads, EMA teacher), optimizer,
scaler, schedule and the sampler's position, so a resumed run repeats the uninterrupted
one exactly (on CPU; GPU kernels may be nondeterministic).

Validation, every `run.valid_interval` updates and after the last one: the losses and
accuracies on `data.valid_split` per masked frame, in eval mode (no dropout), without
gradients, in the training's autocast precision, over fixed length-sorted batches of whole
utterances ("pad" collation). The mask of an utterance is drawn by the model's sample_mask
with torch's RNG seeded from (seed, manifest line) alone, under `fork_rng`: it does not depend
on the update, the batches or the number of workers, and the training RNG stream is left
alone. Rank r validates batches r, r + W, ...; the sums are all-reduced once. The row goes
into the log row of its update (keys `valid_*`); when valid_loss is the lowest so far,
checkpoint_best.pt is written (its value is in the training state, so a resumed run keeps it).

Signals: SIGUSR1 and SIGTERM (and SIGUSR2 outside submitit) stop the run at the end of the
current update, after saving checkpoint_last; under submitit, its timeout/preemption
signal is deferred the same way, then handed to submitit, which requeues the job.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import os
import random
import signal
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from mt4ssl.config import config_from_dict, config_to_dict, load_config, save_config
from mt4ssl.data.dataset import PretrainDataset, collate
from mt4ssl.data.sampler import BucketBatchSampler
from mt4ssl.errors import InputError
from mt4ssl.models.cnn import SAMPLE_RATE, conv_output_lengths
from mt4ssl.models.mt4ssl import MT4SSL, ModelConfig
from mt4ssl.targets import CollapseGuard, TrainingCollapsed
from mt4ssl.train import distributed
from mt4ssl.train.checkpoint import CheckpointDir
from mt4ssl.train.config import PretrainConfig
from mt4ssl.train.log import TrainLog
from mt4ssl.train.schedule import lr_multiplier
from mt4ssl.utils.precision import DTYPES, resolve_precision

log = logging.getLogger("mt4ssl.train")

_ACTIVE: "Trainer | None" = None  # the training running in this process, for on_preemption()


class Preempted(Exception):
    """The run stopped on a signal after saving checkpoint_last; rerun to resume."""


def seed_update(seed: int, rank: int, update: int) -> None:
    s = np.random.SeedSequence([seed, rank, update]).generate_state(2)
    torch.manual_seed(int(s[0]))
    np.random.seed(int(s[1]))
    random.seed(int(s[1]))


def valid_mask_seed(seed: int, utterance: int) -> int:
    """The torch seed of a validation utterance's mask (a stream apart from seed_update's)."""
    return int(np.random.SeedSequence([seed, 0x7A11D, utterance]).generate_state(1)[0])


def model_config(cfg: PretrainConfig, dataset: PretrainDataset) -> ModelConfig:
    """The model section, with the k-means heads sized by the label sets of `data.labels`."""
    mcfg = cfg.model_config()
    if "kmeans" not in mcfg.targets:
        return mcfg
    names = tuple(cfg.data.labels)
    if not names:
        raise InputError("model.targets has 'kmeans' but data.labels names no label set")
    if "labels" in cfg.model.get("kmeans", {}) and tuple(cfg.model["kmeans"]["labels"]) != names:
        raise InputError(f"model.kmeans.labels {cfg.model['kmeans']['labels']} differ from the "
                         f"label sets of data.labels {list(names)}")
    classes = tuple(dataset.num_classes(n) for n in names)
    kmeans = {**config_to_dict(mcfg.kmeans), "labels": names, "num_classes": classes}
    return config_from_dict(ModelConfig, {**config_to_dict(mcfg), "kmeans": kmeans}, "model")


class Trainer:
    def __init__(self, cfg: PretrainConfig, d: distributed.Dist):
        self.cfg, self.d = cfg, d
        run = cfg.run
        self.out = Path(run.out_dir)
        if run.threads:
            torch.set_num_threads(run.threads)
        data = cfg.data
        split = data.train_split
        self.dataset = PretrainDataset(
            Path(data.manifest_dir) / f"{split}.tsv",
            {name: Path(folder) / f"{split}.km" for name, folder in data.labels.items()},
            data.min_samples, data.max_samples)
        self.valid_set, self.valid_batches = self._valid_data() if run.valid_interval else (None, [])
        torch.manual_seed(run.seed)  # the same initial weights on every rank
        self.model = MT4SSL(model_config(cfg, self.dataset)).to(d.device)
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
        self.sampler = BucketBatchSampler(self.dataset.sizes, data.max_tokens, seed=run.seed, rank=d.rank,
                                          world_size=d.world_size, where=self.dataset.where)
        self.loader = DataLoader(self.dataset, batch_sampler=self.sampler,
                                 collate_fn=functools.partial(collate, mode=data.batch_mode),
                                 num_workers=data.num_workers, pin_memory=d.device.type == "cuda",
                                 persistent_workers=data.num_workers > 0)
        self.net = self.model
        if d.enabled:  # layerdrop leaves some layers without gradients in an update
            self.net = DistributedDataParallel(
                self.model, device_ids=[d.device] if d.device.type == "cuda" else None,
                find_unused_parameters=self.model.cfg.layerdrop > 0)
        if run.compile:
            self.net = torch.compile(self.net)
        self.guard = CollapseGuard(run.min_target_std, run.min_pred_std, run.collapse_after)
        self.ckpt = CheckpointDir(self.out / "checkpoints", run.keep_last)
        self.num_updates, self.overflows = 0, 0
        self.best_valid = math.inf  # the lowest valid_loss so far (checkpoint_best.pt)
        self.sampler_state = self.sampler.state_dict()  # the position at the last update boundary
        self.saved_at = -1
        self.stop_signal: int | None = None
        self.updating = False  # inside train_step: the state is not consistent
        self._previous_handlers: dict = {}
        self._resume()

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        return {"model_config": config_to_dict(self.model.cfg), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "sampler": self.sampler_state,
                "num_updates": self.num_updates, "overflows": self.overflows,
                "best_valid_loss": self.best_valid, "train_config": config_to_dict(self.cfg)}

    def save(self, numbered: bool = False) -> Path | None:
        """Rank 0 writes the state of the last finished update."""
        if not self.d.main:
            return None
        path = self.ckpt.save(self.state(), self.num_updates, numbered)
        self.saved_at = self.num_updates
        log.info("saved %s (update %d)", path, self.num_updates)
        return path

    def save_best(self, same_as: Path | None) -> None:
        """Rank 0 writes checkpoint_best.pt (a hard link to `same_as`, this update's file)."""
        if self.d.main:
            path = self.ckpt.save_best(self.state(), same_as)
            log.info("saved %s (update %d, valid_loss %.4g)", path, self.num_updates, self.best_valid)

    def _resume(self) -> None:
        state = self.ckpt.load_last(map_location=self.d.device)
        if state is None:
            return
        if state["model_config"] != config_to_dict(self.model.cfg):
            mine = config_to_dict(self.model.cfg)
            diff = sorted(k for k in mine if state["model_config"].get(k) != mine[k])
            raise InputError(f"{self.ckpt.last}: made with another model config (differs in {diff}); "
                             f"use a new run.out_dir or the same model settings")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.sampler_state = self.sampler.state_dict()
        self.num_updates, self.overflows = state["num_updates"], state["overflows"]
        self.best_valid = float(state.get("best_valid_loss", math.inf))
        self.saved_at = self.num_updates
        log.info("resumed from %s at update %d", self.ckpt.last, self.num_updates)

    # ------------------------------------------------------------------ one update

    def autocast(self):
        return torch.autocast(self.d.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def _to_device(self, batch: dict) -> dict:
        dev = self.d.device
        moved = {k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        moved["labels"] = {k: v.to(dev, non_blocking=True) for k, v in batch["labels"].items()}
        return moved

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
        masked frames of all workers. Returns the stats summed over workers."""
        self.model.train()
        seed_update(self.cfg.run.seed, self.d.rank, self.num_updates)
        acc: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.d.device))
        for i, batch in enumerate(batches):
            batch = self._to_device(batch)
            sync = i == len(batches) - 1 or not self.d.enabled
            with contextlib.nullcontext() if sync else self.net.no_sync():
                with self.autocast():
                    out = self.net(batch["wav"], batch["padding_mask"], mask_indices=batch.get("mask"),
                                   labels=batch["labels"])
                self.scaler.scale(out.loss).backward()
            acc["sample_size"] += out.sample_size
            acc["loss"] += out.loss.detach().float()
            acc["samples"] += batch["samples"]
            acc["micro_batches"] += 1
            for kind, value in out.losses.items():
                acc[f"loss_{kind}"] += value.detach().float()
            for key, value in out.logs.items():
                if key != "ema_decay":
                    acc[key] += value.detach().float()  # std/accuracy: averaged below
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
        """Clip, optimizer and schedule step (skipped on fp16 overflow), EMA teacher step."""
        clip = self.cfg.optim.clip_norm
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else math.inf))
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.is_enabled() and self.scaler.get_scale() < scale:
            self.overflows += 1  # fp16 overflow: the update was skipped
        else:
            self.scheduler.step()
            self.num_updates += 1
            self.model.update_targets(self.num_updates)
        self.optimizer.zero_grad(set_to_none=True)
        self.sampler_state = self.sampler.state_dict()

    # ------------------------------------------------------------------ validation

    def _valid_data(self) -> tuple[PretrainDataset, list[list[int]]]:
        """The valid split and its fixed batches (sorted by length, at most data.max_tokens)."""
        data = self.cfg.data
        manifest = Path(data.manifest_dir) / f"{data.valid_split}.tsv"
        labels = {name: Path(folder) / f"{data.valid_split}.km" for name, folder in data.labels.items()}
        for path in (manifest, *labels.values()):
            if not path.is_file():
                raise InputError(f"{path}: not found; validation (run.valid_interval="
                                 f"{self.cfg.run.valid_interval}) needs the {data.valid_split!r} split "
                                 f"(data.valid_split) of the manifests and of every label set; "
                                 f"make it, or set run.valid_interval=0 to train without validation")
        valid = PretrainDataset(manifest, labels, data.min_samples, data.max_samples)
        batches = BucketBatchSampler(valid.sizes, data.max_tokens, shuffle=False, where=valid.where).batches
        return valid, [b.tolist() for b in batches]

    def _valid_mask(self, ids: list[int]) -> torch.Tensor:
        """(B, T) masks of valid items `ids`, each seeded by (seed, its manifest line) alone."""
        frames = conv_output_lengths(torch.as_tensor(self.valid_set.sizes[ids]), self.model.cfg.conv_layers)
        frames = frames.tolist()
        mask = torch.zeros(len(ids), max(frames), dtype=torch.bool)
        with torch.random.fork_rng(devices=[]):
            for b, (i, t) in enumerate(zip(ids, frames)):
                torch.manual_seed(valid_mask_seed(self.cfg.run.seed, int(self.valid_set.indices[i])))
                mask[b, :t] = self.model.sample_mask(torch.empty(1, t), None)[0]
        return mask

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Losses (and accuracies, stds) per masked frame on the valid split, summed over
        workers; the keys are prefixed `valid_` (see the module doc)."""
        self.model.eval()
        batches, weight = self.valid_batches[self.d.rank::self.d.world_size], 1.0
        if not batches:  # fewer batches than workers: one with weight 0 (every rank reduces the same keys)
            batches, weight = self.valid_batches[:1], 0.0
        acc: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.d.device))
        for ids in batches:
            batch = collate([self.valid_set[i] for i in ids], mode="pad")
            batch = self._to_device({**batch, "mask": self._valid_mask(ids)})
            with self.autocast():
                out = self.model(batch["wav"], batch["padding_mask"], mask_indices=batch["mask"],
                                 labels=batch["labels"])
            frames = out.sample_size.float()
            values = {"frames": frames, "loss": out.loss, **{f"loss_{k}": v for k, v in out.losses.items()}}
            for key, value in out.logs.items():  # loss_<labels> are sums; acc_*, *_std means: weighted
                if key != "ema_decay":
                    values[key] = value if key.startswith("loss_") else value * frames
            for key, value in values.items():
                acc[key] += torch.nan_to_num(value.float()) * weight
        self.model.train()
        keys = sorted(acc)
        total = distributed.all_reduce_sum(torch.stack([acc[k] for k in keys]), self.d)
        stats = dict(zip(keys, total.tolist()))
        frames = stats.pop("frames")
        row = {f"valid_{k}": v / max(frames, 1.0) for k, v in stats.items()}  # per masked frame
        return {**row, "valid_masked_frames": frames}

    def valid_due(self) -> bool:
        every, n = self.cfg.run.valid_interval, self.num_updates
        return every > 0 and (n % every == 0 or n >= self.cfg.run.max_updates)

    # ------------------------------------------------------------------ the loop

    def _batches(self):
        while True:
            yield from self.sampler.counted(self.loader)

    def fit(self) -> dict:
        run = self.cfg.run
        if self.num_updates >= run.max_updates:
            log.info("already finished: %d of %d updates", self.num_updates, run.max_updates)
            return {"num_updates": self.num_updates, "finished": True}
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / "config.yaml")
        logger = TrainLog(self.out, run.max_updates, self.num_updates, enabled=self.d.main)
        data = self._batches()
        interval: dict[str, float] = defaultdict(float)
        t_start = t_log = time.perf_counter()
        try:
            while self.num_updates < run.max_updates:
                t0 = time.perf_counter()
                batches = [next(data) for _ in range(run.update_freq)]
                interval["data_wait"] += time.perf_counter() - t0
                before = self.num_updates
                stats = self.train_step(batches)
                for key, value in stats.items():
                    interval[key] += value
                interval["updates"] += self.num_updates - before
                logger.update(self.num_updates - before)
                mean = {k: stats[k] / stats["micro_batches"]  # averaged over micro-batches and workers
                        for k in ("target_std", "pred_std") if k in stats}
                try:
                    self.guard.check(mean, self.num_updates)
                except TrainingCollapsed:
                    self.save()
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
                    if valid["valid_loss"] < self.best_valid:  # NaN never is
                        self.best_valid, improved = valid["valid_loss"], True
                if row:
                    logger.write(row)
                last = self.num_updates == run.max_updates  # saved here too: checkpoint_best may link to it
                if advanced and (self.num_updates % run.save_interval == 0 or last):
                    saved = self.save(numbered=True)
                if improved:
                    self.save_best(same_as=saved)
                if stats["stop"] > 0:
                    self._stop()
            if self.saved_at != self.num_updates:
                self.save(numbered=True)
        finally:
            logger.close()
        return {"num_updates": self.num_updates, "overflows": self.overflows, "finished": True,
                "seconds": time.perf_counter() - t_start, "checkpoint": str(self.ckpt.last)}

    def _log_row(self, s: dict, seconds: float) -> dict:
        frames = max(s["sample_size"], 1.0)
        row = {"update": self.num_updates, "loss": s["loss"] / frames}
        row.update({k: v / frames for k, v in s.items() if k.startswith("loss_")})
        micro = max(s["micro_batches"], 1.0)  # summed over workers
        row.update({k: v / micro for k, v in s.items() if k.startswith(("acc_", "target_std", "pred_std"))})
        updates = max(s["updates"], 1.0)
        row.update({
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": s["grad_norm"] / updates,
            "masked_frames": s["sample_size"] / updates,
            "audio_s_per_s": s["samples"] / SAMPLE_RATE / seconds,
            "updates_per_s": s["updates"] / seconds,
            "data_wait_frac": s["data_wait"] / seconds,
            "overflows": self.overflows,
            "mem_gb": peak_memory_gb(self.d.device),
            "time": time.time(),
        })
        if "teacher" in self.model.targets:
            row["ema_decay"] = float(self.model.targets["teacher"].decay)
        return row

    def _stop(self) -> None:
        """Save, then stop (plain signal) or hand the signal to submitit (requeue)."""
        signum, self.stop_signal = self.stop_signal, None
        self.save()
        distributed.barrier(self.d)  # no worker exits while rank 0 is still writing
        handler = self._previous_handlers.get(signum) if signum is not None else None
        if callable(handler) and os.environ.get("SUBMITIT_EXECUTOR"):
            handler(signum, None)  # submitit: checkpoint() -> on_preemption(), requeue, exit
        name = signal.Signals(signum).name if signum is not None else "a signal on another worker"
        raise Preempted(f"stopped by {name} at update {self.num_updates}; checkpoint saved in "
                        f"{self.ckpt.folder}; run the same command again to resume")

    # ------------------------------------------------------------------ signals

    def install_signal_handlers(self) -> None:
        under_submitit = bool(os.environ.get("SUBMITIT_EXECUTOR"))
        signals = [signal.SIGUSR1, signal.SIGUSR2] + ([] if under_submitit else [signal.SIGTERM])
        for signum in signals:
            try:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: no handlers
                return

    def restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum, frame) -> None:
        log.warning("received %s: stopping after this update", signal.Signals(signum).name)
        self.stop_signal = signum


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def on_preemption() -> Path | None:
    """Save the training running in this process (called by mt4ssl.launch's submitit job).

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


def train(cfg: PretrainConfig) -> dict:
    """Run (or resume) the pretraining described by `cfg` in this process."""
    global _ACTIVE
    d = distributed.setup(cfg.run.device)
    trainer = Trainer(cfg, d)
    _ACTIVE = trainer
    trainer.install_signal_handlers()
    try:
        return trainer.fit()
    finally:
        trainer.restore_signal_handlers()
        _ACTIVE = None
        distributed.teardown(d)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="YAML config (see recipes/*/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. optim.lr=1e-4 run.precision=bf16")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    from mt4ssl.launch import launch

    try:
        result = launch(cfg)
    except Preempted as e:
        print(f"mt4ssl pretrain: {e}")
        return 3
    if isinstance(result, dict):
        print(f"pretraining done: {result['num_updates']} updates; checkpoint {result.get('checkpoint')}")
    return 0
