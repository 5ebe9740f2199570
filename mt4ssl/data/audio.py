"""Reading and checking 16 kHz mono audio; every failure names the file.

`audio_info` checks what the header says (readable, 16 kHz, mono, 16/24/32-bit integer or
float samples, not empty; a WAV data chunk that the file cuts short is truncated);
`read_audio` also checks the samples themselves: as many as the header promised (a FLAC or
WAV whose data was cut off), finite, and for float files within +-FLOAT_PEAK (full scale is 1;
a float file at int16 scale, say, would silently change every feature).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import soundfile as sf

from mt4ssl.errors import InputError

SAMPLE_RATE = 16000
EIGHT_BIT = ("PCM_S8", "PCM_U8")  # 256 levels: a conversion mistake for LibriSpeech-style data
FLOAT_SUBTYPES = ("FLOAT", "DOUBLE")
FLOAT_PEAK = 2.0  # |sample| above this in a float file: not full-scale-1 audio


def _wav_data_bytes(path: Path) -> tuple[int, int] | None:
    """(bytes the WAV header's data chunk declares, bytes the file holds after it), or None
    when the file is not a plain RIFF/WAVE file or the size is left open (0 or 0xFFFFFFFF, as
    streaming writers do)."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        size = path.stat().st_size
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            name, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if name == b"data":
                return (None if length in (0, 0xFFFFFFFF) else (length, size - f.tell()))
            f.seek(length + (length & 1), 1)


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
    if info.subtype in EIGHT_BIT:
        raise InputError(f"{path}: 8-bit samples ({info.subtype}), expected 16-bit (or 24/32-bit or "
                         f"float) audio: 8 bits put the quantisation noise only 48 dB below full scale")
    if info.frames <= 0:
        raise InputError(f"{path}: empty audio (0 samples)")
    if info.format == "WAV":
        declared = _wav_data_bytes(path)
        if declared is not None and declared[0] > declared[1]:
            raise InputError(f"{path}: truncated: the header declares {declared[0]} bytes of samples, the "
                             f"file holds {declared[1]}")
    return int(info.frames)


def read_audio(path: str | Path, expected_samples: int | None = None) -> np.ndarray:
    """Read a 16 kHz mono file as float32 in [-1, 1]; check its length if given, and that
    every sample the header promised is there and finite."""
    n = audio_info(path)
    if expected_samples is not None and n != expected_samples:
        raise InputError(f"{path}: has {n} samples, the manifest says {expected_samples}")
    try:
        with sf.SoundFile(str(path)) as f:
            subtype = f.subtype
            wav = f.read(dtype="float32", always_2d=False)
    except Exception as e:
        raise InputError(f"{path}: unreadable audio data, truncated or corrupt ({e})") from None
    if len(wav) != n:
        raise InputError(f"{path}: truncated: the header says {n} samples, only {len(wav)} could be read")
    finite = np.isfinite(wav)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise InputError(f"{path}: sample {i} is {wav[i]} ({int((~finite).sum())} non-finite sample(s))")
    if subtype in FLOAT_SUBTYPES:
        peak = float(np.abs(wav).max())
        if peak > FLOAT_PEAK:
            raise InputError(f"{path}: float samples reach {peak:.4g}; expected full scale 1 (|x| <= "
                             f"{FLOAT_PEAK}): rescale it (integer-scale samples stored as float?)")
    return wav
