"""Offline targets (HuBERT style): k-means cluster ids computed before training.

One plain softmax classifier Linear(C, n_classes) per label set (e.g. "mfcc100",
"hubert500"), cross-entropy summed over the masked frames; the label sets' losses add up.
(MT4SSL's official code sizes the classifier by a fairseq dictionary, with 4 unused special
symbols; here it has exactly n_classes outputs.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mt4ssl.targets.base import Target, TargetBatch


@dataclass(frozen=True)
class KMeansConfig:
    weight: float = 1.0
    labels: tuple[str, ...] = ("hubert500",)  # label-set names, as in the batch's `labels`
    num_classes: tuple[int, ...] = (500,)  # clusters of each label set

    def __post_init__(self):
        if len(self.labels) != len(self.num_classes) or not self.labels:
            raise ValueError(
                f"kmeans.labels {self.labels} and kmeans.num_classes {self.num_classes} "
                "must be non-empty and of the same length"
            )


class KMeansTarget(Target):
    def __init__(self, dim: int, cfg: KMeansConfig, encoder: nn.Module | None = None):
        super().__init__()
        self.weight = cfg.weight
        self.heads = nn.ModuleDict(
            {name: nn.Linear(dim, n) for name, n in zip(cfg.labels, cfg.num_classes, strict=True)}
        )

    def loss(self, x: torch.Tensor, batch: TargetBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, logs = x.new_zeros((), dtype=torch.float32), {}
        for name, head in self.heads.items():
            if name not in batch.labels:
                raise ValueError(
                    f"the k-means target needs labels {name!r}; the batch has {sorted(batch.labels)}"
                )
            labels = batch.labels[name]
            if labels.shape != batch.mask.shape:
                raise ValueError(
                    f"labels {name!r} have shape {tuple(labels.shape)}, the CNN frames are "
                    f"{tuple(batch.mask.shape)} (one label per 20 ms frame expected)"
                )
            y = labels[batch.mask]
            logits = head(x).float()
            ce = F.cross_entropy(logits, y, reduction="sum")
            total = total + ce
            with torch.no_grad():
                logs[f"loss_{name}"] = ce.detach()
                logs[f"acc_{name}"] = (logits.argmax(-1) == y).float().mean()
        return total, logs
