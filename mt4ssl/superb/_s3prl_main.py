"""`python -m mt4ssl.superb._s3prl_main ARGS...`: s3prl's `run_downstream` with this project's
run-time fixes (site-packages is never edited). ARGS are run_downstream's own
(`-m train --device cpu -u mt4ssl_local -k CKPT -d ctc -c CONFIG -p EXPDIR`, ...).
`mt4ssl superb` runs it in a subprocess; it is usable by hand too.

The fixes, each needed on the pinned stack (s3prl 0.4.18, torch 2.8, huggingface_hub 2.x;
../shared/notes/s3prl.md):
1. `mt4ssl.superb.register()`: `mt4ssl_local` / `mt4ssl_url` on `s3prl.hub`.
2. huggingface_hub 2.x has no `HfFolder` / `Repository`, which s3prl's runner imports (used
   only to push to the Hub): stand-ins that raise if used.
3. torch >= 2.6 loads with weights_only=True: `-e EXPDIR/states-N.ckpt` holds the run's
   argparse.Namespace, so Namespace is added to torch's safe globals.
4. PR (`-d ctc`): the wheel has no `downstream/ctc/corpus/` package; `mt4ssl.superb.libriphone`
   stands in as `s3prl.downstream.ctc.corpus.libriphone`. And `ctc/data.py` pops
   `num_workers` from the shared corpus config on first use, so dev/test loaders would start
   12 workers: each loader gets a copy of the config instead (same value for every split).
5. KS (`-d speech_commands`): its expert imports catalyst (multi-GPU sampler only): a stand-in
   module that raises if used; and `torchaudio.sox_effects.apply_effects_file` needs libsox.so
   (Debian libsox-dev): replaced by soundfile + the same effects (mono, 16 kHz, gain -3 dB).
   ASR (`-d asr`) needs no run-time fix (pandas and editdistance are in the `superb` extra);
   the bucket CSVs and char.dict it lacks are data files, written by `mt4ssl.superb.asr`.
6. SID (`-d voxceleb1`): its dataset imports librosa (unused; not installed): a stand-in when
   it is missing; and it caches its file lists in site-packages (`voxceleb1/.cache/{train,dev,
   test}.pkl`) and reuses them for any later data: the cache is EXPDIR/voxceleb1_cache/
   instead (EXPDIR from `-p` / `-n`, or the folder of `-e`'s states file).
   IC (`-d fluent_commands`) needs no fix: pandas, which it imports undeclared, is in the
   `superb` extra.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types


def _unavailable(what: str):
    class Unavailable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError(f"{what} is not available here (mt4ssl's s3prl stand-in)")

        get_token = save_token = staticmethod(lambda *a, **k: None)
    Unavailable.__name__ = what.rsplit(".", 1)[-1]
    return Unavailable


def _fix_huggingface_hub() -> None:
    import huggingface_hub

    for name in ("HfFolder", "Repository"):
        if not hasattr(huggingface_hub, name):
            setattr(huggingface_hub, name, _unavailable(f"huggingface_hub.{name}"))


def _fix_weights_only() -> None:
    import torch

    torch.serialization.add_safe_globals([argparse.Namespace])


def _fix_ctc() -> None:
    import s3prl.downstream.ctc.data as data
    import s3prl.downstream.ctc.expert as expert

    from mt4ssl.superb import libriphone

    corpus = types.ModuleType("s3prl.downstream.ctc.corpus")
    corpus.__path__ = []  # a package
    corpus.libriphone = libriphone
    sys.modules.setdefault("s3prl.downstream.ctc.corpus", corpus)
    sys.modules.setdefault("s3prl.downstream.ctc.corpus.libriphone", libriphone)

    load_dataset = data.load_dataset
    expert.load_dataset = lambda split, tokenizer, corpus: load_dataset(split, tokenizer, dict(corpus))


def _apply_effects_file(path, effects, normalize=True, channels_first=True, format=None):
    """torchaudio.sox_effects.apply_effects_file for the effects s3prl's KS uses."""
    import numpy as np
    import soundfile as sf
    import torch
    import torchaudio.functional as AF

    wav, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (time, channels)
    wav = torch.from_numpy(np.ascontiguousarray(wav.T))
    for name, *values in effects:
        if name == "channels" and values == ["1"]:
            wav = wav.mean(0, keepdim=True)
        elif name == "rate":
            wav, sr = (AF.resample(wav, sr, int(values[0])) if sr != int(values[0]) else wav), int(values[0])
        elif name == "gain":
            wav = wav * 10 ** (float(values[0]) / 20)
        else:
            raise ValueError(f"sox effect {[name, *values]}: mt4ssl's libsox stand-in supports only the effects "
                             "s3prl's KS uses (channels 1, rate, gain)")
    return (wav if channels_first else wav.T), sr


def _fix_speech_commands() -> None:
    catalyst = types.ModuleType("catalyst")
    catalyst.__path__ = []
    data = types.ModuleType("catalyst.data")
    data.__path__ = []
    sampler = types.ModuleType("catalyst.data.sampler")
    sampler.DistributedSamplerWrapper = _unavailable("catalyst.data.sampler.DistributedSamplerWrapper")
    catalyst.data, data.sampler = data, sampler
    for m in (catalyst, data, sampler):
        sys.modules.setdefault(m.__name__, m)

    import s3prl.downstream.speech_commands.dataset as dataset

    dataset.apply_effects_file = _apply_effects_file


def _fix_voxceleb1(argv: list[str]) -> None:
    if importlib.util.find_spec("librosa") is None:
        librosa = types.ModuleType("librosa")
        librosa.__path__ = []
        util = types.ModuleType("librosa.util")
        util.find_files = _unavailable("librosa.util.find_files")
        librosa.util = util
        sys.modules.update({"librosa": librosa, "librosa.util": util})

    import s3prl.downstream.voxceleb1.dataset as dataset

    if "-p" in argv:
        expdir = argv[argv.index("-p") + 1]
    elif "-e" in argv:
        past = argv[argv.index("-e") + 1]
        expdir = past if os.path.isdir(past) else os.path.dirname(os.path.abspath(past))
    elif "-n" in argv:  # s3prl's default root
        expdir = os.path.join("result", "downstream", argv[argv.index("-n") + 1])
    else:
        raise SystemExit("mt4ssl: -d voxceleb1 needs -p EXPDIR, -n NAME or -e STATES (its file-list "
                         "cache goes in the experiment folder)")
    dataset.CACHE_PATH = os.path.join(expdir, "voxceleb1_cache", "")


def main(argv: list[str]) -> None:
    _fix_huggingface_hub()
    _fix_weights_only()
    import mt4ssl.superb

    mt4ssl.superb.register()
    task = argv[argv.index("-d") + 1] if "-d" in argv else None
    if task == "ctc":
        _fix_ctc()
    elif task == "speech_commands":
        _fix_speech_commands()
    elif task == "voxceleb1":
        _fix_voxceleb1(argv)

    from s3prl import run_downstream

    sys.argv = ["run_downstream", *argv]
    run_downstream.main()


if __name__ == "__main__":
    main(sys.argv[1:])
