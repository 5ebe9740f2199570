"""The LibriSpeech phone corpus for s3prl's `-d ctc` (PR, libriphone), and its phone vocab.

s3prl 0.4.18's wheel lacks `s3prl/downstream/ctc/corpus/` and `ctc/vocab/phoneme.txt`
(they are in the s3prl repository, not in the package). `mt4ssl.superb._s3prl_main` puts
this module in their place at run time as `s3prl.downstream.ctc.corpus.libriphone`; the
downstream code around it (`ctc/data.py`, `ctc/expert.py`, the model, CTC loss, PER) is
s3prl's own.

`LibriPhoneDataset` follows the repository's `corpus/libriphone.py` (s3prl 0.4.18): every
`*.flac` of the splits under `path`, its transcript from `SPK-CH.trans.txt`, each word
turned into phones by the lexicon (`WORD<TAB or space>PHONES`; a word listed twice takes
its first pronunciation), sorted by phone count (longest first), returned one utterance or
one bucket of `bucket_size` at a time. Unlike the original it reads each trans.txt once and
raises a clear error (not an assert or a KeyError) for a phone outside the vocab or a word
missing from the lexicon.

Vocab: `PHONES`, s3prl's `phoneme.txt` order: SIL, SPN, then the 69 ARPAbet phones with
stress (15 vowels x 0/1/2 + 24 consonants) sorted, 71 symbols; the same set as
`mt4ssl.data.text.WORD_PHONES` (the synthetic corpus's lexicon).
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from mt4ssl.data.text import WORD_PHONES
from mt4ssl.errors import InputError
from mt4ssl.utils.io import atomic_write_text

PHONES = ("SIL", "SPN", *sorted(WORD_PHONES))  # s3prl's ctc/vocab/phoneme.txt


def write_vocab(path: str | Path) -> Path:
    """Write the 71-phone vocab (one per line, s3prl's `phoneme.txt`) to `path`."""
    atomic_write_text(path, "".join(f"{p}\n" for p in PHONES))
    return Path(path)


def read_lexicon(files, vocab=frozenset(PHONES)) -> dict[str, list[str]]:
    """word -> phones (first pronunciation wins); every phone must be in `vocab`."""
    lexicon: dict[str, list[str]] = {}
    for file in files:
        for n, line in enumerate(Path(file).read_text().splitlines(), 1):
            if not line.strip():
                continue
            word, *phones = line.split()
            bad = [p for p in phones if p not in vocab]
            if not phones or bad:
                raise InputError(f"{file}:{n}: {word}: " + (f"phones {bad} are not in the "
                                 f"71-phone vocab (ARPAbet with stress + SIL, SPN)" if bad
                                 else "no phones"))
            lexicon.setdefault(word, phones)
    return lexicon


def read_transcripts(folder: Path) -> dict[str, str]:
    """utterance id -> transcript, from every `*.trans.txt` under `folder`."""
    out = {}
    for trans in sorted(folder.rglob("*.trans.txt")):
        for line in trans.read_text().splitlines():
            if line.strip():
                utt, _, text = line.partition(" ")
                out[utt] = text.strip()
    return out


def to_phones(utt: str, text: str, lexicon: dict[str, list[str]]) -> list[str]:
    phones = []
    for word in text.split():
        if word not in lexicon:
            raise InputError(f"utterance {utt}: word {word!r} is not in the lexicon")
        phones += lexicon[word]
    return phones


class LibriPhoneDataset(Dataset):
    """s3prl's libriphone corpus (see the module docstring); same constructor and items."""

    def __init__(self, split, tokenizer, bucket_size, path, lexicon, ascending=False, **kwargs):
        self.path = path
        self.bucket_size = bucket_size
        word2phones = read_lexicon(lexicon, frozenset(tokenizer._vocab2idx))
        files, text = [], []
        for s in split:
            folder = Path(path, s)
            flacs = sorted(folder.rglob("*.flac"))
            if not flacs:
                raise InputError(f"no *.flac found under {folder}")
            transcripts = read_transcripts(folder)
            for f in flacs:
                if f.stem not in transcripts:
                    raise InputError(f"{f}: no line for {f.stem} in its trans.txt")
                files.append(f)
                text.append(tokenizer.encode(" ".join(to_phones(f.stem, transcripts[f.stem], word2phones))))
        self.file_list, self.text = zip(*sorted(zip(files, text), reverse=not ascending,
                                                key=lambda x: len(x[1])))

    def __getitem__(self, index):
        if self.bucket_size > 1:
            index = min(len(self.file_list) - self.bucket_size, index)
            return list(zip(self.file_list[index:index + self.bucket_size],
                            self.text[index:index + self.bucket_size]))
        return self.file_list[index], self.text[index]

    def __len__(self):
        return len(self.file_list)
