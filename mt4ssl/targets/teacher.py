"""Online targets (data2vec style): an EMA teacher's averaged top-K layer outputs.

The teacher is a copy of the student's Transformer encoder only (its layers and encoder
LayerNorm are exponential moving averages of the student's; the positional conv is copied
from the student at every update, not averaged; the CNN, feature LayerNorm and projection are
shared: the teacher reads the student's projected features before dropout and masking).
It is kept in fp32 (the averaging is exact) and in eval mode, without gradients; its forward
follows the caller's autocast, as fairseq's fp16 teacher did.

Targets: for each of the top K layers take the FFN output before the residual add,
instance-normalize it (per utterance and channel, over the valid frames, fp32, no affine),
average the K layers and keep the masked frames. Prediction: Linear(C, C) on the student's
output. Loss: squared L2 distance summed over channels and masked frames, times 1/sqrt(C).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from mt4ssl.errors import InputError
from mt4ssl.targets.base import Target, TargetBatch


@dataclass(frozen=True)
class TeacherConfig:
    weight: float = 1.0
    top_k: int = 8  # average the FFN outputs of the top K layers
    ema_decay: float = 0.999  # decay at update 0 ...
    ema_end_decay: float = 0.9999  # ... annealed linearly to this ...
    ema_anneal_updates: int = 30000  # ... over this many updates, then constant
    loss_scale: float | None = None  # None: 1 / sqrt(dim)
    # data2vec 2.0's clone batch: the CNN and the teacher run once per utterance, the student's
    # Transformer on M differently-masked copies of it (k-means labels and teacher targets
    # repeated); the loss stays normalised per masked frame, of all copies. 1 = the paper.
    masks_per_sample: int = 1
    # fairseq steps the EMA before every micro-batch's forward (set_num_updates in every
    # train_step), towards the current student: with run.update_freq = k, k steps per update
    # (decay d^k), micro-batch j seeing the teacher after j of them, and steps in an update that
    # is then skipped (fp16 overflow). True reproduces that, so the official runs. False (the
    # default): one step after each applied update, whatever the split of the batch.
    ema_per_micro_batch: bool = False

    def __post_init__(self):
        if self.masks_per_sample < 1:
            raise ValueError(f"teacher.masks_per_sample {self.masks_per_sample} must be at least 1 "
                             "(1: one masked copy per utterance, the paper)")
        for key in ("ema_decay", "ema_end_decay"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"teacher.{key} {getattr(self, key)} must be in [0, 1]")
        if self.ema_anneal_updates < 0 or self.top_k < 1:
            raise ValueError(f"teacher.ema_anneal_updates {self.ema_anneal_updates} must be >= 0 and "
                             f"teacher.top_k {self.top_k} >= 1")
        if not self.weight >= 0 or (self.loss_scale is not None and not self.loss_scale > 0):
            raise ValueError(f"teacher.weight {self.weight} must be >= 0 and teacher.loss_scale "
                             f"{self.loss_scale} positive (or null: 1/sqrt(dim))")


def ema_decay(num_updates: int, start: float, end: float, anneal_updates: int) -> float:
    """Linear anneal from `start` (update 0) to `end` (update `anneal_updates` and later)."""
    if num_updates >= anneal_updates:
        return end
    return start + (end - start) * num_updates / anneal_updates


def instance_norm(
    x: torch.Tensor, padding_mask: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """x (B, T, C) -> per utterance and channel zero mean / unit variance over the valid
    frames (biased variance, like F.instance_norm), in fp32. Padding frames come out as 0."""
    x = x.float()
    if padding_mask is None:
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + eps)
    valid = (~padding_mask).unsqueeze(-1).float()
    count = valid.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = (x * valid).sum(dim=1, keepdim=True) / count
    var = ((x - mean).square() * valid).sum(dim=1, keepdim=True) / count
    return (x - mean) * torch.rsqrt(var + eps) * valid


def mean_std(y: torch.Tensor) -> torch.Tensor:
    """Std over rows (frames) of each column (channel), averaged over columns: data2vec's
    collapse statistic. Computed on this worker's frames only (no collective in the forward,
    so a rank-0-only validation cannot hang); the trainer may average it across workers."""
    y = y.detach().float().reshape(-1, y.shape[-1])
    if y.shape[0] < 2:  # undefined: NaN (the collapse guard counts NaN as a collapse)
        return y.new_full((), float("nan"))
    return torch.sqrt(y.var(dim=0) + 1e-6).mean()


class TeacherTarget(Target):
    def __init__(self, dim: int, cfg: TeacherConfig, encoder: nn.Module):
        super().__init__()
        num_layers = len(encoder.layers)
        if not 1 <= cfg.top_k <= num_layers:
            raise InputError(
                f"teacher.top_k = {cfg.top_k}: must be between 1 and the {num_layers} encoder layers"
            )
        self.cfg, self.weight = cfg, cfg.weight
        self.scale = cfg.loss_scale if cfg.loss_scale is not None else 1.0 / math.sqrt(dim)
        self.head = nn.Linear(dim, dim)
        self.decay = cfg.ema_decay
        self.ema = copy.deepcopy(encoder).float()
        self.ema.requires_grad_(False)
        self.ema.eval()

    def train(self, mode: bool = True) -> TeacherTarget:
        super().train(mode)
        self.ema.eval()  # the teacher never uses dropout or layerdrop
        return self

    @torch.no_grad()
    def reset(self, student_encoder: nn.Module) -> None:
        """Make the teacher an exact copy of the student (e.g. after loading student weights)."""
        self.ema.load_state_dict(student_encoder.state_dict())

    @torch.no_grad()
    def step(self, student_encoder: nn.Module, num_updates: int) -> None:
        """EMA update after optimizer update `num_updates`: teacher = d * teacher + (1 - d) *
        student for layers and encoder LayerNorm; the positional conv is copied."""
        cfg = self.cfg
        self.decay = ema_decay(num_updates, cfg.ema_decay, cfg.ema_end_decay, cfg.ema_anneal_updates)
        student = dict(student_encoder.named_parameters())
        for name, p in self.ema.named_parameters():
            s = student[name].detach().float()
            if name.startswith("pos_conv."):
                p.copy_(s)
            else:
                p.lerp_(s, 1.0 - self.decay)

    @torch.no_grad()
    def targets(self, batch: TargetBatch) -> torch.Tensor:
        """(N, C) fp32 targets at the masked frames."""
        out = self.ema(batch.features.detach().float(), batch.padding_mask)
        top = out.ffn_outputs[-self.cfg.top_k :]
        y = sum(instance_norm(f, batch.padding_mask) for f in top) / len(top)
        return batch.select(batch.repeat(y))  # one teacher pass, the targets of every masked copy

    def loss(self, x: torch.Tensor, batch: TargetBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        y = self.targets(batch)
        pred = self.head(x).float()
        loss = (pred - y).square().sum() * self.scale
        # (the EMA decay, a float that changes every update, is not logged from here: a compiled
        # forward would be recompiled for every new value; the task reads `self.decay`)
        logs = {"target_std": mean_std(y), "pred_std": mean_std(pred)}
        return loss, logs


class TrainingCollapsed(RuntimeError):
    """The regression targets or predictions collapsed to a constant."""


@dataclass(frozen=True)
class CollapseGuard:
    """data2vec's guard: after `after_updates` updates, the std of the teacher targets must
    stay >= `min_target_std` and that of the predictions >= `min_pred_std`.

    The trainer calls `check(logs, num_updates)` after every update with a finite loss and,
    when it raises, saves a checkpoint and re-raises. A NaN statistic is a collapse too (it
    fails every comparison, so `std < floor` alone would let it pass). Logs without the keys
    (no teacher target) always pass.
    """

    min_target_std: float = 0.1
    min_pred_std: float = 0.01
    after_updates: int = 5000

    def check(self, logs, num_updates: int) -> None:
        if num_updates <= self.after_updates:
            return
        checks = (
            ("target_std", self.min_target_std, "EMA teacher targets"),
            ("pred_std", self.min_pred_std, "regression predictions"),
        )
        for key, floor, what in checks:
            value = float(logs[key]) if key in logs else floor
            if not value >= floor:  # NaN: a collapse too
                how = ("is NaN (the " + what + " are not finite, or a batch had fewer than 2 masked frames)"
                       if math.isnan(value) else f"< {floor} (the {what} became nearly constant)")
                raise TrainingCollapsed(
                    f"training collapsed at update {num_updates}: {key} = {value:.4g} {how}. Lower the "
                    "learning rate, lengthen the warm-up or restart from an earlier checkpoint."
                )
