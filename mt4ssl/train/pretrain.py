"""`mt4ssl pretrain CONFIG.yaml [key=value ...]`: MT4SSL pretraining and its ablations.

The training loop is mt4ssl/train/loop.py (devices, DDP, precision, accumulation,
checkpoints, exact resume, signals, logging, validation); this module is what pretraining
adds to it:

- data: the `data.train_split` manifest with the 50 Hz k-means labels of every label set in
  `data.labels` (crop or pad collation); the model's k-means heads are sized by them;
- loss: sum over targets of weight * (loss summed over the masked frames); the sample size
  is the number of masked frames, so the loop's normalisation divides by the masked frames
  of all micro-batches and workers (fairseq's sample_size);
- after every update the EMA teacher steps (with model.teacher.ema_per_micro_batch, fairseq's
  order: before every micro-batch's forward instead); the collapse guard checks the target and
  prediction stds (after `run.collapse_after` updates; the loop saves, then stops);
- `run.init_from`: the encoder's weights must all be in the source (a pretraining
  checkpoint, a fine-tuned one, `mt4ssl convert fairseq`); prediction heads and the EMA
  teacher are taken where the source has them with the same shapes, else fresh (a teacher
  without saved EMA weights starts as a copy of the student).

Validation: the losses and accuracies on `data.valid_split` per masked frame, over "pad"
batches, with one mask per utterance (also with model.teacher.masks_per_sample > 1). The
mask of an utterance is drawn by the model's sample_mask with torch's RNG seeded from (seed,
manifest line) alone, under `fork_rng`: it does not depend on the update, the batches or the
number of workers, and the training RNG stream is left alone.
checkpoint_best.pt is kept by valid_loss.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from mt4ssl.config import config_from_dict, config_to_dict, load_config
from mt4ssl.data.dataset import PretrainDataset, collate
from mt4ssl.errors import InputError
from mt4ssl.models.cnn import SAMPLE_RATE, conv_output_lengths, frame_padding_mask, num_frames
from mt4ssl.models.mt4ssl import MT4SSL, ModelConfig
from mt4ssl.targets import CollapseGuard, TrainingCollapsed
from mt4ssl.targets.base import masked_positions
from mt4ssl.train import distributed, loop
from mt4ssl.train.config import PretrainConfig
from mt4ssl.train.loop import Preempted, on_preemption  # noqa: F401  (launch calls this module's hook)

log = logging.getLogger("mt4ssl.train")


def valid_mask_seed(seed: int, utterance: int) -> int:
    """The torch seed of a validation utterance's mask (a stream apart from loop.seed_update's)."""
    return int(np.random.SeedSequence([seed, 0x7A11D, utterance]).generate_state(1)[0])


def crop_multiple(ms: int) -> int:
    """data.crop_multiple_ms in samples (0 ms: 1 sample, no rounding)."""
    return max(1, ms * SAMPLE_RATE // 1000)


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


class Pretraining:
    """The pretraining task of the training loop (see mt4ssl/train/loop.py, `Task`)."""

    name = "pretrain"
    best_metric = "valid_loss"
    log_keys = ("loss", "loss_kmeans", "loss_teacher", "lr", "target_std", "audio_s_per_s")

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.updates_done = 0  # set by before_update (the EMA step of ema_per_micro_batch)
        data = cfg.data
        # fairseq's order: the dataset normalises whole files, the model then does not normalise again
        self.normalized = data.normalize_before_crop and cfg.model_config().normalize
        self.train_set = self._dataset(data.train_split)
        self.valid_set = self._valid_set() if cfg.run.valid_interval else None
        self.collate = functools.partial(collate, mode=data.batch_mode,
                                         crop_multiple=crop_multiple(cfg.crop_ms()))
        self.guard = CollapseGuard(cfg.run.min_target_std, cfg.run.min_pred_std, cfg.run.collapse_after)
        self.model: MT4SSL | None = None

    def _dataset(self, split: str) -> PretrainDataset:
        data = self.cfg.data
        return PretrainDataset(Path(data.manifest_dir) / f"{split}.tsv",
                               {name: Path(folder) / f"{split}.km" for name, folder in data.labels.items()},
                               data.min_samples, data.max_samples, normalize=self.normalized)

    def _valid_set(self) -> PretrainDataset:
        data = self.cfg.data
        paths = [Path(data.manifest_dir) / f"{data.valid_split}.tsv",
                 *(Path(folder) / f"{data.valid_split}.km" for folder in data.labels.values())]
        for path in paths:
            if not path.is_file():
                raise InputError(f"{path}: not found; validation (run.valid_interval="
                                 f"{self.cfg.run.valid_interval}) needs the {data.valid_split!r} split "
                                 f"(data.valid_split) of the manifests and of every label set; "
                                 f"make it, or set run.valid_interval=0 to train without validation")
        return self._dataset(data.valid_split)

    # ------------------------------------------------------------------ model and checkpoints

    @property
    def find_unused_parameters(self) -> bool:  # layerdrop leaves some layers without gradients
        return self.model.cfg.layerdrop > 0

    def build_model(self, source: dict | None) -> MT4SSL:
        self.model = MT4SSL(model_config(self.cfg, self.train_set))
        return self.model

    def checkpoint_state(self, model: MT4SSL) -> dict:
        return {"model_config": config_to_dict(model.cfg), "model": model.state_dict()}

    def load_state(self, model: MT4SSL, state: dict, where: str) -> None:
        model.load_state_dict(state["model"])

    def init_weights(self, model: MT4SSL, state: dict, where: str) -> None:
        """The encoder from `state` (all of it), heads and EMA teacher where they fit."""
        source, own = state["model"], model.state_dict()
        fits = {k for k, v in own.items() if k in source and tuple(source[k].shape) == tuple(v.shape)}
        bad = [k for k in own if not k.startswith("targets.") and k not in fits]
        if bad:
            raise InputError(f"{where}: run.init_from has no weights of the same shape for {len(bad)} "
                             f"tensor(s) of this model's encoder (e.g. {bad[:3]}); it needs the same "
                             f"encoder architecture as the model section")
        model.load_state_dict({k: source[k] for k in fits}, strict=False)
        fresh = sorted({".".join(k.split(".")[:3]) for k in own if k not in fits})
        if "teacher" in model.targets and not any(k.startswith("targets.teacher.ema.") for k in fits):
            model.targets["teacher"].reset(model.encoder)  # the EMA teacher starts as the student
        if fresh:
            log.info("run.init_from %s: fresh %s (not in the source, or of another shape)", where, ", ".join(fresh))

    # ------------------------------------------------------------------ one update

    def before_update(self, model: MT4SSL, num_updates: int) -> None:
        self.updates_done = num_updates

    def sample_mask(self, batch: dict) -> torch.Tensor:
        """The (B, T) span mask of a training batch, drawn as the model's forward would draw it
        (the same torch RNG state, so the same mask), but before the forward: it runs on the
        host, outside a compiled model (run.compile)."""
        cfg, wav = self.model.cfg, batch["wav"]
        M, frames = cfg.teacher.masks_per_sample, num_frames(wav.shape[1], cfg.conv_layers)
        padding = frame_padding_mask(batch["padding_mask"], frames, cfg.conv_layers)
        if M > 1 and padding is not None:  # the student's rows: M copies of each utterance
            padding = padding.repeat_interleave(M, dim=0)
        return self.model.sample_mask(wav.new_empty(M * wav.shape[0], frames), padding)

    def loss(self, net, batch: dict):
        if self.model.cfg.teacher.ema_per_micro_batch:
            # fairseq's order: set_num_updates, so an EMA step towards the current student, in
            # every micro-batch's train_step before its forward (also in an update that is then
            # skipped, as after an fp16 overflow)
            self.model.update_targets(self.updates_done)
        # mask and positions are made here, outside the (maybe compiled) net: no graph break
        mask = batch["mask"] if batch.get("mask") is not None else self.sample_mask(batch)
        positions = masked_positions(mask)
        out = net(batch["wav"], batch["padding_mask"], mask_indices=mask, labels=batch["labels"],
                  normalized=self.normalized, mask_positions=positions)
        logs = {f"loss_{kind}": value for kind, value in out.losses.items()}
        logs.update({k: v for k, v in out.logs.items() if k != "ema_decay"})  # std/accuracy: averaged in log_row
        return out.loss, out.sample_size, logs

    def after_update(self, model: MT4SSL, num_updates: int) -> None:
        if not model.cfg.teacher.ema_per_micro_batch:  # else: in loss(), before every micro-batch
            model.update_targets(num_updates)  # the EMA teacher: one step per applied update

    def check(self, stats: dict[str, float], num_updates: int) -> None:
        mean = {k: stats[k] / stats["micro_batches"]  # averaged over micro-batches and workers
                for k in ("target_std", "pred_std") if k in stats}
        self.guard.check(mean, num_updates)

    def log_row(self, s: dict[str, float], updates: float) -> dict:
        frames = max(s["sample_size"], 1.0)
        row = {"loss": s["loss"] / frames}
        row.update({k: v / frames for k, v in s.items() if k.startswith("loss_")})
        micro = max(s["micro_batches"], 1.0)  # summed over workers
        row.update({k: v / micro for k, v in s.items() if k.startswith(("acc_", "target_std", "pred_std"))})
        row["masked_frames"] = s["sample_size"] / updates
        if "teacher" in self.model.targets:
            row["ema_decay"] = float(self.model.targets["teacher"].decay)
        return row

    # ------------------------------------------------------------------ validation

    def valid_mask(self, ids: list[int]) -> torch.Tensor:
        """(B, T) masks of valid items `ids`, each seeded by (seed, its manifest line) alone."""
        valid, model = self.valid_set, self.model
        frames = conv_output_lengths(torch.as_tensor(valid.sizes[ids]), model.cfg.conv_layers).tolist()
        mask = torch.zeros(len(ids), max(frames), dtype=torch.bool)
        with torch.random.fork_rng(devices=[]):
            for b, (i, t) in enumerate(zip(ids, frames)):
                torch.manual_seed(valid_mask_seed(self.cfg.run.seed, int(valid.indices[i])))
                mask[b, :t] = model.sample_mask(torch.empty(1, t), None)[0]
        return mask

    def valid_batch(self, ids: list[int]) -> dict:
        return {**collate([self.valid_set[i] for i in ids], mode="pad"), "mask": self.valid_mask(ids)}

    def valid_stats(self, model: MT4SSL, batch: dict) -> dict[str, torch.Tensor]:
        out = model(batch["wav"], batch["padding_mask"], mask_indices=batch["mask"], labels=batch["labels"],
                    masks_per_sample=1, normalized=self.normalized)  # one fixed mask per utterance
        frames = out.sample_size.float()
        values = {"frames": frames, "loss": out.loss, **{f"loss_{k}": v for k, v in out.losses.items()}}
        for key, value in out.logs.items():  # loss_<labels> are sums; acc_*, *_std means: weighted
            if key != "ema_decay":
                values[key] = value if key.startswith("loss_") else value * frames
        return values

    def valid_row(self, sums: dict[str, float]) -> dict:
        frames = sums.pop("frames")
        row = {f"valid_{k}": v / max(frames, 1.0) for k, v in sums.items()}  # per masked frame
        return {**row, "valid_masked_frames": frames}


class Trainer(loop.Trainer):
    """The training loop with the pretraining task."""

    def __init__(self, cfg: PretrainConfig, d: distributed.Dist):
        super().__init__(cfg, d, Pretraining(cfg))


def train(cfg: PretrainConfig) -> dict:
    """Run (or resume) the pretraining described by `cfg` in this process."""
    return loop.run(cfg, lambda d: Trainer(cfg, d))

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
    except (loop.TrainingStopped, TrainingCollapsed) as e:  # each message says what to do
        print(f"mt4ssl pretrain: {e}", file=sys.stderr)
        return 4
    if isinstance(result, dict):
        print(f"pretraining done: {result['num_updates']} updates; checkpoint {result.get('checkpoint')}")
    return 0
