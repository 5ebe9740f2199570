"""The fine-tuning config: `mt4ssl finetune CONFIG.yaml [key=value ...]`.

Sections (all keys optional except data.manifest_dir, run.out_dir and run.init_from):
  model   fine-tuning settings of the encoder (fairseq wav2vec_ctc names and meanings); they
          replace the pretrained model's own dropout / masking / layerdrop settings, the
          architecture comes from the checkpoint of run.init_from
  data    manifests with `.ltr` letter transcripts, the letter dictionary, batching
  optim   optimizer and learning-rate schedule (defaults: fairseq's fine-tuning: Adam
          (0.9, 0.98), eps 1e-8, no weight decay, tri-stage 10/40/50 %, final scale 0.05)
  run     updates, precision, devices, logging, validation (WER), checkpoints; init_from
  launch  where it runs (as for pretraining)
Defaults are the paper's 10 h settings (the official MT4SSL code's 10 h config).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mt4ssl.config import config_from_dict
from mt4ssl.errors import InputError
from mt4ssl.models.mt4ssl import ModelConfig
from mt4ssl.train.config import LaunchConfig, OptimConfig, RunConfig, check_training


@dataclass(frozen=True)
class FinetuneModelConfig:
    dropout: float = 0.0  # inside the Transformer (fairseq wav2vec_ctc: dropout)
    attention_dropout: float = 0.0
    activation_dropout: float = 0.1
    dropout_input: float = 0.0  # on the projected CNN features
    final_dropout: float = 0.0  # before the CTC projection
    layerdrop: float = 0.05
    mask_prob: float = 0.65  # time masking: spans of mask_length frames, replaced by mask_emb
    mask_length: int = 10
    mask_channel_prob: float = 0.5  # channel masking: spans of mask_channel_length channels, zeroed
    mask_channel_length: int = 64
    freeze_finetune_updates: int = 0  # the Transformer (whole encoder) is frozen for these updates
    random_init: bool = False  # the architecture of run.init_from with fresh weights (a baseline)
    # keep the frozen CNN's output of every training utterance in memory after its first use
    # (the same numbers up to float rounding, about 1/3 less CPU per update; memory: hours x
    # 3600 x 50 frames x CNN channels x 2 bytes in bf16, 4 in fp32; 1 h of the tiny model: 46 MB)
    cache_cnn: bool = False

    def __post_init__(self):
        for key in ("dropout", "attention_dropout", "activation_dropout", "dropout_input", "final_dropout",
                    "layerdrop", "mask_prob", "mask_channel_prob"):
            value = getattr(self, key)
            if not 0 <= value < 1:
                raise InputError(f"model.{key}: {value} must be in [0, 1)")
        for key in ("mask_length", "mask_channel_length"):
            if getattr(self, key) < 1:
                raise InputError(f"model.{key}: {getattr(self, key)} must be at least 1")
        if self.freeze_finetune_updates < 0:
            raise InputError(f"model.freeze_finetune_updates: {self.freeze_finetune_updates} must be at least 0")

    def encoder_config(self, pretrained: ModelConfig) -> ModelConfig:
        """The pretrained encoder's config with these settings (and no pretraining targets)."""
        if self.mask_channel_length > pretrained.embed_dim and self.mask_channel_prob > 0:
            raise InputError(f"model.mask_channel_length: {self.mask_channel_length} is more than the "
                             f"encoder's {pretrained.embed_dim} channels")
        fields = {k: getattr(self, k) for k in ("dropout", "attention_dropout", "activation_dropout",
                                                "dropout_input", "layerdrop", "mask_prob", "mask_length",
                                                "mask_channel_prob", "mask_channel_length")}
        return dataclasses.replace(pretrained, targets=(), **fields)


def pretrained_config(model_config: dict, where: str) -> ModelConfig:
    return config_from_dict(ModelConfig, model_config, f"{where}: model_config")


@dataclass(frozen=True)
class FinetuneDataConfig:
    manifest_dir: str  # folder with {split}.tsv and {split}.ltr
    train_split: str = "train"
    valid_split: str = "dev-other"  # validation by WER (fairseq's valid_subset); checkpoint_best by it
    # fairseq dict.ltr.txt ("SYMBOL COUNT" per line); "": {manifest_dir}/dict.ltr.txt if it
    # exists, else the symbols of the train split's .ltr (most frequent first)
    dictionary: str = ""
    max_tokens: int = 3_200_000  # samples per batch (batch size x longest utterance), per GPU
    min_samples: int = 0  # shorter utterances are skipped (and always those under one 400-sample frame)
    num_workers: int = 4


@dataclass(frozen=True)
class FinetuneOptimConfig(OptimConfig):
    optimizer: str = "adam"  # fairseq's adam; without weight decay the same as adamw
    lr: float = 5e-5
    eps: float = 1e-8
    weight_decay: float = 0.0
    phase_ratio: tuple[float, float, float] = (0.1, 0.4, 0.5)
    final_lr_scale: float = 0.05


BEST_METRICS = ("valid_wer", "valid_uer", "valid_loss")


@dataclass(frozen=True)
class FinetuneRunConfig(RunConfig):
    max_updates: int = 20_000
    save_interval: int = 1000
    valid_interval: int = 1000
    # what checkpoint_best.pt is the lowest of: greedy WER (fairseq's best_checkpoint_metric
    # wer, the paper's); valid_uer (letter error rate) for toy runs, where the greedy WER stays
    # at 100 % (or above, with insertions) long after the letters improve and an early model
    # that emits nothing would be kept as the best
    best_metric: str = "valid_wer"

    def __post_init__(self):
        if hasattr(super(), "__post_init__"):
            super().__post_init__()
        if self.best_metric not in BEST_METRICS:
            raise InputError(f"run.best_metric: {self.best_metric!r} must be one of {', '.join(BEST_METRICS)}")


@dataclass(frozen=True)
class FinetuneConfig:
    data: FinetuneDataConfig
    run: FinetuneRunConfig
    model: FinetuneModelConfig = FinetuneModelConfig()
    optim: FinetuneOptimConfig = FinetuneOptimConfig()
    launch: LaunchConfig = LaunchConfig()

    def __post_init__(self):
        check_training(self)
        if not self.run.init_from:
            raise InputError("run.init_from: missing; fine-tuning starts from a pretrained checkpoint "
                             "(from `mt4ssl pretrain`, or `mt4ssl convert fairseq`; with model.random_init=true "
                             "only its architecture is used)")
        if self.model.freeze_finetune_updates >= self.run.max_updates:
            raise InputError(f"model.freeze_finetune_updates: {self.model.freeze_finetune_updates} is not below "
                             f"run.max_updates={self.run.max_updates}: the encoder would never be trained")
