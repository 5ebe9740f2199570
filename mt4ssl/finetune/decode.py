"""`mt4ssl decode`: Viterbi and lexicon + KenLM beam decoding of a CTC letter model; WER/CER.

    mt4ssl decode --ckpt ft/checkpoint_best.pt --manifest-dir data --subsets dev-clean,dev-other \\
        --lm 4-gram.arpa.gz --lexicon librispeech-lexicon.txt --out decode/
    mt4ssl decode --ckpt ... --config recipes/librispeech/decode_4gram.yaml --lm ... --out ...

Letters follow fairseq's `.ltr` convention: one token per letter, `|` ends a word, the CTC
blank at index 0 (`mt4ssl.finetune.ctc.Dictionary`).

Decoders
- `viterbi`: the best path (argmax per frame), repeats merged, blanks dropped, split at `|`.
  Always run: it costs nothing once the emissions are there.
- `beam` (with `--lexicon` and/or `--lm`): lexicon-constrained beam search through
  torchaudio's `ctc_decoder` (flashlight-text's C++ LexiconDecoder with KenLM), scoring
  log p_ctc + lm_weight * log10 p_lm + word_score * words (fairseq's and flashlight's
  convention: the paper's LM weight 2 and word score -1 mean the same here). It was measured
  faster than pyctcdecode + kenlm at equal WER (results/decoders.md).

Files accepted as distributed
- LM: an ARPA file, plain or gzip'd (LibriSpeech's `4-gram.arpa.gz`), or a KenLM binary.
- lexicon: one word per line, first field the word; whatever follows is not read: a letter
  model spells a word with its letters, so fairseq/flashlight lexicons (`WORD W O R D |`),
  LibriSpeech's pronunciation lexicon (`WORD<TAB>W ER1 D`, `librispeech-lexicon.txt`), its
  vocabulary (`librispeech-vocab.txt`) and the synthetic corpus's `lexicon.txt` all give the
  same word list. Words are put in the letter case of the model's dictionary; words with a
  character the model cannot emit are left out (logged). Without `--lexicon` the words of
  an ARPA LM's 1-grams are the lexicon.

Outputs in OUT: `{subset}.{decoder}.wrd` (one hypothesis per manifest line, in manifest
order) and `{subset}.json` (WER, CER and their error counts per decoder, the settings).
A reference word the lexicon lacks is an error (the beam search can never output it) unless
`--allow-oov`, which counts such words instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shlex
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mt4ssl.errors import InputError
from mt4ssl.finetune.ctc import Dictionary, greedy_decode
from mt4ssl.finetune.lm import EOS, SOS, UNK, arpa_unigrams, explain_kenlm_error, lm_kind, open_text
from mt4ssl.utils.io import atomic_open, atomic_write_text

log = logging.getLogger(__name__)

WORD_BOUNDARY = "|"


def tokens_to_words(symbols: Sequence[str]) -> list[str]:
    """Letter tokens -> words: `H I | T H E R E |` -> [HI, THERE] (fairseq's "letter" post-process)."""
    return "".join(symbols).replace(WORD_BOUNDARY, " ").split()


def viterbi(log_probs: torch.Tensor, lengths: Sequence[int] | torch.Tensor | None,
            dictionary: Dictionary) -> list[list[str]]:
    """Best-path decoding of a padded batch (B, T, V) -> words per utterance."""
    return [tokens_to_words(dictionary.decode(ids))
            for ids in greedy_decode(log_probs, lengths, dictionary.blank)]


# ---------------------------------------------------------------------- lexicon

def letter_case(dictionary: Dictionary):
    """The case the dictionary writes letters in, as a function on words."""
    letters = [s for s in dictionary.symbols[1:] if len(s) == 1 and s.isalpha()]
    if letters and all(s.isupper() for s in letters):
        return str.upper
    if letters and all(s.islower() for s in letters):
        return str.lower
    return lambda w: w


@dataclass(frozen=True)
class Lexicon:
    """Words the beam search may output, each with its spelling (letters, then `|`)."""

    spellings: dict[str, tuple[str, ...]]
    source: str  # where the words came from, for messages

    def __contains__(self, word: str) -> bool:
        return word in self.spellings

    def __len__(self) -> int:
        return len(self.spellings)

    def write(self, path: Path) -> None:
        """The flashlight/fairseq lexicon file: `WORD<TAB>W O R D |` per line."""
        with atomic_open(path) as f:
            for word, spelling in self.spellings.items():
                f.write(f"{word}\t{' '.join(spelling)}\n")


def build_lexicon(words, dictionary: Dictionary, source: str) -> Lexicon:
    """Spell each word (an iterable of (line, word)) in the dictionary's letters."""
    case = letter_case(dictionary)
    spellings: dict[str, tuple[str, ...]] = {}
    unspellable: list[str] = []
    for where, word in words:
        word = case(word)
        if word in spellings or word in (SOS, EOS, UNK, case(UNK)):
            continue
        letters = tuple(word)
        blank = dictionary.symbols[dictionary.blank]
        if WORD_BOUNDARY in letters or not all(c in dictionary and c != blank for c in letters):
            unspellable.append(f"{where} {word!r}")
            continue
        spellings[word] = letters + (WORD_BOUNDARY,)
    if unspellable:
        log.warning("%s: %d word(s) have characters the model cannot emit and are left out, "
                    "e.g. %s", source, len(unspellable), ", ".join(unspellable[:5]))
    if not spellings:
        raise InputError(f"{source}: no word can be spelled with the model's letters "
                         f"{' '.join(dictionary.symbols[1:])}")
    return Lexicon(spellings, source)


def read_lexicon(path: str | Path, dictionary: Dictionary) -> Lexicon:
    """A lexicon file as distributed (see the module docstring), plain or gzip'd."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: lexicon file not found")

    def entries() -> Iterator[tuple[str, str]]:
        with open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                fields = line.split()
                if fields:
                    yield f"{path}:{lineno}", fields[0]

    return build_lexicon(entries(), dictionary, str(path))


def lm_lexicon(lm: str | Path, dictionary: Dictionary) -> Lexicon:
    """The words of an ARPA LM's 1-grams as the lexicon."""
    return build_lexicon(((f"{lm} 1-gram", w) for w in arpa_unigrams(lm)), dictionary,
                         f"{lm} (1-grams)")


# ---------------------------------------------------------------------- beam search

@dataclass(frozen=True)
class BeamConfig:
    """Beam search settings (flashlight's names; defaults: the paper's 4-gram decoding, with
    fairseq's beam threshold)."""

    lm_weight: float = 2.0  # times log10 p_lm
    word_score: float = -1.0  # added per word
    beam: int = 1500  # hypotheses kept per frame
    beam_threshold: float = 25.0  # drop hypotheses this far below the best
    beam_size_token: int | None = None  # tokens tried per frame (None: all)
    sil_score: float = 0.0  # added per `|` not ending a word
    log_add: bool = False  # merge equal hypotheses by log-add instead of max

    def __post_init__(self):
        if self.beam < 1:
            raise InputError(f"beam {self.beam}: must be at least 1")
        if self.beam_threshold <= 0:
            raise InputError(f"beam_threshold {self.beam_threshold}: must be positive")
        if self.beam_size_token is not None and self.beam_size_token < 1:
            raise InputError(f"beam_size_token {self.beam_size_token}: must be at least 1")


class BeamDecoder:
    """Lexicon-constrained CTC beam search, with a KenLM n-gram when `lm` is given."""

    def __init__(self, dictionary: Dictionary, lexicon: Lexicon, lm: str | Path | None = None,
                 cfg: BeamConfig = BeamConfig()):
        try:
            from torchaudio.models.decoder import ctc_decoder
        except (ImportError, RuntimeError):  # torchaudio raises RuntimeError without flashlight
            raise InputError("beam decoding needs flashlight-text (torchaudio's CTC decoder): "
                             "pip install 'mt4ssl[decode]'") from None

        if WORD_BOUNDARY not in dictionary:
            raise InputError(f"the model's dictionary has no word boundary {WORD_BOUNDARY!r} "
                             f"(symbols: {' '.join(dictionary.symbols[1:])}): it is not a letter "
                             "model in the .ltr convention, so words cannot be beam-searched")
        if lm is not None:
            lm_kind(lm)  # missing, empty or not an LM: an InputError naming the file
        self.dictionary, self.lexicon, self.lm, self.cfg = dictionary, lexicon, lm, cfg
        with tempfile.TemporaryDirectory(prefix="mt4ssl-lexicon-") as tmp:
            lexicon_file = Path(tmp) / "lexicon.txt"
            lexicon.write(lexicon_file)
            try:
                self._decoder = ctc_decoder(
                    lexicon=str(lexicon_file), tokens=list(dictionary.symbols),
                    lm=None if lm is None else str(lm), nbest=1, beam_size=cfg.beam,
                    beam_size_token=cfg.beam_size_token, beam_threshold=cfg.beam_threshold,
                    lm_weight=cfg.lm_weight, word_score=cfg.word_score, unk_score=-math.inf,
                    sil_score=cfg.sil_score, log_add=cfg.log_add,
                    blank_token=dictionary.symbols[dictionary.blank], sil_token=WORD_BOUNDARY,
                    unk_word=UNK)
            except RuntimeError as e:
                if lm is None:
                    raise
                raise InputError(explain_kenlm_error(lm, str(e))) from None

    def __call__(self, log_probs: torch.Tensor,
                 lengths: Sequence[int] | torch.Tensor | None = None) -> list[list[str]]:
        """(B, T, V) CTC log-probabilities (log_softmax of the logits) -> words per utterance."""
        x = log_probs.detach().to("cpu", torch.float32).contiguous()
        B, T, _ = x.shape
        n = torch.full((B,), T, dtype=torch.int32) if lengths is None else \
            torch.as_tensor(lengths, dtype=torch.int32).cpu()
        return [hyps[0].words if hyps else [] for hyps in self._decoder(x, n)]


# ---------------------------------------------------------------------- scoring

def score(refs: Sequence[str], hyps: Sequence[str]) -> dict:
    """Corpus WER and CER (jiwer; characters include the spaces between words) with counts."""
    try:
        import jiwer
    except ImportError:
        raise InputError("WER/CER need jiwer: pip install 'mt4ssl[decode]'") from None

    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        raise ValueError("nothing to score")
    words = jiwer.process_words(list(refs), list(hyps))
    chars = jiwer.process_characters(list(refs), list(hyps))
    n_words = words.hits + words.substitutions + words.deletions
    n_chars = chars.hits + chars.substitutions + chars.deletions
    return {
        "wer": 100.0 * words.wer, "cer": 100.0 * chars.cer, "utterances": len(refs),
        "words": n_words, "substitutions": words.substitutions, "deletions": words.deletions,
        "insertions": words.insertions, "chars": n_chars,
        "char_errors": chars.substitutions + chars.deletions + chars.insertions,
        "sentence_errors": sum(r.split() != h.split() for r, h in zip(refs, hyps)),
    }


def read_references(manifest_dir: Path, subset: str, n: int) -> list[str]:
    """`{subset}.wrd` (or words from `{subset}.ltr`), one line per manifest entry."""
    wrd, ltr = manifest_dir / f"{subset}.wrd", manifest_dir / f"{subset}.ltr"
    path = wrd if wrd.is_file() else ltr
    if not path.is_file():
        raise InputError(f"{wrd}: transcripts not found (nor {ltr.name})")
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) != n:
        raise InputError(f"{path}: {len(lines)} lines, but the manifest has {n} utterances")
    if path == ltr:
        return [" ".join(tokens_to_words(line.split())) for line in lines]
    return [" ".join(line.split()) for line in lines]


