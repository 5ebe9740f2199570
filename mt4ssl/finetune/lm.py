"""`mt4ssl lm`: a word n-gram language model in ARPA format from transcripts.

    mt4ssl lm exp/tiny/manifests/train.wrd --order 3 --out exp/tiny/lm/3gram.arpa

Interpolated modified Kneser-Ney (Chen & Goodman 1998), the estimate KenLM's `lmplz` makes,
written as a backoff ARPA file that KenLM (and so the CTC beam decoder) loads. KenLM's
`lmplz` is not part of the `kenlm` pip package and no Debian package has it; Debian's IRSTLM
(6.00.05, upstream inactive since 2016) installs but prunes singletons by default and gives
`<s>` probability mass as a predicted word, so the project estimates its own small models.
For LibriSpeech use the official 4-gram (`--lm 4-gram.arpa.gz` in `mt4ssl decode`).

The estimate, for order N over sentences padded as `<s> w1 ... wk </s>`:
- adjusted counts a(g): the raw count for N-grams and for n-grams starting with `<s>`
  (nothing precedes `<s>`), else the number of distinct words seen left of g (continuation);
- per order n, discounts D1, D2, D3+ from the count-of-counts t1..t4 of a at that order:
  Y = t1 / (t1 + 2 t2), Dk = k - (k + 1) Y t(k+1) / tk; when one is undefined or outside
  (0, k] (tiny corpora), lmplz's fallback (0.5, 1.0, 1.5) is used for that order, with a note;
- p(w | h) = (a(hw) - D(a(hw))) / S(h) + g(h) p(w | h'), S(h) = sum_w a(hw),
  g(h) = (D1 N1(h) + D2 N2(h) + D3+ N3+(h)) / S(h), h' = h without its first word;
  unigrams interpolate with the uniform distribution over the predicted vocabulary (every
  word, `</s>` and `<unk>`; `<s>` is never predicted and is written with log10 p = -99).
In backoff form the listed n-grams carry p(w | h) and each context its g(h): an interpolated
model is exactly a backoff model with those weights, so the file sums to one in every context.
ARPA numbers are log10.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from mt4ssl.errors import InputError
from mt4ssl.utils.io import atomic_open

log = logging.getLogger(__name__)

SOS, EOS, UNK = "<s>", "</s>", "<unk>"
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # lmplz's --discount_fallback defaults
NEVER = -99.0  # log10 probability written for <s> (SRILM and KenLM convention)
KENLM_BINARY_MAGIC = b"mmap lm "  # first bytes of a KenLM binary file
Ngram = tuple[str, ...]


@dataclass(frozen=True)
class NGramLM:
    """A backoff n-gram model: log10 probabilities and backoff weights per listed n-gram."""

    order: int
    logprob: tuple[dict[Ngram, float], ...]  # [n - 1]: n-gram -> log10 p(w | h)
    backoff: tuple[dict[Ngram, float], ...]  # [n - 1]: n-gram as a context -> log10 g
    discounts: tuple[tuple[float, float, float], ...]  # [n - 1]: D1, D2, D3+

    @property
    def vocabulary(self) -> tuple[str, ...]:
        """Every word the model predicts (`<s>` is not one of them), sorted."""
        return tuple(sorted(g[0] for g in self.logprob[0] if g[0] != SOS))

    def score(self, word: str, context: Sequence[str] = ()) -> float:
        """log10 p(word | context) by the backoff rule (unknown words are `<unk>`)."""
        known = self.logprob[0]
        word = word if (word,) in known else UNK
        context = tuple(w if (w,) in known else UNK for w in context)[-(self.order - 1):] \
            if self.order > 1 else ()
        total = 0.0
        while True:
            g = context + (word,)
            if g in self.logprob[len(g) - 1]:
                return total + self.logprob[len(g) - 1][g]
            total += self.backoff[len(context) - 1].get(context, 0.0)
            context = context[1:]

    def sentence_score(self, words: Sequence[str]) -> float:
        """log10 p(<s> words </s>), as KenLM's `Model.score(sentence)` gives it."""
        history = [SOS]
        total = 0.0
        for w in list(words) + [EOS]:
            total += self.score(w, history)
            history.append(w)
        return total

    def write_arpa(self, path: str | Path) -> None:
        """Write the model as an ARPA file (gzip'd when `path` ends in .gz), atomically."""
        path = Path(path)
        with atomic_open(path, "wb") as raw:
            f = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if path.suffix == ".gz" else raw
            f.write(self.arpa_text().encode("utf-8"))
            if f is not raw:
                f.close()

    def arpa_text(self) -> str:
        lines = ["\\data\\"]
        lines += [f"ngram {n}={len(self.logprob[n - 1])}" for n in range(1, self.order + 1)]
        for n in range(1, self.order + 1):
            lines += ["", f"\\{n}-grams:"]
            probs, bows = self.logprob[n - 1], self.backoff[n - 1]
            for g in sorted(probs):
                entry = f"{probs[g]:.7g}\t{' '.join(g)}"
                if n < self.order and g in bows and g[-1] != EOS:
                    entry += f"\t{bows[g]:.7g}"
                lines.append(entry)
        lines += ["", "\\end\\", ""]
        return "\n".join(lines)


