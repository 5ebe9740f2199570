"""CTC beam decoders at equal WER: torchaudio's ctc_decoder (flashlight-text) vs pyctcdecode + kenlm.

    python benchmarks/decoders.py [--manifest-dir exp/tiny/manifests] [--beams 5 10 20 50 100]
        [--lm-weight 2] [--word-score -1] [--order 3] [--no-write]

Both decoders get the same emissions, the same closed word list (every word of the manifest
folder's .wrd files) and the same KenLM n-gram (`mt4ssl lm` on train.wrd), with the same
weights: flashlight scores lm_weight * log10 p, pyctcdecode alpha * ln p, so alpha =
lm_weight / ln 10 and beta = word_score; pyctcdecode's unknown-word offset is -1000 (log10),
which makes its soft lexicon a hard one like flashlight's. Each keeps its own pruning
defaults (flashlight: beam_threshold 25 as in fairseq, all tokens; pyctcdecode: beam_prune_logp
-10, token_min_logp -5); the beam width is swept. One thread, one process, decoding only (the
decoder's construction, LM loading included, is timed apart).

Emissions: the letters of the transcripts (fairseq .ltr) through a simulated CTC acoustic
model, seeded: each token is 1-2 peaky frames followed by 1-3 blank frames; Gaussian noise
on every logit; 3% of the tokens are confused with another letter that scores above the true
one (the true one second best), 1% are weak (blank wins their frames). Greedy decoding of
these keeps the misspellings; lexicon and LM repair many. A trained model's emissions would
differ in detail, not in what a decoder has to do per frame.

Needs, beside the project: pyctcdecode 0.5.0 (installed with --no-deps: it declares numpy<2),
pygtrie and kenlm (built from source by pip).

Equal WER: for each decoder, its WER at the widest beam; the target is the worse of the two,
and each decoder's time is that of its narrowest beam reaching it.
Writes its section of results/decoders.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

from mt4ssl.finetune.ctc import Dictionary  # noqa: E402
from mt4ssl.finetune.decode import (BeamConfig, BeamDecoder, build_lexicon, score,  # noqa: E402
                                    viterbi)
from mt4ssl.finetune.lm import estimate, read_sentences  # noqa: E402
from mt4ssl.utils.io import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "results" / "decoders.md"
HEADER = "# CTC beam decoders\n\nEach section was printed by the command it names.\n"
P_CONFUSE, P_WEAK = 0.03, 0.01


def simulate(letters: list[str], dictionary: Dictionary, rng: np.random.Generator) -> torch.Tensor:
    """(T, V) log-probs of a simulated CTC model for one utterance's letter tokens."""
    V = len(dictionary)
    frames: list[np.ndarray] = []
    letter_ids = [i for i, s in enumerate(dictionary.symbols) if s.isalpha()]
    for token in letters:
        k = dictionary.symbols.index(token)
        peak = rng.uniform(3.0, 7.0)
        u = rng.random()
        for _ in range(rng.integers(1, 3)):
            logit = rng.normal(0.0, 1.0, V)
            if u < P_CONFUSE:
                other = int(rng.choice([i for i in letter_ids if i != k]))
                logit[k] += peak
                logit[other] += peak + rng.uniform(0.2, 1.5)
            elif u < P_CONFUSE + P_WEAK:
                logit[k] += peak - 3.0
                logit[0] += peak
            else:
                logit[k] += peak
            frames.append(logit)
        for _ in range(rng.integers(1, 4)):
            logit = rng.normal(0.0, 1.0, V)
            logit[0] += rng.uniform(4.0, 8.0)
            frames.append(logit)
    return torch.log_softmax(torch.tensor(np.stack(frames), dtype=torch.float32), -1)


