"""The wav2vec2/HuBERT/data2vec CNN feature encoder geometry.

`CONV_LAYERS` is the (dim, kernel, stride) stack of the paper's encoder: 20 ms stride
(320 samples), 25 ms receptive field (400 samples). `num_frames` is the exact output
length for a waveform of n samples; every label file is checked against it.
"""

from __future__ import annotations

CONV_LAYERS: tuple[tuple[int, int, int], ...] = (
    (512, 10, 5),
    (512, 3, 2),
    (512, 3, 2),
    (512, 3, 2),
    (512, 3, 2),
    (512, 2, 2),
    (512, 2, 2),
)
SAMPLE_RATE = 16000
FRAME_RATE = 50  # Hz: SAMPLE_RATE / prod(strides)


def num_frames(n_samples: int, conv_layers=CONV_LAYERS) -> int:
    """Frames the CNN outputs for `n_samples` input samples (0 if too short)."""
    n = int(n_samples)
    for _, kernel, stride in conv_layers:
        if n < kernel:
            return 0
        n = (n - kernel) // stride + 1
    return n
