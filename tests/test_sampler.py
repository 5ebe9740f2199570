import logging
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from mt4ssl.data.sampler import BucketBatchSampler
from mt4ssl.errors import InputError

MAX_TOKENS = 1_000_000
SIZES = np.random.default_rng(0).integers(32000, 320000, size=200)


def greedy_batch_count(sizes, max_tokens):
    """Independent count: walk the lengths in ascending order, open a new batch when one more
    utterance would make (count x longest) exceed max_tokens."""
    count, n = 1, 0
    for s in sorted(sizes):
        if (n + 1) * s > max_tokens:
            count, n = count + 1, 0
        n += 1
    return count


def rank_batches(world_size, epoch=0, **kw):
    samplers = [BucketBatchSampler(SIZES, MAX_TOKENS, rank=r, world_size=world_size, **kw)
                for r in range(world_size)]
    return samplers, [s.epoch_batches(epoch) for s in samplers]


def test_batches_respect_max_tokens_and_are_greedy_length_buckets():
    s = BucketBatchSampler(SIZES, MAX_TOKENS)
    assert len(s.batches) == greedy_batch_count(SIZES, MAX_TOKENS) == len(s) == 43
    for b in s.batches:
        assert len(b) * SIZES[b].max() <= MAX_TOKENS
    # the batches are consecutive runs of the length-sorted utterances, each as full as allowed
    flat = np.concatenate(s.batches)
    np.testing.assert_array_equal(SIZES[flat], np.sort(SIZES))
    for b, nxt in zip(s.batches, s.batches[1:]):
        assert (len(b) + 1) * SIZES[nxt[0]] > MAX_TOKENS
    # lengths inside a batch are similar: far less spread than the corpus
    spread = max(SIZES[b].max() - SIZES[b].min() for b in s.batches)
    assert spread < (SIZES.max() - SIZES.min()) / 4


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_index_exactly_once_per_epoch_over_ranks(world_size):
    assert greedy_batch_count(SIZES, MAX_TOKENS) % 2 == 1 and greedy_batch_count(SIZES, MAX_TOKENS) % 3 == 1
    for epoch in (0, 1):
        samplers, per_rank = rank_batches(world_size, epoch)
        counts = {len(b) for b in per_rank}
        assert len(counts) == 1 and counts == {len(samplers[0])}  # equal batch counts
        seen = Counter(i for batches in per_rank for b in batches for i in b)
        assert seen == Counter(range(len(SIZES)))  # each utterance once, on one rank
        for batches in per_rank:
            for b in batches:
                assert len(b) * SIZES[b].max() <= MAX_TOKENS
        # what the sampler yields through iter() is what epoch_batches says
        for s, batches in zip(samplers, per_rank):
            s.set_epoch(epoch)
            assert list(s) == batches


