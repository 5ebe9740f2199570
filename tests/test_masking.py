"""Span and channel masking: rate, span structure, equal counts, padding, determinism."""

from math import comb

import numpy as np
import pytest

from mt4ssl.models.masking import sample_channel_mask, sample_span_mask


def runs(row: np.ndarray) -> list[int]:
    """Lengths of the maximal runs of True in a 1-D bool array."""
    padded = np.concatenate([[False], row, [False]]).astype(int)
    edges = np.flatnonzero(np.diff(padded))
    return list(edges[1::2] - edges[::2])


def expected_rate(n: int, prob: float, length: int) -> float:
    """Exact expected masked fraction of an n-frame row (spans drawn without replacement from
    n - length starts, number of spans probabilistically rounded)."""
    starts = n - length
    mean_spans = prob * n / length
    lo = int(mean_spans)
    rate = 0.0
    for k, weight in ((lo, 1 - (mean_spans - lo)), (lo + 1, mean_spans - lo)):
        covered = 0.0
        for t in range(n):
            c = min(t, starts - 1) - max(0, t - length + 1) + 1  # starts whose span covers t
            covered += 1 - comb(starts - c, k) / comb(starts, k)
        rate += weight * covered / n
    return rate


def test_rate_close_to_expected():
    rng = np.random.default_rng(0)
    mask = sample_span_mask([500] * 200, 500, 0.65, 10, rng, require_same_masks=False)
    expected = expected_rate(500, 0.65, 10)
    assert 0.47 < expected < 0.50  # not 0.65: spans overlap (about 1 - exp(-0.65))
    assert abs(mask.mean() - expected) < 0.01


def test_spans_are_static_length_inside_the_row():
    rng = np.random.default_rng(1)
    mask = sample_span_mask([300] * 50, 300, 0.65, 10, rng, require_same_masks=False)
    for row in mask:
        assert all(r >= 10 for r in runs(row))  # spans only merge, never get cut
    single = sample_span_mask([300] * 50, 300, 0.001, 10, rng, require_same_masks=False)
    for row in single:  # min_spans = 1: exactly one span of 10
        assert runs(row) == [10]


def test_same_count_per_row_and_no_mask_in_padding():
    rng = np.random.default_rng(2)
    lengths = [200, 150, 99, 180]
    mask = sample_span_mask(lengths, 200, 0.65, 10, rng)
    counts = mask.sum(1)
    assert len(set(counts)) == 1 and counts[0] > 0
    for row, n in zip(mask, lengths, strict=True):
        assert not row[n:].any()


def test_at_least_one_span():
    rng = np.random.default_rng(3)
    mask = sample_span_mask([20] * 8, 20, 0.01, 10, rng, require_same_masks=False)
    assert (mask.sum(1) == 10).all()
    mask = sample_span_mask([20, 15, 12], 20, 0.01, 10, rng)  # short rows still get a span
    assert (mask.sum(1) == 10).all()


def test_deterministic_given_generator():
    a = sample_span_mask([100, 80], 100, 0.65, 10, np.random.default_rng(7))
    b = sample_span_mask([100, 80], 100, 0.65, 10, np.random.default_rng(7))
    c = sample_span_mask([100, 80], 100, 0.65, 10, np.random.default_rng(8))
    assert (a == b).all() and (a != c).any()


def test_channel_mask():
    rng = np.random.default_rng(4)
    mask = sample_channel_mask(16, 768, 0.5, 64, rng)
    assert mask.shape == (16, 768)
    assert len(set(mask.sum(1))) == 1
    assert 0.25 < mask.mean() < 0.5
    assert not sample_channel_mask(4, 768, 0.0, 64, rng).any()


def test_bad_lengths():
    with pytest.raises(ValueError):
        sample_span_mask([0, 10], 10, 0.65, 10, np.random.default_rng(0))
    with pytest.raises(ValueError):
        sample_span_mask([11], 10, 0.65, 10, np.random.default_rng(0))
