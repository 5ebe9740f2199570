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


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A checkpoint of a small_model_config() model with random weights (seed 0)."""
    import torch

    from mt4ssl.models.checkpoint import save_checkpoint
    from mt4ssl.models.mt4ssl import MT4SSL

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_ckpt") / "tiny.pt"
    save_checkpoint(path, MT4SSL(small_model_config()))
    return path


def small_model_config(channels: int = 32, dim: int = 64, classes: int = 4, **overrides):
    """A 3-layer model for fast tests: the paper's CNN geometry with narrow channels, one
    k-means label set "km" of `classes` clusters, a top-2 teacher."""
    from mt4ssl.models.cnn import CONV_LAYERS
    from mt4ssl.models.mt4ssl import model_config
    from mt4ssl.targets import KMeansConfig, TeacherConfig

    cfg = dict(conv_layers=tuple((channels, k, s) for _, k, s in CONV_LAYERS), embed_dim=dim,
               ffn_dim=2 * dim, num_heads=4, num_layers=3, pos_conv_groups=4,
               kmeans=KMeansConfig(labels=("km",), num_classes=(classes,)), teacher=TeacherConfig(top_k=2))
    return model_config("tiny", **{**cfg, **overrides})
