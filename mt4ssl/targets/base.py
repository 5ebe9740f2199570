"""The one interface every prediction target implements.

A target reads the student's last-layer output at the masked frames and returns a loss
SUMMED over those frames plus a few values to log. The trainer adds the targets' weighted
losses and divides by the number of masked frames summed over all workers, as fairseq does
with `sample_size`. Adding a target kind = one file with a `Target` subclass and its frozen
config dataclass, registered in `mt4ssl/targets/__init__.py`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class TargetBatch:
    """What a target may look at besides the student's output, for one batch.

    features: (B, T, C) projected CNN features before input dropout and masking (the EMA
        teacher's input).
    padding_mask: (B, T) bool, True = padding frame; None when nothing is padded.
    mask: (copies * B, T) bool, True = masked frame; masked frames are never padding.
    labels: label-set name -> (B, T) int64 frame labels (e.g. k-means cluster ids).
    hidden: (copies * B, T, C) the student's last-layer output at every frame (for a loss on
        the unmasked frames too); None when the caller did not provide it.
    copies: masked copies of each utterance the student saw (data2vec 2.0's clone batch,
        `model.teacher.masks_per_sample`): rows b * copies ... b * copies + copies - 1 of
        `mask` and `hidden` are utterance b; `repeat` expands a per-utterance tensor to them.
    """

    features: torch.Tensor
    padding_mask: torch.Tensor | None
    mask: torch.Tensor
    labels: Mapping[str, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None
    copies: int = 1

    def repeat(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """A per-utterance tensor (B, ...) -> one row per student copy (copies * B, ...)."""
        return x if x is None or self.copies == 1 else x.repeat_interleave(self.copies, dim=0)

    def unmasked(self) -> torch.Tensor:
        """(copies * B, T) bool: the frames that are neither masked nor padding."""
        keep = ~self.mask
        return keep if self.padding_mask is None else keep & ~self.repeat(self.padding_mask)


class Target(nn.Module, abc.ABC):
    """A prediction target at the masked frames; owns its prediction head(s)."""

    weight: float = 1.0

    @abc.abstractmethod
    def loss(self, x: torch.Tensor, batch: TargetBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x: (N, C) student output at the N masked frames (in `batch.mask` order).
        Returns (loss summed over the N frames, {log name: scalar tensor})."""

    def step(self, student_encoder: nn.Module, num_updates: int, steps: int = 1) -> None:
        """Called once after every optimizer update (the EMA teacher updates itself here;
        `steps`: EMA steps to take, see TeacherConfig.ema_per_micro_batch)."""