@pytest.mark.parametrize("world_size", [2, 3])
def test_drop_last_drops_the_remainder_batches(world_size):
    total = greedy_batch_count(SIZES, MAX_TOKENS)
    samplers, per_rank = rank_batches(world_size, drop_last=True)
    assert {len(b) for b in per_rank} == {total // world_size}
    seen = Counter(i for batches in per_rank for b in batches for i in b)
    assert max(seen.values()) == 1  # disjoint
    dropped = set(range(len(SIZES))) - set(seen)
    assert len(dropped) > 0
    # the dropped utterances are exactly those of (total mod world_size) whole batches
    whole = [b for b in samplers[0].batches if set(b.tolist()) <= dropped]
    assert len(whole) == total % world_size and sum(map(len, whole)) == len(dropped)


def test_same_seed_and_epoch_same_batches_other_epoch_or_seed_other_order():
    a = BucketBatchSampler(SIZES, MAX_TOKENS, seed=5)
    b = BucketBatchSampler(SIZES, MAX_TOKENS, seed=5)
    assert a.epoch_batches(0) == b.epoch_batches(0)
    assert a.epoch_batches(3) == b.epoch_batches(3)
    assert a.epoch_batches(0) != a.epoch_batches(1)
    assert sorted(a.epoch_batches(0)) == sorted(a.epoch_batches(1))  # same batches, new order
    assert BucketBatchSampler(SIZES, MAX_TOKENS, seed=6).epoch_batches(0) != a.epoch_batches(0)
    fixed = BucketBatchSampler(SIZES, MAX_TOKENS, shuffle=False)
    assert fixed.epoch_batches(0) == fixed.epoch_batches(1) == [x.tolist() for x in fixed.batches]


def test_resume_mid_epoch_yields_exactly_the_remaining_batches():
    s = BucketBatchSampler(SIZES, MAX_TOKENS, seed=1, rank=1, world_size=2)
    s.set_epoch(4)
    full = s.epoch_batches(4)
    taken = []
    for batch in s.counted(s):
        taken.append(batch)
        if len(taken) == 7:
            break
    state = s.state_dict()
    assert (state["epoch"], state["consumed"]) == (4, 7)

    r = BucketBatchSampler(SIZES, MAX_TOKENS, seed=1, rank=1, world_size=2)
    r.load_state_dict(state)
    r.set_epoch(4)  # a trainer's `for epoch in range(start, ...)` loop does this: keeps position
    rest = list(r.counted(r))
    assert taken + rest == full
    assert (r.epoch, r.consumed) == (5, 0)  # the next epoch starts fresh
    assert list(r) == r.epoch_batches(5)
    r.set_epoch(2)
    assert list(r) == r.epoch_batches(2)


def test_state_of_another_batching_is_refused():
    state = BucketBatchSampler(SIZES, MAX_TOKENS, world_size=2).state_dict()
    with pytest.raises(InputError, match="world_size=2, this run has 3"):
        BucketBatchSampler(SIZES, MAX_TOKENS, world_size=3).load_state_dict(state)
    with pytest.raises(InputError, match="max_tokens, seed or number of ranks changed"):
        BucketBatchSampler(SIZES, MAX_TOKENS // 2, world_size=2).load_state_dict(state)


def test_utterance_longer_than_max_tokens_is_named():
    sizes = [1000, 5000, 300, 4500]
    with pytest.raises(InputError, match=r"train.tsv:3: 5000 samples, more than max_tokens=4000 "
                                         r"\(and 1 more\); raise max_tokens"):
        BucketBatchSampler(sizes, 4000, where=lambda i: f"train.tsv:{i + 2}")
    with pytest.raises(InputError, match="utterance 1: 5000 samples"):
        BucketBatchSampler(sizes, 4999)


def test_too_few_utterances_for_the_ranks_repeat_with_a_warning(caplog):
    caplog.set_level(logging.WARNING, logger="mt4ssl.data.sampler")
    sizes = [900, 950, 1000]  # one utterance per batch: 3 batches cannot split over 2 ranks
    per_rank = [BucketBatchSampler(sizes, 1000, rank=r, world_size=2).epoch_batches(0) for r in (0, 1)]
    assert [len(b) for b in per_rank] == [2, 2]
    assert {i for b in per_rank for batch in b for i in batch} == {0, 1, 2}
    assert "1 batch(es) are repeated" in caplog.text
    with pytest.raises(InputError, match="fewer than the 4 ranks"):
        BucketBatchSampler(sizes, 1000, world_size=4, drop_last=True)


class Indices(Dataset):
    def __len__(self):
        return len(SIZES)

    def __getitem__(self, i):
        return i


class Spy(BucketBatchSampler):
    """Counts the batches the sampler hands to the DataLoader (in the main process)."""

    yielded = 0

    def __iter__(self):
        for batch in super().__iter__():
            self.yielded += 1
            yield batch


def loader(sampler):
    return DataLoader(Indices(), batch_sampler=sampler, num_workers=2, prefetch_factor=2,
                      collate_fn=torch.tensor)


def test_resume_through_a_prefetching_dataloader():
    s = Spy(SIZES, MAX_TOKENS, seed=3, rank=0, world_size=2)
    full = s.epoch_batches(0)
    taken = []
    for batch in s.counted(loader(s)):
        taken.append(batch.tolist())
        if len(taken) == 3:
            break
    assert s.yielded > 3  # the workers have prefetched batches the trainer never took
    state = s.state_dict()
    assert state["consumed"] == 3

    r = Spy(SIZES, MAX_TOKENS, seed=3, rank=0, world_size=2)
    r.load_state_dict(state)
    rest = [batch.tolist() for batch in r.counted(loader(r))]
    assert taken + rest == full
    assert r.epoch == 1 and [b.tolist() for b in r.counted(loader(r))] == r.epoch_batches(1)
