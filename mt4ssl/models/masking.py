"""Span masking over time (pretraining, fine-tuning) and over channels (fine-tuning).

The sampler of wav2vec 2.0 / HuBERT / data2vec, with the settings MT4SSL uses:

- each row with `n` valid frames gets `int(prob * n / length + u)` spans (u ~ U[0, 1):
  probabilistic rounding), at least `min_spans`;
- every span has the same `length` ("static"); span starts are distinct and drawn from the
  valid part so a span never reaches into padding; spans may overlap, so only about
  half of the frames end up masked for prob 0.65 (49% for long rows), not 65%;
- `require_same_masks`: rows with more masked frames than the row with the fewest drop
  randomly chosen masked frames until every row has the same count (so the batch can be
  packed into one (B, n_masked, C) tensor and every row weighs the same in the loss).

Randomness comes only from the `np.random.Generator` passed in, so a seed reproduces a mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def sample_span_mask(
    lengths: Sequence[int],
    num_frames: int,
    prob: float,
    length: int,
    rng: np.random.Generator,
    min_spans: int = 1,
    require_same_masks: bool = True,
) -> np.ndarray:
    """(B, num_frames) bool mask, True = masked; row b only masks frames < lengths[b]."""
    lengths = [int(n) for n in lengths]
    if length < 1:
        raise ValueError(f"mask length must be >= 1, got {length}")
    if any(n < 1 or n > num_frames for n in lengths):
        raise ValueError(f"every row needs 1..{num_frames} valid frames to mask, got lengths {lengths}")

    rows = []
    for n in lengths:
        num_spans = max(min_spans, int(prob * n / length + rng.random()))
        # starts lie in [0, n - length) so spans end inside the row; for rows barely longer
        # than a span the range widens to num_spans + 1 and spans are clipped at the row end
        num_starts = max(n - length, num_spans + 1)
        starts = rng.choice(num_starts, num_spans, replace=False)
        frames = (starts[:, None] + np.arange(length)[None, :]).ravel()
        rows.append(np.unique(frames[frames < n]))

    if require_same_masks:
        target = min(len(r) for r in rows)
        rows = [r if len(r) == target else rng.choice(r, target, replace=False) for r in rows]

    mask = np.zeros((len(lengths), num_frames), dtype=bool)
    for b, frames in enumerate(rows):
        mask[b, frames] = True
    return mask


def sample_channel_mask(
    batch_size: int, dim: int, prob: float, length: int, rng: np.random.Generator
) -> np.ndarray:
    """(B, dim) bool mask of channels to zero at every frame (fine-tuning's SpecAugment over
    features): spans of `length` channels, no minimum number of spans, same count per row."""
    return sample_span_mask([dim] * batch_size, dim, prob, length, rng, min_spans=0, require_same_masks=True)
