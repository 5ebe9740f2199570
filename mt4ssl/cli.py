"""`mt4ssl <command>`: one command per pipeline stage, each implemented by one module.

A module behind a command exposes `add_args(parser)` and `run(args) -> int`. Bad input
raises `InputError`, printed here as `mt4ssl <command>: error: ...` without a stack trace.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mt4ssl.errors import InputError

# command -> (module, one-line help), in pipeline order
COMMANDS = {
    "synth-corpus": ("mt4ssl.data.synth", "write a synthetic LibriSpeech-layout corpus (espeak-ng + flite)"),
    "manifest": ("mt4ssl.data.manifest", "LibriSpeech-layout folder -> fairseq {split}.tsv/.wrd/.ltr"),
    "manifest-limited": ("mt4ssl.data.limited", "Libri-light limited splits (10 min, 1 h, 10 h) + LibriSpeech dev/test -> manifests"),
    "features": ("mt4ssl.features.dump", "dump MFCC features of a manifest, sharded and resumable"),
    "kmeans": ("mt4ssl.kmeans.learn", "learn k-means centroids on a sample of dumped features"),
    "labels": ("mt4ssl.kmeans.apply", "apply k-means: write 50 Hz {split}.km + dict.km.txt"),
    "pretrain": ("mt4ssl.train.pretrain", "pretrain MT4SSL / HuBERT-like / data2vec-like from a YAML config"),
    "convert": ("mt4ssl.models.convert", "fairseq (data2vec-audio, HuBERT, MT4SSL) or HF checkpoint -> mt4ssl"),
    "export": ("mt4ssl.export.hf", "mt4ssl checkpoint -> Hugging Face transformers folder (hf: safetensors + config + feature extractor)"),
    "extract": ("mt4ssl.features.extract", "hidden states of a checkpoint for an audio file or a manifest"),
    "probe": ("mt4ssl.probes.ctc", "phone recognition probe: linear CTC on frozen layers or MFCC -> PER"),
    "finetune": ("mt4ssl.finetune.train", "CTC fine-tuning on letters (.ltr) of a pretrained encoder from a YAML config"),
    "lm": ("mt4ssl.finetune.lm", "word n-gram LM (modified Kneser-Ney) from transcripts -> ARPA file"),
    "decode": ("mt4ssl.finetune.decode", "CTC letter model: Viterbi + lexicon/KenLM beam decoding -> hypotheses, WER/CER"),
    "purity": ("mt4ssl.probes.purity", "phone purity, cluster purity, PNMI (+ linear frame classifier) vs phone alignments"),
    "synth-superb": ("mt4ssl.superb.synth", "write synthetic SUPERB KS/SID/IC data (Speech Commands, VoxCeleb1, Fluent Speech Commands layouts)"),
    "superb": ("mt4ssl.superb.sweep", "SUPERB task (pr, asr, ks, sid, ic) on a frozen checkpoint through s3prl's runner -> result.json"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; only `command`'s module is imported (so `--help` stays fast)."""
    parser = argparse.ArgumentParser(prog="mt4ssl", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).add_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it picked
    try:
        return importlib.import_module(args._module).run(args)
    except InputError as e:
        print(f"mt4ssl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mt4ssl {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