def timed(fn, items) -> tuple[list[str], float]:
    start = time.perf_counter()
    out = [fn(x) for x in items]
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest-dir", type=Path, default=Path("exp/tiny/manifests"))
    p.add_argument("--train", default="train", help="subset the LM is estimated on")
    p.add_argument("--subsets", nargs="+", default=["valid", "test"], help="subsets decoded")
    p.add_argument("--beams", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    p.add_argument("--lm-weight", type=float, default=2.0)
    p.add_argument("--word-score", type=float, default=-1.0)
    p.add_argument("--order", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)

    try:
        import pyctcdecode
    except ImportError:
        sys.exit("benchmarks/decoders.py needs pyctcdecode and kenlm, which the project does not "
                 "depend on: .venv/bin/pip install --no-deps pyctcdecode==0.5.0 pygtrie && "
                 ".venv/bin/pip install kenlm (pyctcdecode declares numpy<2, the pinned stack has "
                 "numpy 2, with which it runs)")

    d = args.manifest_dir
    refs = [" ".join(s) for sub in args.subsets for s in read_sentences([d / f"{sub}.wrd"])]
    words = sorted({w for sub in [args.train, *args.subsets]
                    for s in read_sentences([d / f"{sub}.wrd"]) for w in s})
    letters = sorted({c for w in words for c in w})
    dictionary = Dictionary.from_symbols(["|", *letters])
    rng = np.random.default_rng(args.seed)
    emissions = [simulate(list("|".join(r.split())) + ["|"], dictionary, rng) for r in refs]
    frames = sum(len(e) for e in emissions)
    audio_s = frames / 50  # the model's 50 Hz frame rate
    lexicon = build_lexicon(((str(i), w) for i, w in enumerate(words)), dictionary, "words")

    rows, best = [], {}
    greedy = [" ".join(viterbi(e[None], None, dictionary)[0]) for e in emissions]
    g = score(refs, greedy)
    with tempfile.TemporaryDirectory() as tmp:
        arpa = Path(tmp) / "lm.arpa"
        estimate(read_sentences([d / f"{args.train}.wrd"]), args.order).write_arpa(arpa)
        for beam in args.beams:
            start = time.perf_counter()
            fl = BeamDecoder(dictionary, lexicon, arpa, BeamConfig(
                lm_weight=args.lm_weight, word_score=args.word_score, beam=beam))
            build = time.perf_counter() - start
            hyps, secs = timed(lambda e: " ".join(fl(e[None])[0]), emissions)
            rows.append(("torchaudio ctc_decoder (flashlight-text)", beam, score(refs, hyps), secs, build))

        labels = ["" if i == 0 else (" " if s == "|" else s) for i, s in enumerate(dictionary.symbols)]
        start = time.perf_counter()
        pc = pyctcdecode.build_ctcdecoder(labels, kenlm_model_path=str(arpa), unigrams=words,
                                          alpha=args.lm_weight / math.log(10),
                                          beta=args.word_score, unk_score_offset=-1000.0)
        build = time.perf_counter() - start
        np_emissions = [e.numpy() for e in emissions]
        for beam in args.beams:
            hyps, secs = timed(lambda e: " ".join(pc.decode(e, beam_width=beam).split()),
                               np_emissions)
            rows.append(("pyctcdecode + kenlm", beam, score(refs, hyps), secs, build))

    for name in {r[0] for r in rows}:
        best[name] = next(r for r in sorted(rows, key=lambda r: -r[1]) if r[0] == name)[2]["wer"]
    target = max(best.values())
    at_target = {}
    for name in best:
        reached = [r for r in rows if r[0] == name and r[2]["wer"] <= target + 1e-9]
        at_target[name] = min(reached, key=lambda r: r[1])

    lines = [f"Emissions: {len(refs)} utterances of {', '.join(args.subsets)} "
             f"({frames} frames = {audio_s:.0f} s at 50 Hz), simulated (see the script); "
             f"{len(words)} words; {args.order}-gram LM (`mt4ssl lm` on {args.train}.wrd); "
             f"lm_weight {args.lm_weight} (pyctcdecode alpha {args.lm_weight / math.log(10):.4f}), "
             f"word_score {args.word_score}. Versions: torchaudio "
             f"{__import__('torchaudio').__version__}, flashlight-text "
             f"{version('flashlight-text')}, pyctcdecode {version('pyctcdecode')}, "
             f"kenlm {version('kenlm')}. Threads: 1.", "",
             f"Viterbi (greedy): WER {g['wer']:.2f} %, CER {g['cer']:.2f} %.", "",
             "| decoder | beam | WER % | CER % | decode s | ms / utterance | x real time | build s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, beam, s, secs, build in rows:
        lines.append(f"| {name} | {beam} | {s['wer']:.2f} | {s['cer']:.2f} | {secs:.2f} | "
                     f"{1000 * secs / len(refs):.1f} | {audio_s / secs:.0f} | {build:.2f} |")
    (fa, fr), (pa, pr) = [(n, at_target[n]) for n in sorted(at_target, key=lambda n: "pyctc" in n)]
    lines += ["", f"Equal WER ({target:.2f} %, the worse of the two widest-beam WERs): {fa} "
              f"reaches it at beam {fr[1]} in {fr[3]:.2f} s, {pa} at beam {pr[1]} in {pr[3]:.2f} s: "
              f"**{fa.split(' (')[0]} is {pr[3] / fr[3]:.1f}x faster**.", "",
              "The project's decoder is therefore torchaudio's ctc_decoder (`mt4ssl decode`, extra "
              "`decode`: flashlight-text + jiwer). pyctcdecode 0.5.0 also declares numpy<2, which "
              "the pinned stack (numpy 2) cannot satisfy; it was installed with --no-deps here."]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        if not RESULTS.exists():
            atomic_write_text(RESULTS, HEADER)
        write_section("torchaudio ctc_decoder vs pyctcdecode, equal WER",
                      " ".join(["python benchmarks/decoders.py", *sys.argv[1:]]), body, RESULTS)


def version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    try:
        return v(dist)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
