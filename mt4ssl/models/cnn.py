"""The wav2vec2/HuBERT/data2vec CNN feature encoder geometry.

`CONV_LAYERS` is the (dim, kernel, stride) stack of the paper's encoder: 20 ms stride
(320 samples), 25 ms receptive field (400 samples). `num_frames` is the exact output
length for a waveform of n samples; every label file is checked against it.

`ConvFeatureEncoder` is the module. Parameter names follow fairseq's
ConvFeatureExtractionModel so checkpoints load without renaming: block i is
`conv_layers.{i}` = [conv, (empty slot), norm, GELU], i.e. the conv weight is
`conv_layers.{i}.0.weight`, the per-layer LayerNorm `conv_layers.{i}.2.1.*` ("layer_norm"
mode) and the first layer's GroupNorm `conv_layers.0.2.*` ("default" mode).
"""

from __future__ import annotations

import torch
from torch import nn

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


EXTRACTOR_MODES = ("layer_norm", "default")


class TransposeLast(nn.Module):
    """(B, C, T) <-> (B, T, C), so a LayerNorm can normalize over channels.

    contiguous=True copies the result into its own layout: the GELU and convolution that
    follow then run on contiguous memory (on a transposed view, GELU's backward was ~10x
    slower and the next conv copied its input anyway)."""

    def __init__(self, contiguous: bool = False):
        super().__init__()
        self.contiguous = contiguous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(-2, -1)
        return x.contiguous() if self.contiguous else x


def _conv_block(n_in: int, n_out: int, kernel: int, stride: int, norm: str, bias: bool) -> nn.Sequential:
    conv = nn.Conv1d(n_in, n_out, kernel, stride=stride, bias=bias)
    nn.init.kaiming_normal_(conv.weight)
    if norm == "layer":  # LayerNorm over channels, at every frame
        norm_layer = nn.Sequential(TransposeLast(), nn.LayerNorm(n_out), TransposeLast(contiguous=True))
    elif norm == "group":  # GroupNorm(dim, dim): each channel normalized over time
        norm_layer = nn.GroupNorm(n_out, n_out, affine=True)
    else:
        norm_layer = nn.Identity()
    # slot 1 is empty (fairseq has a p=0 dropout there); it keeps the norm at index 2
    return nn.Sequential(conv, nn.Identity(), norm_layer, nn.GELU())


class ConvFeatureEncoder(nn.Module):
    """Waveform (B, T) -> features (B, C, T'), T' = num_frames(T).

    mode "layer_norm" (data2vec, MT4SSL): LayerNorm over channels after every conv, then GELU.
    mode "default" (wav2vec 2.0, HuBERT): GroupNorm(C, C) after the first conv only, GELU.
    """

    def __init__(self, conv_layers=CONV_LAYERS, mode: str = "layer_norm", conv_bias: bool = False):
        super().__init__()
        if mode not in EXTRACTOR_MODES:
            raise ValueError(f"extractor mode must be one of {EXTRACTOR_MODES}, got {mode!r}")
        self.conv_spec = tuple(tuple(layer) for layer in conv_layers)
        blocks, n_in = [], 1
        for i, (dim, kernel, stride) in enumerate(self.conv_spec):
            if mode == "layer_norm":
                norm = "layer"
            else:
                norm = "group" if i == 0 else "none"
            blocks.append(_conv_block(n_in, dim, kernel, stride, norm, conv_bias))
            n_in = dim
        self.conv_layers = nn.ModuleList(blocks)

    @property
    def out_dim(self) -> int:
        return self.conv_spec[-1][0]

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = wav.unsqueeze(1)  # (B, 1, T)
        for block in self.conv_layers:
            x = block(x)
        return x

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return conv_output_lengths(lengths, self.conv_spec)


def conv_output_lengths(lengths: torch.Tensor, conv_layers=CONV_LAYERS) -> torch.Tensor:
    """Tensor version of `num_frames`: frames for each entry of `lengths` (in samples)."""
    n = lengths.long()
    for _, kernel, stride in conv_layers:
        n = torch.div(n - kernel, stride, rounding_mode="floor") + 1
    return n.clamp(min=0)


def frame_padding_mask(
    padding_mask: torch.Tensor | None, n_frames: int, conv_layers=CONV_LAYERS
) -> torch.Tensor | None:
    """Sample-level padding mask (B, T), True = padding -> frame-level (B, n_frames).

    The valid length of each row goes through the conv length formula; frames at or past it
    are padding. Returns None when nothing is padded (so attention can skip the mask).
    """
    if padding_mask is None:
        return None
    valid_frames = conv_output_lengths((~padding_mask).sum(-1), conv_layers)
    frames = torch.arange(n_frames, device=padding_mask.device)
    mask = frames[None, :] >= valid_frames[:, None]
    if torch.compiler.is_compiling():  # bool() would be a graph break; an all-False mask is exact too
        return mask
    return mask if bool(mask.any()) else None