def check_oov(refs: Sequence[str], lexicon: Lexicon, where: str, allow: bool) -> int:
    """Reference words the lexicon lacks: an InputError naming the first, or (allow) a count."""
    missing = [(i, w) for i, r in enumerate(refs) for w in r.split() if w not in lexicon]
    if missing and not allow:
        i, w = missing[0]
        more = f" ({len(missing) - 1} more missing word token(s))" if len(missing) > 1 else ""
        raise InputError(f"{where}:{i + 1}: the word {w!r} is not in the lexicon "
                         f"{lexicon.source}{more}; the beam search can never output it. Add it "
                         "to the lexicon, or pass --allow-oov to count such words as errors")
    if missing:
        log.warning("%s: %d reference word token(s) are not in the lexicon (allowed by "
                    "--allow-oov)", where, len(missing))
    return len(missing)


def check_lm_vocabulary(lexicon: Lexicon, lm: Path) -> None:
    """An ARPA LM that knows none of the lexicon's words (say, another letter case) is an error."""
    if lm_kind(lm) != "arpa":
        return
    vocab = set(arpa_unigrams(lm))
    known = sum(w in vocab for w in lexicon.spellings)
    if known == 0:
        example = next(iter(lexicon.spellings))
        raise InputError(f"{lm}: none of the {len(lexicon)} lexicon words (e.g. {example!r}) is "
                         "in the LM's vocabulary (another letter case or language?)")
    if known < len(lexicon):
        log.info("%d of %d lexicon words are in the LM (the others score as <unk>)", known,
                 len(lexicon))