def count_ngrams(sentences: Iterable[Sequence[str]], order: int) -> list[Counter]:
    """Raw counts of every n-gram, n = 1..order, in `<s> words </s>`-padded sentences."""
    counts = [Counter() for _ in range(order)]
    for words in sentences:
        for special in (SOS, EOS):
            if special in words:
                raise InputError(f"the text contains the reserved word {special!r}: {' '.join(words)}")
        padded = (SOS, *words, EOS)
        for n in range(1, order + 1):
            c = counts[n - 1]
            for i in range(len(padded) - n + 1):
                c[padded[i:i + n]] += 1
    return counts


def adjusted_counts(counts: list[Counter]) -> list[dict[Ngram, int]]:
    """Kneser-Ney counts: raw at the top order and for `<s>`-initial n-grams, else the number
    of distinct left extensions."""
    order = len(counts)
    adjusted: list[dict[Ngram, int]] = [dict() for _ in range(order)]
    adjusted[-1] = dict(counts[-1])
    for n in range(order - 1, 0, -1):  # n-grams of length n from the (n+1)-grams
        cont: dict[Ngram, int] = defaultdict(int)
        for g in counts[n]:
            cont[g[1:]] += 1
        a = adjusted[n - 1]
        for g, c in counts[n - 1].items():
            a[g] = c if g[0] == SOS else cont[g]
    return adjusted


def discounts(adjusted: dict[Ngram, int], n: int) -> tuple[float, float, float]:
    """Modified Kneser-Ney discounts D1, D2, D3+ of one order (lmplz's fallback if degenerate)."""
    t = Counter(c for g, c in adjusted.items() if c <= 4 and g != (SOS,))
    t1, t2, t3, t4 = (t[k] for k in (1, 2, 3, 4))
    if min(t1, t2, t3, t4) > 0:
        y = t1 / (t1 + 2 * t2)
        d = (1 - 2 * y * t2 / t1, 2 - 3 * y * t3 / t2, 3 - 4 * y * t4 / t3)
        if all(0 < dk <= k for k, dk in enumerate(d, start=1)):
            return d
    log.info("order %d: count-of-counts %s give no valid Kneser-Ney discounts (too little "
             "text); using the fallback %s", n, (t1, t2, t3, t4), FALLBACK_DISCOUNTS)
    return FALLBACK_DISCOUNTS


def estimate(sentences: Iterable[Sequence[str]], order: int = 3) -> NGramLM:
    """Interpolated modified Kneser-Ney n-gram model of `sentences` (lists of words)."""
    if order < 2:
        raise InputError(f"--order {order}: must be at least 2 (KenLM loads no unigram-only model)")
    counts = count_ngrams(sentences, order)
    if not counts[0] or set(counts[0]) <= {(SOS,), (EOS,)}:
        raise InputError("the text has no words to estimate a language model from")
    adjusted = adjusted_counts(counts)
    ds = tuple(discounts(adjusted[n - 1], n) for n in range(1, order + 1))

    def discount(c: int, d: tuple[float, float, float]) -> float:
        return d[min(c, 3) - 1]

    # unigrams: interpolated with the uniform distribution over the predicted vocabulary
    uni = {g: c for g, c in adjusted[0].items() if g != (SOS,)}
    vocab = set(uni) | {(UNK,)}
    total = sum(uni.values())
    gamma = sum(discount(c, ds[0]) for c in uni.values()) / total
    prob: list[dict[Ngram, float]] = [{g: gamma / len(vocab) for g in vocab}]
    for g, c in uni.items():
        prob[0][g] += (c - discount(c, ds[0])) / total
    bows: list[dict[Ngram, float]] = [dict() for _ in range(order)]
    for n in range(2, order + 1):
        by_context: dict[Ngram, list[tuple[Ngram, int]]] = defaultdict(list)
        for g, c in adjusted[n - 1].items():
            by_context[g[:-1]].append((g, c))
        lower, here = prob[n - 2], {}
        for h, items in by_context.items():
            s = sum(c for _, c in items)
            g_h = sum(discount(c, ds[n - 1]) for _, c in items) / s
            bows[n - 2][h] = g_h
            for g, c in items:
                here[g] = (c - discount(c, ds[n - 1])) / s + g_h * lower[g[1:]]
        prob.append(here)
    logprob = tuple({g: math.log10(p) for g, p in probs.items()} for probs in prob)
    logprob[0][(SOS,)] = NEVER
    backoff = tuple({g: math.log10(b) for g, b in bo.items()} for bo in bows)
    return NGramLM(order, logprob, backoff, ds)


