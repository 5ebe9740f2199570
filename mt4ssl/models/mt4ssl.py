"""MT4SSL: one student, masked prediction of offline and online targets (Ma et al., 2023).

    features = Linear(LayerNorm(CNN(normalize(wav))))          (B, T, 768), 50 Hz frames
    x        = Transformer(PosConv(mask(Dropout(features))))   masked frames -> learned mask_emb
    targets, at the masked frames only:
      kmeans   Linear(x) -> cross-entropy with k-means cluster ids        (Off-TE, kmeans.py)
      teacher  Linear(x) -> L2 to the average of the top-K FFN outputs of an
               EMA teacher that reads the unmasked features              (On-TE, teacher.py)

Loss = sum over enabled targets of weight * (loss summed over masked frames); the trainer
divides by the number of masked frames across workers. Enabled targets: ("kmeans",) is
the HuBERT-like ablation, ("teacher",) is data2vec, ("kmeans", "teacher") is MT4SSL.

teacher.masks_per_sample M > 1 (data2vec 2.0's clone batch): the CNN and the teacher run
once per utterance, the Transformer on M differently masked copies of it; the targets are
repeated and the masked frames of all copies counted (data2vec 2.0's sample_size), so the
loss is the mean over the copies. M = 1 is the paper.

Parameter names are fairseq's data2vec-audio ones (`feature_extractor`, `layer_norm`,
`post_extract_proj`, `mask_emb`, `encoder.*`); the heads and the teacher live under
`targets.<kind>`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mt4ssl.errors import InputError
from mt4ssl.models.cnn import CONV_LAYERS, EXTRACTOR_MODES, ConvFeatureEncoder, frame_padding_mask
from mt4ssl.models.masking import sample_channel_mask, sample_span_mask
from mt4ssl.models.transformer import TransformerEncoder
from mt4ssl.targets import TARGET_KINDS, KMeansConfig, TargetBatch, TeacherConfig


@dataclass(frozen=True)
class ModelConfig:
    # CNN feature encoder; kernels and strides are fixed (labels are at num_frames, 50 Hz),
    # only the channel dims may change
    conv_layers: tuple[tuple[int, int, int], ...] = CONV_LAYERS
    extractor_mode: str = "layer_norm"  # "layer_norm" (data2vec) or "default" (HuBERT)
    conv_bias: bool = False
    normalize: bool = True  # per-utterance zero mean, unit variance waveform
    # Transformer (post-LN)
    embed_dim: int = 768
    ffn_dim: int = 3072
    num_heads: int = 12
    num_layers: int = 12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    layerdrop: float = 0.05
    dropout_input: float = 0.0  # on the projected features, before masking
    pos_conv_depth: int = 5  # 5 blocks of kernel 19 (data2vec); 1 with kernel 128 (HuBERT)
    pos_conv_kernel: int = 19
    pos_conv_groups: int = 16
    # masking
    mask_prob: float = 0.65
    mask_length: int = 10
    mask_min_spans: int = 1
    require_same_masks: bool = True
    mask_channel_prob: float = 0.0  # fine-tuning only (extract_features(mask=True))
    mask_channel_length: int = 64
    # targets: the enabled kinds, each configured by the section of the same name
    targets: tuple[str, ...] = ("kmeans", "teacher")
    kmeans: KMeansConfig = KMeansConfig()
    teacher: TeacherConfig = TeacherConfig()

    def __post_init__(self):
        for key in ("embed_dim", "ffn_dim", "num_heads", "num_layers", "pos_conv_depth", "pos_conv_kernel",
                    "pos_conv_groups", "mask_length", "mask_channel_length"):
            if getattr(self, key) < 1:
                raise InputError(f"{key}: {getattr(self, key)} must be at least 1")
        if self.mask_min_spans < 0:
            raise InputError(f"mask_min_spans: {self.mask_min_spans} must be at least 0")
        for key in ("dropout", "attention_dropout", "activation_dropout", "dropout_input", "layerdrop",
                    "mask_prob", "mask_channel_prob"):  # probabilities
            if not 0 <= getattr(self, key) <= 1:
                raise InputError(f"{key}: {getattr(self, key)} must be in [0, 1]")
        if any(c < 1 for c, _, _ in self.conv_layers):
            raise InputError(f"conv_layers {self.conv_layers}: every channel dim must be at least 1")
        geometry = tuple((k, s) for _, k, s in self.conv_layers)
        if geometry != tuple((k, s) for _, k, s in CONV_LAYERS):
            raise InputError(
                f"conv_layers {self.conv_layers}: kernels and strides must be {CONV_LAYERS} "
                "(only the channel dims may change), or frames would not match the 50 Hz labels"
            )
        if self.extractor_mode not in EXTRACTOR_MODES:
            raise InputError(f"extractor_mode {self.extractor_mode!r}: must be one of {EXTRACTOR_MODES}")
        if self.embed_dim % self.num_heads or self.embed_dim % self.pos_conv_groups:
            raise InputError(
                f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads} "
                f"and pos_conv_groups {self.pos_conv_groups}"
            )
        unknown = [t for t in self.targets if t not in TARGET_KINDS]
        if unknown or len(set(self.targets)) != len(self.targets):
            raise InputError(f"targets {self.targets}: each must appear once, among {sorted(TARGET_KINDS)}")


PRESETS: dict[str, ModelConfig] = {
    # the paper's student = data2vec-audio Base
    "base": ModelConfig(),
    "large": ModelConfig(embed_dim=1024, ffn_dim=4096, num_heads=16, num_layers=24),
    # a few million parameters for CPU demos and tests: same CNN geometry, narrow channels
    "tiny": ModelConfig(
        conv_layers=tuple((128, k, s) for _, k, s in CONV_LAYERS),
        embed_dim=256,
        ffn_dim=1024,
        num_heads=4,
        num_layers=4,
        teacher=TeacherConfig(top_k=3),
    ),
}


def model_config(name: str, **overrides) -> ModelConfig:
    """A named preset ("base", "large", "tiny") with fields replaced by `overrides`."""
    if name not in PRESETS:
        raise InputError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def normalize_waveform(
    wav: torch.Tensor, padding_mask: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """Zero mean, unit variance per utterance over its valid samples; padding stays 0."""
    wav = wav.float()
    if padding_mask is None:
        return F.layer_norm(wav, wav.shape[-1:], eps=eps)
    valid = (~padding_mask).float()
    count = valid.sum(dim=-1, keepdim=True).clamp(min=1.0)
    mean = (wav * valid).sum(dim=-1, keepdim=True) / count
    var = ((wav - mean).square() * valid).sum(dim=-1, keepdim=True) / count
    return (wav - mean) * torch.rsqrt(var + eps) * valid


@dataclass
class PretrainOutput:
    loss: torch.Tensor  # sum over targets of weight * loss (each summed over masked frames)
    losses: dict[str, torch.Tensor]  # per target kind, unweighted sums (detached)
    sample_size: torch.Tensor  # number of masked frames in this batch
    logs: dict[str, torch.Tensor]  # e.g. target_std, pred_std, acc_hubert500
    mask: torch.Tensor  # (B, T) the masked frames


class MT4SSL(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        C, D = cfg.conv_layers[-1][0], cfg.embed_dim
        self.feature_extractor = ConvFeatureEncoder(cfg.conv_layers, cfg.extractor_mode, cfg.conv_bias)
        self.layer_norm = nn.LayerNorm(C)
        self.post_extract_proj = nn.Linear(C, D)
        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.mask_emb = nn.Parameter(torch.empty(D).uniform_())
        self.encoder = TransformerEncoder(
            dim=D,
            ffn_dim=cfg.ffn_dim,
            num_heads=cfg.num_heads,
            num_layers=cfg.num_layers,
            dropout=cfg.dropout,
            attention_dropout=cfg.attention_dropout,
            activation_dropout=cfg.activation_dropout,
            layerdrop=cfg.layerdrop,
            pos_conv_depth=cfg.pos_conv_depth,
            pos_conv_kernel=cfg.pos_conv_kernel,
            pos_conv_groups=cfg.pos_conv_groups,
        )
        self.targets = nn.ModuleDict(
            {kind: TARGET_KINDS[kind](D, getattr(cfg, kind), self.encoder) for kind in cfg.targets}
        )

    # ------------------------------------------------------------------ the pieces

    def cnn_features(self, wav: torch.Tensor, padding_mask: torch.Tensor | None = None,
                     normalized: bool = False) -> torch.Tensor:
        """The CNN's output (B, T, C) of waveforms (B, S) (normalized first if configured and
        the waveforms are not `normalized` already, e.g. over their whole file by the dataset)."""
        if self.cfg.normalize and not normalized:
            wav = normalize_waveform(wav, padding_mask)
        return self.feature_extractor(wav).transpose(1, 2)

    def features(self, wav: torch.Tensor, padding_mask: torch.Tensor | None = None,
                 cnn: torch.Tensor | None = None, normalized: bool = False):
        """Waveforms (B, S) [+ padding mask (B, S), True = padding] -> projected features
        (B, T, D) and the frame padding mask (B, T) or None. `cnn`: the CNN's output (B, T, C)
        for these waveforms when it is already computed (fine-tuning's cache of a frozen CNN);
        the waveforms then only give the lengths."""
        x = self.cnn_features(wav, padding_mask, normalized) if cnn is None else cnn
        x = self.post_extract_proj(self.layer_norm(x))
        return x, frame_padding_mask(padding_mask, x.shape[1], self.cfg.conv_layers)

    def sample_mask(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """Span mask (B, T) for features x; the numpy generator is seeded from torch's RNG,
        so torch.manual_seed makes it reproducible."""
        B, T = x.shape[:2]
        lengths = [T] * B if padding_mask is None else (T - padding_mask.sum(-1)).tolist()
        rng = np.random.default_rng(int(torch.randint(2**62, ())))
        cfg = self.cfg
        mask = sample_span_mask(
            lengths, T, cfg.mask_prob, cfg.mask_length, rng, cfg.mask_min_spans, cfg.require_same_masks
        )
        return torch.from_numpy(mask).to(x.device)

    def apply_mask(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Replace the masked frames by the learned mask embedding."""
        return torch.where(mask.unsqueeze(-1), self.mask_emb.to(x.dtype), x)

    # ------------------------------------------------------------------ pretraining

    def forward(
        self,
        wav: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        mask_indices: torch.Tensor | None = None,
        labels: Mapping[str, torch.Tensor] | None = None,
        masks_per_sample: int | None = None,
        normalized: bool = False,
        mask_positions: torch.Tensor | None = None,
    ) -> PretrainOutput:
        """wav (B, S) float; padding_mask (B, S) bool, True = padding; mask_indices (M * B, T)
        bool to use instead of sampling; labels: label-set name -> (B, T) cluster ids;
        masks_per_sample M: masked copies of each utterance for the student (None: the
        config's teacher.masks_per_sample; copy m of utterance b is row b * M + m);
        normalized: wav is normalized already (data.normalize_before_crop);
        mask_positions: `masked_positions(mask_indices)` (M * B, n), given with it.

        Under torch.compile pass both masks (the trainer's task samples them before the
        forward): sampling draws on the host and boolean indexing has a data-dependent shape,
        each a graph break; with positions the masked frames are gathered, a static shape."""
        M = self.cfg.teacher.masks_per_sample if masks_per_sample is None else masks_per_sample
        features, frame_padding = self.features(wav, padding_mask, normalized=normalized)  # once per utterance
        student_in, student_padding = features, frame_padding
        if M > 1:  # data2vec 2.0's clone batch: M rows per utterance, each masked differently
            student_in = features.repeat_interleave(M, dim=0)
            student_padding = None if frame_padding is None else frame_padding.repeat_interleave(M, dim=0)
        if mask_indices is None:
            mask = self.sample_mask(student_in, student_padding)
        else:
            mask = torch.as_tensor(mask_indices, dtype=torch.bool, device=features.device)
            if mask.shape != student_in.shape[:2]:
                raise ValueError(f"mask_indices of shape {tuple(mask.shape)}: expected "
                                 f"{tuple(student_in.shape[:2])} ({M} masked copies x {len(wav)} utterances)")
        x = self.apply_mask(self.dropout_input(student_in), mask)
        hidden = self.encoder(x, student_padding).x
        batch = TargetBatch(features=features, padding_mask=frame_padding, mask=mask, labels=labels or {},
                            hidden=hidden, copies=M, positions=mask_positions)
        x = batch.select(hidden)  # student output at the masked frames
        loss, losses, logs = x.new_zeros((), dtype=torch.float32), {}, {}
        for kind, target in self.targets.items():
            value, target_logs = target.loss(x, batch)
            loss = loss + target.weight * value
            losses[kind] = value.detach()  # for logs: only `loss` is differentiated (a compiled
            logs.update(target_logs)       # backward failed on the unused gradients of these)
        return PretrainOutput(loss=loss, losses=losses, sample_size=mask.sum(), logs=logs, mask=mask)

    def update_targets(self, num_updates: int) -> None:
        """Call once after every optimizer update (the EMA teacher's step; fairseq's order, once
        before every micro-batch: TeacherConfig.ema_per_micro_batch)."""
        for target in self.targets.values():
            target.step(self.encoder, num_updates)

    # ------------------------------------------------------------------ inference, fine-tuning

    def extract_features(
        self,
        wav: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        layers: int | None = None,
        mask: bool = False,
        cnn: torch.Tensor | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Hidden states (HuBERT convention: input of layer 0 after pos conv + LayerNorm, then
        the output of each layer; `layers` + 1 entries if `layers` is given, else
        num_layers + 1) and the frame padding mask. mask=True (fine-tuning) masks time spans
        with mask_emb and zeroes channel spans (mask_channel_prob) first. `cnn`: see features()."""
        x, frame_padding = self.features(wav, padding_mask, cnn)
        x = self.dropout_input(x)
        if mask:
            if self.cfg.mask_prob > 0:
                x = self.apply_mask(x, self.sample_mask(x, frame_padding))
            if self.cfg.mask_channel_prob > 0:
                rng = np.random.default_rng(int(torch.randint(2**62, ())))
                channels = sample_channel_mask(
                    x.shape[0], x.shape[2], self.cfg.mask_channel_prob, self.cfg.mask_channel_length, rng
                )
                x = x.masked_fill(torch.from_numpy(channels).to(x.device).unsqueeze(1), 0.0)
        out = self.encoder(x, frame_padding, num_layers=layers)
        return out.hidden_states, frame_padding

    def num_parameters(self, include_teacher: bool = False) -> int:
        return sum(
            p.numel() for name, p in self.named_parameters() if include_teacher or ".ema." not in f".{name}"
        )