# ---------------------------------------------------------------------- emissions

@torch.inference_mode()
def emissions(model, manifest, device: torch.device, dtype: torch.dtype | None,
              max_tokens: int) -> Iterator[tuple[list[int], torch.Tensor, list[int]]]:
    """Batches of (manifest indices, CTC log-probs (B, T, V) float32 on CPU, frame lengths)
    of a `CTCModel` (forward(source, padding_mask) -> (logits, frame padding mask)), in
    length-sorted batches of at most `max_tokens` padded samples, with a progress bar."""
    from tqdm import tqdm

    from mt4ssl.data.sampler import BucketBatchSampler

    sampler = BucketBatchSampler(manifest.sizes, max_tokens, shuffle=False,
                                 where=manifest.where)
    model.eval()
    with tqdm(total=len(manifest), desc=f"emissions {manifest.path.stem}", unit="utt") as bar:
        for batch in sampler:
            wavs = [torch.from_numpy(manifest.read(i)) for i in batch]
            longest = max(len(w) for w in wavs)
            source = torch.zeros(len(wavs), longest)
            padding = torch.zeros(len(wavs), longest, dtype=torch.bool)
            for b, w in enumerate(wavs):
                source[b, :len(w)] = w
                padding[b, len(w):] = True
            source, padding = source.to(device), padding.to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits, frame_padding = model(source, padding if padding.any() else None)
            log_probs = logits.float().log_softmax(-1).cpu()
            T = log_probs.shape[1]
            lengths = [T] * len(batch) if frame_padding is None else \
                (~frame_padding).sum(-1).tolist()
            yield batch, log_probs, lengths
            bar.update(len(batch))


