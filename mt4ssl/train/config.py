"""The pretraining config: `mt4ssl pretrain CONFIG.yaml [key=value ...]`.

Sections (all keys optional except data.manifest_dir and run.out_dir):
  model   a preset name plus field overrides of `ModelConfig` (mt4ssl/models/mt4ssl.py)
  data    manifests, label sets, batching
  optim   optimizer and learning-rate schedule
  run     updates, precision, devices, logging, validation, checkpoints, init_from
  launch  where it runs: local (this process / torchrun) or SLURM through submitit
`OptimConfig`, `RunConfig`, `LaunchConfig` and `check_training` are shared with the
fine-tuning config (mt4ssl/finetune/config.py); `PretrainRunConfig` adds the collapse guard.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mt4ssl.config import config_from_dict, config_to_dict
from mt4ssl.errors import InputError
from mt4ssl.models.cnn import SAMPLE_RATE
from mt4ssl.models.mt4ssl import PRESETS, ModelConfig
from mt4ssl.utils.precision import PRECISIONS


COMPILE_CROP_MS = 250  # data.crop_multiple_ms by default under run.compile


@dataclass(frozen=True)
class DataConfig:
    manifest_dir: str  # folder with {split}.tsv
    train_split: str = "train"
    valid_split: str = "valid"  # {split}.tsv and {folder}/{split}.km of every label set (run.valid_interval)
    labels: dict[str, str] = field(default_factory=dict)  # label-set name -> folder of {split}.km
    max_tokens: int = 3_800_000  # samples per batch (batch size x longest utterance)
    min_samples: int = 32_000  # shorter utterances are skipped
    max_samples: int = 320_000  # longer ones are cropped (from the start)
    batch_mode: str = "crop"  # crop every utterance to the batch's shortest, or "pad"
    # normalise each waveform over its whole file before cropping (fairseq's order, for parity;
    # measured in results/perf.md) instead of the model normalising the cropped batch
    normalize_before_crop: bool = False
    # "crop": the crop length is rounded down to a multiple of this many milliseconds, so batch
    # shapes repeat (a compiled model, run.compile, then sees few shapes); 0: the exact shortest
    # (fairseq's); None: COMPILE_CROP_MS with run.compile, else 0 (eager runs crop exactly)
    crop_multiple_ms: int | None = None
    num_workers: int = 4  # DataLoader worker processes


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adamw"  # fairseq's "adam" decouples weight decay: that is AdamW
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01
    schedule: str = "tri_stage"  # tri_stage | polynomial | cosine | constant
    phase_ratio: tuple[float, float, float] = (0.03, 0.9, 0.07)  # tri_stage: warm-up, hold, decay
    warmup_ratio: float = 0.03  # polynomial / cosine
    init_lr_scale: float = 0.01
    final_lr_scale: float = 0.01
    clip_norm: float = 0.0  # 0: no clipping (the paper's setting)


@dataclass(frozen=True)
class RunConfig:
    out_dir: str
    max_updates: int = 400_000
    update_freq: int = 1  # gradient accumulation: simulates update_freq x more GPUs
    precision: str = "fp32"  # fp32 | bf16 | fp16 (gradient scaler) | auto: bf16 where native, else fp32
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    seed: int = 1
    threads: int = 0  # torch CPU threads (0: torch's default)
    compile: bool = False  # torch.compile the model
    log_interval: int = 200  # updates between log lines
    save_interval: int = 25_000  # updates between numbered checkpoints
    # updates between validations on data.valid_split (fixed, seeded masks; checkpoint_best.pt
    # by valid_loss), and after the last update; 0: no validation (fairseq: validate_interval_updates)
    valid_interval: int = 10_000
    keep_last: int = 1  # numbered checkpoints kept besides the first and checkpoint_last
    # a new run starts from this checkpoint's weights (pretraining, fine-tuned or converted
    # fairseq), with a fresh optimizer and schedule; a run with a checkpoint_last resumes instead
    init_from: str = ""
    # updates in a row skipped for a non-finite loss or gradient norm (or an fp16 overflow)
    # before the run stops (checkpoint_last then holds the last finite update)
    max_skipped_in_a_row: int = 50


@dataclass(frozen=True)
class PretrainRunConfig(RunConfig):
    collapse_after: int = 5000  # the collapse guard starts after this many updates
    min_target_std: float = 0.1
    min_pred_std: float = 0.01


@dataclass(frozen=True)
class LaunchConfig:
    launcher: str = "local"  # local | slurm
    profile: str = ""  # slurm/<profile>.yaml: partition, account, qos, constraint, ...
    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU; SLURM tasks per node = max(1, gpus_per_node)
    cpus_per_task: int = 10
    mem_gb: int = 0  # 0: the profile's / cluster default
    timeout_min: int = 4320
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    max_requeues: int = 20
    extra: dict[str, Any] = field(default_factory=dict)  # more sbatch parameters


def check_training(cfg) -> None:
    """The checks of the sections every training config has (run, optim, launch, data)."""
    run, optim = cfg.run, cfg.optim
    choices = {("run.precision", run.precision): PRECISIONS,
               ("run.device", run.device.split(":")[0]): ("auto", "cpu", "cuda"),
               ("optim.optimizer", optim.optimizer): ("adamw", "adam"),
               ("optim.schedule", optim.schedule): ("tri_stage", "polynomial", "cosine", "constant"),
               ("launch.launcher", cfg.launch.launcher): ("local", "slurm")}
    for (key, value), allowed in choices.items():
        if value not in allowed:
            raise InputError(f"{key}: {value!r} is not one of {allowed}")
    launch = cfg.launch
    for key, value in (("run.max_updates", run.max_updates), ("run.update_freq", run.update_freq),
                       ("data.max_tokens", cfg.data.max_tokens), ("run.log_interval", run.log_interval),
                       ("run.save_interval", run.save_interval), ("run.keep_last", run.keep_last),
                       ("run.max_skipped_in_a_row", run.max_skipped_in_a_row), ("launch.nodes", launch.nodes),
                       ("launch.cpus_per_task", launch.cpus_per_task), ("launch.timeout_min", launch.timeout_min)):
        if value < 1:
            raise InputError(f"{key}: {value} must be at least 1")
    for key, value in (("run.seed", run.seed), ("run.threads", run.threads),
                       ("data.num_workers", cfg.data.num_workers), ("data.min_samples", cfg.data.min_samples),
                       ("launch.gpus_per_node", launch.gpus_per_node), ("launch.mem_gb", launch.mem_gb),
                       ("launch.max_requeues", launch.max_requeues), ("optim.weight_decay", optim.weight_decay),
                       ("optim.clip_norm", optim.clip_norm)):
        if value < 0:
            raise InputError(f"{key}: {value} must be at least 0")
    if run.valid_interval < 0:
        raise InputError(f"run.valid_interval: {run.valid_interval} must be at least 0 (0: no validation)")
    if abs(sum(optim.phase_ratio) - 1) > 1e-6 or min(optim.phase_ratio) < 0:
        raise InputError(f"optim.phase_ratio {optim.phase_ratio} must be non-negative and sum to 1")
    if optim.lr <= 0:
        raise InputError(f"optim.lr: {optim.lr} must be positive")
    if optim.eps <= 0:
        raise InputError(f"optim.eps: {optim.eps} must be positive")
    if not all(0 <= b < 1 for b in optim.betas):
        raise InputError(f"optim.betas: {list(optim.betas)} must both be in [0, 1)")
    if not 0 <= optim.warmup_ratio <= 1:
        raise InputError(f"optim.warmup_ratio: {optim.warmup_ratio} must be in [0, 1]")
    if not 0 <= optim.final_lr_scale <= 1:
        raise InputError(f"optim.final_lr_scale: {optim.final_lr_scale} must be in [0, 1]")
    if optim.schedule == "tri_stage" and not 0 < optim.final_lr_scale <= 1:
        raise InputError(f"optim.final_lr_scale: {optim.final_lr_scale} must be in (0, 1] for the "
                         f"tri_stage schedule (it decays exponentially to it)")
    if not 0 <= optim.init_lr_scale <= 1:
        raise InputError(f"optim.init_lr_scale: {optim.init_lr_scale} must be in [0, 1]")


@dataclass(frozen=True)
class PretrainConfig:
    data: DataConfig
    run: PretrainRunConfig
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "base"})
    optim: OptimConfig = OptimConfig()
    launch: LaunchConfig = LaunchConfig()

    def __post_init__(self):
        check_training(self)
        run = self.run
        for key, value in (("run.collapse_after", run.collapse_after), ("run.min_target_std", run.min_target_std),
                           ("run.min_pred_std", run.min_pred_std)):
            if value < 0:
                raise InputError(f"{key}: {value} must be at least 0")
        ms = self.data.crop_multiple_ms
        if ms is not None and (ms < 0 or ms * SAMPLE_RATE // 1000 > self.data.min_samples > 0):
            raise InputError(f"data.crop_multiple_ms: {ms} must be at least 0 (0: crop to "
                             f"the exact shortest) and at most data.min_samples "
                             f"({self.data.min_samples} samples = {self.data.min_samples * 1000 / SAMPLE_RATE:g} ms)")
        if self.data.batch_mode not in ("crop", "pad"):
            raise InputError(f"data.batch_mode: {self.data.batch_mode!r} is not one of ('crop', 'pad')")
        self.model_config()  # fail early on a bad model section

    def crop_ms(self) -> int:
        """data.crop_multiple_ms as used: its default (None) is COMPILE_CROP_MS under run.compile, else 0."""
        ms = self.data.crop_multiple_ms
        return ms if ms is not None else (COMPILE_CROP_MS if self.run.compile else 0)

    def model_config(self) -> ModelConfig:
        """The model section: a preset with its fields overridden (nested sections merge)."""
        spec = dict(self.model)
        preset = spec.pop("preset", "base")
        if preset not in PRESETS:
            raise InputError(f"model.preset {preset!r}: choose one of {sorted(PRESETS)}")
        merged = config_to_dict(PRESETS[preset])
        for key, value in spec.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return config_from_dict(ModelConfig, merged, "model")

    def replace(self, **sections) -> "PretrainConfig":
        return dataclasses.replace(self, **sections)
