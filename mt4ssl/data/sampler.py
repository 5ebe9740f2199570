"""Length-bucketed batches by total samples, shuffled per epoch, sharded over ranks, resumable.

Batches (built once, from the utterances sorted by length, so each holds similar lengths):
  a batch's cost is (utterances) x (its longest utterance), and it is at most `max_tokens`
  (fairseq's `max_tokens` rule). That is what a padded batch really holds; a cropped batch
  ("crop" collate) holds less, but within a length-sorted batch the longest and the shortest
  differ little, and bounding the longest keeps one rule safe for both collate modes.
  An utterance longer than `max_tokens` is an error naming it.

Epochs: the batches themselves stay fixed, their order is shuffled with a generator seeded
  by (seed, epoch) (fairseq's EpochBatchIterator does the same), so every rank computes the
  same order without communicating. Rank r takes batches r, r + W, r + 2W, ... of that order.

Equal batch counts on every rank (a DDP step needs every rank):
  drop_last=False (default): when the batch count is not a multiple of the world size W, the
    largest batches are split in two (a half still fits `max_tokens`) until it is. Every
    utterance is then seen exactly once per epoch, on exactly one rank. Only when even
    single-utterance batches cannot make a multiple of W (fewer utterances than that needs, a
    toy case) are the epoch's first batches repeated at its end, with a warning.
  drop_last=True: the last (count mod W) batches of each epoch's order are dropped (other
    ones every epoch when shuffled).

Resuming and DataLoader prefetching: a DataLoader with workers pulls batches from the
  sampler ahead of the trainer (`prefetch_factor` x `num_workers` of them), so what the
  sampler has yielded is not what the trainer has used. The sampler therefore counts only
  batches the trainer has taken: iterate `for batch in sampler.counted(loader)` (or call
  `sampler.advance()` once per batch taken). `state_dict()` = {"epoch", "consumed", ...};
  after `load_state_dict(state)`, the next `iter()` (a new DataLoader iterator) yields exactly
  the remaining batches of that epoch. Each `iter()` starts at the current count, so batches
  that were prefetched but never taken are yielded again. When the count reaches the end of
  the epoch the sampler moves to the next epoch, which starts fresh. `set_epoch(e)` with the
  current epoch keeps the position (so `for e in range(start, n): sampler.set_epoch(e)` after
  a resume is safe); another epoch starts that one from its first batch. The DataLoader must
  keep batch order (`in_order=True`, its default).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from mt4ssl.errors import InputError

log = logging.getLogger(__name__)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices for one rank; see the module docstring.

    sizes: length (samples) of each item; where(i) names item i in error messages (e.g.
    `PretrainDataset.where`). Use as `DataLoader(dataset, batch_sampler=sampler, ...)`.
    """

    def __init__(self, sizes: Sequence[int] | np.ndarray, max_tokens: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, drop_last: bool = False,
                 where: Callable[[int], str] | None = None):
        sizes = np.asarray(sizes, dtype=np.int64)
        if sizes.ndim != 1 or len(sizes) == 0:
            raise InputError(f"no utterances to batch (sizes of shape {sizes.shape})")
        if max_tokens <= 0:
            raise InputError(f"max_tokens={max_tokens}: must be positive")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if seed < 0:
            raise ValueError(f"seed {seed} must be non-negative")
        where = where or (lambda i: f"utterance {i}")
        too_long = np.flatnonzero(sizes > max_tokens)
        if len(too_long):
            i = int(too_long[np.argmax(sizes[too_long])])
            more = f" (and {len(too_long) - 1} more)" if len(too_long) > 1 else ""
            raise InputError(f"{where(i)}: {sizes[i]} samples, more than max_tokens={max_tokens}"
                             f"{more}; raise max_tokens or lower max_samples")
        self.max_tokens, self.seed, self.rank, self.world_size = max_tokens, seed, rank, world_size
        self.shuffle, self.drop_last = shuffle, drop_last

        batches: list[np.ndarray] = []
        start = 0
        order = np.argsort(sizes, kind="stable")
        sorted_sizes = sizes[order]
        for k in range(len(order)):  # ascending: the k-th is the longest of the open batch
            if (k - start + 1) * sorted_sizes[k] > max_tokens:
                batches.append(order[start:k])
                start = k
        batches.append(order[start:])

        self._repeat = 0
        if not drop_last:
            while len(batches) % world_size:
                j = max(range(len(batches)), key=lambda b: len(batches[b]))
                if len(batches[j]) < 2:
                    self._repeat = -len(batches) % world_size
                    log.warning("%d utterances cannot make a multiple of %d batches; %d batch(es) "
                                "are repeated at the end of every epoch", len(sizes), world_size,
                                self._repeat)
                    break
                half = len(batches[j]) // 2
                batches[j:j + 1] = [batches[j][:half], batches[j][half:]]
        elif len(batches) < world_size:
            raise InputError(f"{len(batches)} batch(es) of at most max_tokens={max_tokens} samples "
                             f"are fewer than the {world_size} ranks")
        self.batches = batches  # fixed for every epoch, in length order
        self._len = (len(batches) + self._repeat) // world_size
        self._fingerprint = zlib.crc32(np.concatenate(
            [np.array([len(b) for b in batches]), *batches]).astype(np.int64).tobytes())
        self.epoch, self.consumed = 0, 0

    def __len__(self) -> int:
        """Batches per epoch for this rank (a resumed epoch yields `len - consumed`)."""
        return self._len

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All of this rank's batches of `epoch`, in order."""
        n = len(self.batches)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            order = np.arange(n)
        if self._repeat:
            order = np.concatenate([order, order[:self._repeat]])
        order = order[:self._len * self.world_size]  # drop_last
        return [self.batches[b].tolist() for b in order[self.rank::self.world_size]]

    def __iter__(self) -> Iterator[list[int]]:
        """This epoch's batches not yet taken (fixed when `iter()` is called)."""
        return iter(self.epoch_batches(self.epoch)[self.consumed:])

    def set_epoch(self, epoch: int) -> None:
        """Go to `epoch`, from its first batch; the current epoch keeps its position."""
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def advance(self, n: int = 1) -> None:
        """Record that the trainer took n more batches; at the epoch's end go to the next."""
        if n < 0 or self.consumed + n > self._len:
            raise ValueError(f"cannot advance by {n}: {self.consumed} of {self._len} batches of "
                             f"epoch {self.epoch} are taken")
        self.consumed += n
        if self.consumed == self._len:
            self.epoch, self.consumed = self.epoch + 1, 0

    def counted(self, batches: Iterable) -> Iterator:
        """Yield from `batches` (a DataLoader over this sampler), counting each batch as taken
        when it is handed over."""
        for batch in batches:
            self.advance()
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "world_size": self.world_size, "batches": len(self.batches),
                "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state`'s position; the batching must be the one it was saved with."""
        mine = self.state_dict()
        for key in ("seed", "world_size", "batches", "fingerprint"):
            if state.get(key) != mine[key]:
                raise InputError(
                    f"the saved sampler state has {key}={state.get(key)}, this run has {mine[key]}: "
                    "the data, max_tokens, seed or number of ranks changed since the checkpoint, "
                    "so its position in the epoch cannot be resumed")
        if not 0 <= state["consumed"] < self._len:
            raise InputError(f"saved sampler position {state['consumed']} is outside the "
                             f"{self._len} batches of an epoch")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