def read_sentences(paths: Sequence[str | Path]) -> list[list[str]]:
    """Word lists from transcript files (`.wrd`: one utterance per line); blank lines skipped."""
    sentences = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: transcript file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text ({e})") from None
        sentences += [line.split() for line in text.splitlines() if line.strip()]
    return sentences


# ---------------------------------------------------------------------- reading ARPA files

def open_text(path: Path):
    """A text file, or a gzip'd one (by its magic bytes), for reading."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def lm_kind(path: str | Path) -> str:
    """"binary" (KenLM) or "arpa" (plain or gzip'd); a missing or non-LM file is an InputError
    naming the file (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: language model file not found")
    with open(path, "rb") as f:
        head = f.read(len(KENLM_BINARY_MAGIC))
    if head == KENLM_BINARY_MAGIC:
        return "binary"
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    if line.strip() != "\\data\\":
                        raise InputError(f"{path}:{lineno}: not an ARPA language model (the first "
                                         f"line is {line.strip()[:60]!r}, not \\data\\) nor a "
                                         "KenLM binary")
                    return "arpa"
    except (OSError, EOFError) as e:  # a truncated or corrupt gzip stream
        raise InputError(f"{path}: cannot read the language model: {e}") from None
    raise InputError(f"{path}: empty file, not a language model")


def arpa_unigrams(path: str | Path) -> list[str]:
    """The words of an ARPA file's 1-grams section (read up to the 2-grams only)."""
    path = Path(path)
    words, inside = [], False
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                line = line.strip()
                if line == "\\1-grams:":
                    inside = True
                elif inside and (line.startswith("\\") or not line):
                    if words:
                        return words
                elif inside:
                    fields = line.split()
                    if len(fields) < 2:
                        raise InputError(f"{path}:{lineno}: expected 'log10p word [backoff]' in "
                                         f"the 1-grams, got {line[:60]!r}")
                    words.append(fields[1])
    except (OSError, EOFError) as e:  # a truncated or corrupt gzip stream
        raise InputError(f"{path}: cannot read the language model: {e}") from None
    if not words:
        raise InputError(f"{path}: no \\1-grams: section")
    return words


_KENLM_ERROR = re.compile(r"threw (\w+)(?: because `.*?'\.)?\.?\s*(.*?)\s*Byte: (\d+)", re.S)


def explain_kenlm_error(path: str | Path, message: str) -> str:
    """KenLM's load error (it gives a byte offset) as `file:line: what is wrong`."""
    path = Path(path)
    m = _KENLM_ERROR.search(message)
    if not m:
        return f"{path}: cannot load the language model: {message.strip()}"
    what, offset = m.group(2).strip() or m.group(1), int(m.group(3))
    try:
        with open(path, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            data = f.read(offset + 1)
    except (OSError, EOFError):
        return f"{path}: byte {offset}: {what}"
    # KenLM's offset (in the text, after decompression) is in the line it stopped at, or at
    # the end of the file when that line was the last one
    line = data[:min(offset, len(data) - 1)].count(b"\n") + 1
    return f"{path}:{line}: {what}"


# ---------------------------------------------------------------------- the command

def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", type=Path, nargs="+",
                   help="transcript files, one sentence per line (e.g. train.wrd)")
    p.add_argument("--out", type=Path, required=True, help="ARPA file to write (.gz: gzip'd)")
    p.add_argument("--order", type=int, default=3, help="n-gram order (default: 3)")


def run(args: argparse.Namespace) -> int:
    sentences = read_sentences(args.text)
    words = sum(len(s) for s in sentences)
    log.info("%d sentences, %d words from %s", len(sentences), words,
             ", ".join(map(str, args.text)))
    lm = estimate(tqdm(sentences, desc="count n-grams", unit="sent", leave=False), args.order)
    lm.write_arpa(args.out)
    sizes = ", ".join(f"{len(p)} {n}-grams" for n, p in enumerate(lm.logprob, start=1))
    print(f"{args.out}: order {args.order}, {len(lm.vocabulary) - 2} words + </s> and <unk>, {sizes} "
          f"(from {len(sentences)} sentences, {words} words)")
    return 0
