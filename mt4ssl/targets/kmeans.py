"""Offline targets (HuBERT style): k-means cluster ids computed before training.

One plain softmax classifier Linear(C, n_classes) per label set (e.g. "mfcc100",
"hubert500"), cross-entropy summed over the masked frames; the label sets' losses add up.
(MT4SSL's official code sizes the classifier by a fairseq dictionary, with 4 unused special
symbols; here it has exactly n_classes outputs.)

`unmasked_weight` is HuBERT's `pred_nomask_weight`: with w > 0 the same classifier also
predicts the labels of the unmasked frames, adding w x their cross-entropy sum (the paper and
HuBERT Base use 0: masked frames only). It trains the CNN directly on what the labels
encode, a fast signal for short runs; the trainer still normalises by the masked frames.
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
    unmasked_weight: float = 0.0  # HuBERT's pred_nomask_weight; 0 = masked frames only (the paper)

    def __post_init__(self):
        if len(self.labels) != len(self.num_classes) or not self.labels:
            raise ValueError(
                f"kmeans.labels {self.labels} and kmeans.num_classes {self.num_classes} "
                "must be non-empty and of the same length"
            )
        if not self.unmasked_weight >= 0:
            raise ValueError(f"kmeans.unmasked_weight {self.unmasked_weight} must be >= 0")
        if not self.weight >= 0:
            raise ValueError(f"kmeans.weight {self.weight} must be >= 0")
        if any(n < 1 for n in self.num_classes):
            raise ValueError(f"kmeans.num_classes {self.num_classes}: each must be at least 1")


class KMeansTarget(Target):
    def __init__(self, dim: int, cfg: KMeansConfig, encoder: nn.Module | None = None):
        super().__init__()
        self.weight, self.unmasked_weight = cfg.weight, cfg.unmasked_weight
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
            labels = batch.repeat(batch.labels[name])  # the same ids for every masked copy
            if labels.shape != batch.mask.shape:
                raise ValueError(
                    f"labels {name!r} have shape {tuple(batch.labels[name].shape)}, the CNN frames are "
                    f"{tuple(batch.features.shape[:2])} (one label per 20 ms frame expected)"
                )
            y = batch.select(labels)
            logits = head(x).float()
            ce = F.cross_entropy(logits, y, reduction="sum")
            total = total + ce
            with torch.no_grad():
                logs[f"loss_{name}"] = ce.detach()
                logs[f"acc_{name}"] = (logits.argmax(-1) == y).float().mean()
            if self.unmasked_weight > 0:
                if batch.hidden is None:
                    raise ValueError("kmeans.unmasked_weight > 0 needs the student output at every frame "
                                     "(TargetBatch.hidden)")
                # every frame, weighted by keep: no data-dependent shape (torch.compile)
                # (B, T) shapes, not flattened ones: B*T == B*T' made dynamo specialize T
                ce_all = F.cross_entropy(head(batch.hidden).float().transpose(1, 2), labels, reduction="none")
                total = total + self.unmasked_weight * (ce_all * batch.unmasked().float()).sum()
        return total, logs
