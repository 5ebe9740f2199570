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
    positions: (copies * B, n) int64, the masked frames of each row in increasing order, when
        every row has the same number n of them (`require_same_masks`; `masked_positions`),
        else None. With it `select` is a gather of a shape known from the input shapes, so a
        compiled step has no data-dependent shape (boolean indexing has one).
    """

    features: torch.Tensor
    padding_mask: torch.Tensor | None
    mask: torch.Tensor
    labels: Mapping[str, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None
    copies: int = 1
    positions: torch.Tensor | None = None

    def repeat(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """A per-utterance tensor (B, ...) -> one row per student copy (copies * B, ...)."""
        return x if x is None or self.copies == 1 else x.repeat_interleave(self.copies, dim=0)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """x (copies * B, T, ...) at the masked frames: (N, ...), row by row, each row's frames in
        order (the order and values of `x[mask]`)."""
        if self.positions is None:
            return x[self.mask]
        index = self.positions.view(*self.positions.shape, *([1] * (x.dim() - 2)))
        return x.gather(1, index.expand(-1, -1, *x.shape[2:])).flatten(0, 1)

    def unmasked(self) -> torch.Tensor:
        """(copies * B, T) bool: the frames that are neither masked nor padding."""
        keep = ~self.mask
        return keep if self.padding_mask is None else keep & ~self.repeat(self.padding_mask)


def masked_positions(mask: torch.Tensor) -> torch.Tensor | None:
    """(B, n) int64 positions of the masked frames of each row of `mask` (B, T), when every
    row has the same count n, else None. Call it outside a compiled region (it reads the
    counts on the host)."""
    counts = mask.sum(-1)
    if mask.dim() != 2 or mask.shape[0] == 0 or bool((counts != counts[0]).any()):
        return None
    return mask.nonzero()[:, 1].reshape(mask.shape[0], int(counts[0])).contiguous()  # not a view: fewer symbols


class Target(nn.Module, abc.ABC):
    """A prediction target at the masked frames; owns its prediction head(s)."""

    weight: float = 1.0

    @abc.abstractmethod
    def loss(self, x: torch.Tensor, batch: TargetBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x: (N, C) student output at the N masked frames (in `batch.mask` order).
        Returns (loss summed over the N frames, {log name: scalar tensor})."""

    def step(self, student_encoder: nn.Module, num_updates: int) -> None:
        """Called once after every optimizer update, `num_updates` of them done (the EMA
        teacher updates itself here; see also TeacherConfig.ema_per_micro_batch)."""
