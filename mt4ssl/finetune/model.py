"""The CTC model: a pretrained MT4SSL encoder and one Linear layer to letters.

    logits = proj(final_dropout(encoder's last layer))        (B, T, V), 50 Hz frames

As fairseq's `wav2vec_ctc` (Wav2VecEncoder + proj), with its fine-tuning behaviour:
- the CNN feature encoder is frozen (fairseq's feature_grad_mult 0.0): its parameters have
  requires_grad False, so no graph is built through it and the optimizer never holds them;
- `freeze_encoder = True` (the trainer sets it for the first `freeze_finetune_updates`
  updates) runs the whole encoder without gradients: only `proj` learns;
- `cnn=` takes the CNN's output when it is already computed (fine-tuning's `model.cache_cnn`:
  the frozen CNN runs once per training utterance, about a third of an update's CPU time);
- in train mode the encoder masks time spans (mask_emb) and channel spans (zeros) at the rates
  of its config (mask_prob / mask_length, mask_channel_prob / mask_channel_length), then
  layerdrop and dropout act as configured; eval mode masks nothing.

Checkpoint (the project's format, `mt4ssl.models.checkpoint`, loads with weights_only=True):
    {"format": "mt4ssl", "model_config": encoder ModelConfig (no targets),
     "model": the encoder's state dict,
     "ctc": {"dictionary": [symbols, blank first], "head": proj's state dict,
             "final_dropout": p}, ...training state}
The encoder part is an ordinary model checkpoint, so `load_model`, `mt4ssl extract` and the
s3prl upstream read a fine-tuned checkpoint as an encoder; `load_ctc_model` reads the head too.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
from torch import nn

from mt4ssl.config import config_from_dict, config_to_dict
from mt4ssl.errors import InputError
from mt4ssl.finetune.ctc import Dictionary
from mt4ssl.models.checkpoint import load_checkpoint, write_state
from mt4ssl.models.mt4ssl import MT4SSL, ModelConfig


class CTCModel(nn.Module):
    def __init__(self, encoder_cfg: ModelConfig, vocab_size: int, final_dropout: float = 0.0):
        super().__init__()
        if vocab_size < 2:
            raise InputError(f"a CTC head needs the blank and at least one token, got {vocab_size} outputs")
        self.encoder = MT4SSL(dataclasses.replace(encoder_cfg, targets=()))
        self.final_dropout = nn.Dropout(final_dropout)
        self.proj = nn.Linear(encoder_cfg.embed_dim, vocab_size)
        nn.init.xavier_uniform_(self.proj.weight)  # fairseq's Linear for the CTC projection
        nn.init.zeros_(self.proj.bias)
        self.encoder.feature_extractor.requires_grad_(False)
        self.freeze_encoder = False

    def forward(self, source: torch.Tensor, padding_mask: torch.Tensor | None = None,
                cnn: torch.Tensor | None = None):
        """source (B, S) waveforms; padding_mask (B, S) bool, True = padding, or None; cnn: the
        frozen CNN's output (B, T, C) for `source` if already computed (`cnn_features`).
        Returns (logits (B, T, V), frame padding mask (B, T) or None)."""
        frozen = torch.no_grad() if self.freeze_encoder else contextlib.nullcontext()
        with frozen:
            states, frame_padding = self.encoder.extract_features(source, padding_mask, mask=self.training, cnn=cnn)
        return self.proj(self.final_dropout(states[-1])), frame_padding

    @torch.no_grad()
    def cnn_features(self, source: torch.Tensor) -> torch.Tensor:
        """The frozen CNN's output (T, C) of one utterance (S,) alone, for a cache: the frames
        of an utterance do not depend on the batch it is in (the CNN has no padding, the
        waveform is normalized over its own samples, and the Transformer zeroes the padding
        frames), and computing it alone makes the cached value the same in every run."""
        return self.encoder.cnn_features(source.unsqueeze(0))[0]

    def output_lengths(self, frame_padding: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        """(B,) valid frames of each row of `logits`."""
        B, T = logits.shape[:2]
        if frame_padding is None:
            return torch.full((B,), T, dtype=torch.long, device=logits.device)
        return (~frame_padding).sum(-1)


def ctc_state(model: CTCModel, dictionary: Dictionary) -> dict:
    """The checkpoint fields of a CTC model (see the module docstring)."""
    if len(dictionary) != model.proj.out_features:
        raise ValueError(f"dictionary of {len(dictionary)} symbols for a head of {model.proj.out_features} outputs")
    return {"model_config": config_to_dict(model.encoder.cfg), "model": model.encoder.state_dict(),
            "ctc": {"dictionary": list(dictionary.symbols), "head": model.proj.state_dict(),
                    "final_dropout": float(model.final_dropout.p)}}


def save_ctc_model(path: str | Path, model: CTCModel, dictionary: Dictionary, **extra) -> None:
    """Write a CTC checkpoint atomically."""
    write_state(path, {**ctc_state(model, dictionary), **extra})


def ctc_from_state(state: dict, where: str) -> tuple[CTCModel, Dictionary]:
    """The CTC model and dictionary of a loaded checkpoint dict."""
    if not isinstance(state.get("ctc"), dict):
        raise InputError(f"{where}: has no CTC head (a pretraining or converted encoder checkpoint?); "
                         f"fine-tune it first with `mt4ssl finetune CONFIG.yaml run.init_from={where}`")
    ctc = state["ctc"]
    try:
        dictionary = Dictionary(tuple(ctc["dictionary"]))
        cfg = config_from_dict(ModelConfig, state["model_config"], f"{where}: model_config")
        model = CTCModel(cfg, len(dictionary), ctc.get("final_dropout", 0.0))
        model.encoder.load_state_dict(state["model"])
        model.proj.load_state_dict(ctc["head"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise InputError(f"{where}: a CTC checkpoint that does not load: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    return model, dictionary


def load_ctc_model(path: str | Path, map_location="cpu") -> tuple[CTCModel, Dictionary]:
    """The fine-tuned CTC model of a checkpoint (in eval mode) and its letter dictionary."""
    model, dictionary = ctc_from_state(load_checkpoint(path, map_location), str(path))
    return model.to(map_location).eval(), dictionary
