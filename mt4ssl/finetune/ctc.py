"""CTC building blocks shared by the phone probe and CTC fine-tuning.

`Dictionary`  token <-> index, the CTC blank at index 0 (fairseq and s3prl put it there too)
`collapse`    best-path collapse: merge repeated tokens, then drop blanks
`greedy_decode`  argmax per frame + collapse, for a padded batch of CTC outputs
`error_rate`  edit distance in tokens / reference tokens (PER on phones, WER on words)
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

try:  # C implementation (s3prl's dev extra); the DP below gives the same numbers
    import editdistance as _editdistance
except ImportError:  # pragma: no cover - depends on the environment
    _editdistance = None

BLANK = "<blank>"


@dataclass(frozen=True)
class Dictionary:
    """An ordered token set; index 0 is the CTC blank."""

    symbols: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if len(set(self.symbols)) != len(self.symbols):
            raise ValueError(f"duplicate symbols in {self.symbols}")
        object.__setattr__(self, "_index", {s: i for i, s in enumerate(self.symbols)})

    @classmethod
    def from_symbols(cls, symbols: Iterable[str], blank: str = BLANK) -> Dictionary:
        """The blank, then `symbols` in the given order."""
        symbols = tuple(symbols)
        if blank in symbols:
            raise ValueError(f"{blank!r} is reserved for the CTC blank")
        return cls((blank, *symbols))

    @property
    def blank(self) -> int:
        return 0

    def __len__(self) -> int:
        return len(self.symbols)

    def __contains__(self, symbol: str) -> bool:
        return symbol in self._index

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Tokens -> indices; an unknown token is a KeyError naming it."""
        out = []
        for t in tokens:
            if t not in self._index or self._index[t] == 0:
                raise KeyError(f"token {t!r} is not in the dictionary")
            out.append(self._index[t])
        return out

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Indices -> tokens, blanks dropped (no collapse: see `collapse`)."""
        return [self.symbols[int(i)] for i in ids if int(i) != 0]


def collapse(ids: Iterable[int], blank: int = 0) -> list[int]:
    """CTC best-path collapse: [a a _ a b b] -> [a a b] (repeats merge unless a blank splits them)."""
    out, prev = [], None
    for i in ids:
        i = int(i)
        if i != prev and i != blank:
            out.append(i)
        prev = i
    return out


def greedy_decode(logits: torch.Tensor, lengths: torch.Tensor | Sequence[int] | None = None,
                  blank: int = 0) -> list[list[int]]:
    """(B, T, V) scores (logits or log-probs) -> collapsed best paths, one per utterance;
    frames at or beyond `lengths[b]` are padding and ignored."""
    best = logits.argmax(-1).cpu()
    B, T = best.shape
    lengths = [T] * B if lengths is None else [int(n) for n in lengths]
    return [collapse(best[b, : lengths[b]].tolist(), blank) for b in range(B)]


def edit_distance(ref: Sequence[Hashable], hyp: Sequence[Hashable]) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1)."""
    if _editdistance is not None:
        return int(_editdistance.eval(ref, hyp))
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def error_rate(refs: Iterable[Sequence[Hashable]], hyps: Iterable[Sequence[Hashable]]) -> float:
    """Corpus error rate: total edit distance / total reference tokens (a fraction: 0.25 = 25%)."""
    refs, hyps = list(refs), list(hyps)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    n_ref = sum(len(r) for r in refs)
    if n_ref == 0:
        raise ValueError("the references have no tokens")
    return sum(edit_distance(r, h) for r, h in zip(refs, hyps)) / n_ref