# ---------------------------------------------------------------------- the command

def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", type=Path, required=True, help="fine-tuned CTC checkpoint")
    p.add_argument("--manifest-dir", type=Path, required=True,
                   help="folder with {subset}.tsv and {subset}.wrd (or .ltr)")
    p.add_argument("--subsets", required=True,
                   help="comma-separated, e.g. dev-clean,dev-other,test-clean,test-other")
    p.add_argument("--out", type=Path, required=True, help="folder for hypotheses and scores")
    p.add_argument("--lm", type=Path, help="KenLM n-gram: ARPA (plain or .gz) or KenLM binary")
    p.add_argument("--lexicon", type=Path,
                   help="word list / lexicon (first field of each line; default with an ARPA "
                        "LM: its 1-grams)")
    p.add_argument("--config", type=Path, help="YAML with BeamConfig fields (flags override)")
    d = BeamConfig()
    p.add_argument("--lm-weight", type=float, help=f"times log10 p_lm (default {d.lm_weight})")
    p.add_argument("--word-score", type=float, help=f"added per word (default {d.word_score})")
    p.add_argument("--beam", type=int, help=f"hypotheses kept per frame (default {d.beam})")
    p.add_argument("--beam-threshold", type=float,
                   help=f"drop hypotheses this far below the best (default {d.beam_threshold})")
    p.add_argument("--beam-size-token", type=int, help="tokens tried per frame (default: all)")
    p.add_argument("--sil-score", type=float,
                   help=f"added per | not ending a word (default {d.sil_score})")
    p.add_argument("--log-add", action="store_true", default=None,
                   help="merge equal hypotheses by log-add instead of max")
    p.add_argument("--allow-oov", action="store_true",
                   help="count reference words missing from the lexicon instead of failing")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="fp32",
                   help="autocast precision of the model (auto: bf16 where native)")
    p.add_argument("--max-tokens", type=int, default=1_600_000,
                   help="padded samples per batch of the model (default: 1.6M = 100 s)")


