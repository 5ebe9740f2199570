"""Reading and checking 16 kHz mono audio; every failure names the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from mt4ssl.errors import InputError

SAMPLE_RATE = 16000


def audio_info(path: str | Path) -> int:
    """Check that `path` is readable 16 kHz mono audio with samples; return its length."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: audio file not found")
    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises RuntimeError/LibsndfileError for junk
        raise InputError(f"{path}: unreadable audio ({e})") from None
    if info.samplerate != SAMPLE_RATE:
        raise InputError(f"{path}: sample rate {info.samplerate} Hz, expected {SAMPLE_RATE} Hz")
    if info.channels != 1:
        raise InputError(f"{path}: {info.channels} channels, expected mono")
    if info.frames <= 0:
        raise InputError(f"{path}: empty audio (0 samples)")
    return int(info.frames)


def read_audio(path: str | Path, expected_samples: int | None = None) -> np.ndarray:
    """Read a 16 kHz mono file as float32 in [-1, 1]; check its length if given."""
    n = audio_info(path)
    if expected_samples is not None and n != expected_samples:
        raise InputError(f"{path}: has {n} samples, the manifest says {expected_samples}")
    try:
        wav, _ = sf.read(str(path), dtype="float32", always_2d=False)
    except Exception as e:
        raise InputError(f"{path}: unreadable audio ({e})") from None
    return wav
