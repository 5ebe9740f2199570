"""Shared fixtures: a small LibriSpeech-layout tree of generated signals (no TTS needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

# Odd and awkward lengths on purpose: label counts must match the CNN for any length.
LENGTHS = {
    "train": [32001, 40007, 48319, 35555, 57603, 33333],
    "dev": [32999, 41601],
}
WORDS = ["HELLO", "WORLD", "SPEECH", "MODEL", "CLUSTER", "LABEL", "FRAME"]


def write_tree(root: Path, lengths=LENGTHS, seed: int = 0) -> Path:
    """Write `root/{split}/SPK/CH/SPK-CH-UUUU.flac` + trans.txt with tones and noise."""
    rng = np.random.default_rng(seed)
    for split, lens in lengths.items():
        for u, n in enumerate(lens):
            spk, ch = 100 + u % 2, 10
            d = root / split / str(spk) / str(ch)
            d.mkdir(parents=True, exist_ok=True)
            t = np.arange(n) / 16000
            f0 = rng.uniform(100, 300)
            wav = 0.3 * np.sin(2 * np.pi * f0 * t * (1 + 0.2 * np.sin(2 * np.pi * t)))
            wav += 0.05 * rng.standard_normal(n)
            utt = f"{spk}-{ch}-{u:04d}"
            sf.write(d / f"{utt}.flac", wav.astype(np.float32), 16000, subtype="PCM_16")
            words = " ".join(rng.choice(WORDS, size=3))
            with open(d / f"{spk}-{ch}.trans.txt", "a") as f:
                f.write(f"{utt} {words}\n")
    return root


@pytest.fixture
def libri_tree(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "libri")
