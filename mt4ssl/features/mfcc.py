"""39-d MFCC features at 100 Hz: 13 Kaldi MFCCs + deltas + delta-deltas.

The same features as fairseq's `examples/hubert/simple_kmeans/dump_mfcc_feature.py`, so
first-iteration HuBERT labels made here and there agree: torchaudio's Kaldi-compatible
MFCC (25 ms Povey window, 10 ms shift, snip edges, no energy, no dither) on the waveform in
[-1, 1], then torchaudio's `compute_deltas` (window 5) twice.
"""

from __future__ import annotations

import numpy as np
import torch
import torchaudio

RATE = 100  # frames per second
DIM = 39
WINDOW, SHIFT = 400, 160  # samples at 16 kHz


def num_frames(n_samples: int) -> int:
    """Kaldi's frame count with snip_edges=True."""
    return 0 if n_samples < WINDOW else (n_samples - WINDOW) // SHIFT + 1


def mfcc39(wav: np.ndarray) -> np.ndarray:
    """(n_samples,) float waveform at 16 kHz -> (frames, 39) float32."""
    with torch.inference_mode():
        x = torch.as_tensor(wav, dtype=torch.float32).view(1, -1)
        mfcc = torchaudio.compliance.kaldi.mfcc(x, sample_frequency=16000, use_energy=False)
        mfcc = mfcc.transpose(0, 1)  # (13, frames): compute_deltas works on the last dim
        deltas = torchaudio.functional.compute_deltas(mfcc)
        ddeltas = torchaudio.functional.compute_deltas(deltas)
        return torch.cat([mfcc, deltas, ddeltas]).transpose(0, 1).contiguous().numpy()