def beam_config(args: argparse.Namespace) -> BeamConfig:
    from mt4ssl.config import load_config

    overrides = [f"{f.name}={getattr(args, f.name)}" for f in dataclasses.fields(BeamConfig)
                 if getattr(args, f.name, None) is not None]
    return load_config(BeamConfig, args.config, overrides)


def run(args: argparse.Namespace) -> int:
    from mt4ssl.data.manifest import read_manifest
    from mt4ssl.finetune.model import load_ctc_model
    from mt4ssl.utils.precision import DTYPES, resolve_precision

    subsets = [s for s in args.subsets.split(",") if s]
    if not subsets:
        raise InputError("--subsets: give at least one subset name")
    manifests = {s: read_manifest(args.manifest_dir / f"{s}.tsv") for s in subsets}
    refs = {s: read_references(args.manifest_dir, s, len(m)) for s, m in manifests.items()}
    device = torch.device(args.device)
    model, dictionary = load_ctc_model(args.ckpt, map_location=device)  # no CTC head: InputError

    cfg, decoder, lexicon = beam_config(args), None, None
    if args.lm is not None or args.lexicon is not None:
        if args.lexicon is not None:
            lexicon = read_lexicon(args.lexicon, dictionary)
        elif lm_kind(args.lm) == "arpa":
            lexicon = lm_lexicon(args.lm, dictionary)
        else:
            raise InputError(f"{args.lm}: a KenLM binary does not list its words: give --lexicon")
        oov = {s: check_oov(refs[s], lexicon, str(args.manifest_dir / f"{s}.wrd"), args.allow_oov)
               for s in subsets}
        if args.lm is not None:
            check_lm_vocabulary(lexicon, args.lm)
        log.info("beam search: %d lexicon words, LM %s, %s", len(lexicon), args.lm, cfg)
        decoder = BeamDecoder(dictionary, lexicon, args.lm, cfg)
    precision, why = resolve_precision(args.precision, device)
    log.info("precision %s (%s)", precision, why)

    command = "mt4ssl " + " ".join(shlex.quote(a) for a in sys.argv[1:]) \
        if Path(sys.argv[0]).name in ("mt4ssl", "__main__.py") else None
    names = ["viterbi"] + (["beam"] if decoder else [])
    print(f"{'subset':<12} " + " ".join(f"{n + ' WER':>12} {n + ' CER':>12}" for n in names))
    for subset in subsets:
        manifest = manifests[subset]
        hyps = {name: [""] * len(manifest) for name in names}
        for batch, log_probs, lengths in emissions(model, manifest, device, DTYPES[precision],
                                                   args.max_tokens):
            outputs = {"viterbi": viterbi(log_probs, lengths, dictionary)}
            if decoder:
                outputs["beam"] = decoder(log_probs, lengths)
            for name, words in outputs.items():
                for i, w in zip(batch, words):
                    hyps[name][i] = " ".join(w)
        result = {"subset": subset, "ckpt": str(args.ckpt), "manifest": str(manifest.path),
                  "command": command, "precision": precision, "decoders": {}}
        for name in names:
            atomic_write_text(args.out / f"{subset}.{name}.wrd", "".join(h + "\n" for h in hyps[name]))
            scores = score(refs[subset], hyps[name])
            settings = {} if name == "viterbi" else {
                "lm": None if args.lm is None else str(args.lm), "lexicon": lexicon.source,
                "lexicon_words": len(lexicon), "oov_words": oov[subset],
                **dataclasses.asdict(cfg)}
            result["decoders"][name] = {**scores, **settings}
        atomic_write_text(args.out / f"{subset}.json", json.dumps(result, indent=2) + "\n")
        print(f"{subset:<12} " + " ".join(
            f"{result['decoders'][n]['wer']:>11.2f}% {result['decoders'][n]['cer']:>11.2f}%"
            for n in names))
    print(f"hypotheses and scores in {args.out}/{{subset}}.{{{','.join(names)}}}.wrd, "
          f"{{subset}}.json")
    return 0
