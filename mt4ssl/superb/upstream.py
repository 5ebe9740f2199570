"""The s3prl upstream for mt4ssl checkpoints: `-u mt4ssl_local -k CKPT` (or `mt4ssl_url`).

Use
---
In this project (s3prl 0.4.18 is the `superb` extra), register the names on `s3prl.hub` at
run time, then use them as any s3prl upstream:

    import mt4ssl.superb
    mt4ssl.superb.register()       # setattr on s3prl.hub; idempotent; site-packages untouched

    from s3prl.nn import S3PRLUpstream
    upstream = S3PRLUpstream("mt4ssl_local", path_or_url="exp/tiny/pretrain/checkpoints/checkpoint_last.pt")

s3prl's own runner (`run_downstream`) looks the name up with `getattr(s3prl.hub, NAME)`, so
calling `register()` before it hands the runner these names too. The runner itself does not
start on this project's stack without run-time fixes (undeclared imports, huggingface_hub
2.x, torch's weights_only loading; ../shared/notes/s3prl.md): `mt4ssl superb` (runner.py)
applies them in `mt4ssl/superb/_s3prl_main.py` and runs the tasks with this upstream.

From your own s3prl checkout or installation (mt4ssl installed in the same environment):
either call `mt4ssl.superb.register()` in your script before s3prl looks the name up, or add
one line to your checkout's `s3prl/hub.py`, beside the other upstreams' hubconf imports:

    from mt4ssl.superb.upstream import *     # mt4ssl_local, mt4ssl_url (nothing else is exported)

Checkpoints
-----------
Any mt4ssl checkpoint: `mt4ssl pretrain` training checkpoints (`checkpoints/checkpoint_last.pt`,
`checkpoint_best.pt`, `checkpoint_<N>.pt`: the optimizer and other training state are ignored)
and `mt4ssl convert fairseq` outputs. It is read by `mt4ssl.models.checkpoint.load_model`,
i.e. `torch.load(weights_only=True)`: no code from the file runs, a pickle that would call
anything is refused. A file that is not an mt4ssl checkpoint (a fairseq or s3prl checkpoint,
a plain dict, a text file) raises `InputError` naming the path and what is wrong. A URL
(`http...`, for either name) is downloaded and cached by s3prl's own helper
(`s3prl.util.download`, under ~/.cache/s3prl/download; `refresh=True` downloads again).
The checkpoint carries its model config, so `model_config` (`-g`) must not be given.

Only the student encoder is kept: the pretraining heads and the EMA teacher are dropped after
loading; no masking; layerdrop is off so every forward gives num_layers + 1 states. Dropout
follows the module's train/eval mode like every s3prl upstream (s3prl's runner puts a frozen
upstream in eval mode; call `.eval()` on an `S3PRLUpstream` before extracting features).

Output
------
forward(wavs: list of 1-D float tensors at 16 kHz, any lengths) ->
    {"hidden_states": [num_layers + 1 tensors (B, T, D)],   HuBERT convention: the
                                                             Transformer's input (after the
                                                             positional conv + LayerNorm),
                                                             then each layer's output
     "last_hidden_state": hidden_states[-1], "hidden_state_{i}": hidden_states[i]}
T = the CNN's frame count of the longest waveform, floor((n - 400) / 320) + 1 (s3prl's checks:
within 5 of round(n / 320) for the legacy Featurizer; S3PRLUpstream pads to ceil(n / 320) by
repeating the last frame). Frames past an utterance's own count are filled with its last
frame, as S3PRLUpstream does for the longest one, so an utterance gets the same S3PRLUpstream
output batched or alone. A waveform shorter than the CNN's 400-sample receptive field is
zero-padded to 400 samples (one frame). get_downsample_rates(any key) = 320.

Padding: each utterance's states equal those of the same utterance run alone
----------------------------------------------------------------------------
A zero-padded batch does NOT give that with the model as it is. The data2vec positional
convolution (5 blocks of kernel 19) sees the padding frames zeroed only before its first
block; blocks 2-5 read the nonzero values block 1 wrote there, so the last 36 valid frames
of a shorter utterance change at hidden_states[0], and every frame after the first attention
layer (the same leak is in fairseq's and Hugging Face's data2vec). In extractor_mode
"default" (converted HuBERT checkpoints) the first CNN layer's GroupNorm also takes its
statistics over the padded time axis, which moves every frame. Measured on the tiny preset,
largest difference from the utterance alone: 3.5 (the demo's checkpoint after 100 updates)
and 5.5 (random init) in the data2vec geometry, 1.8 in the HuBERT geometry (random init).

So forward runs the utterances in groups of equal length, each group one unpadded batch:
correct by construction, for every checkpoint kind. SUPERB batches rarely hold two equal
lengths, so in effect it runs one utterance at a time; no padding frame is computed. Measured
on CPU, 1 thread (a machine shared with other runs), tiny preset (4 x 256), 8 waveforms of
1.5-4.1 s (22 s in all): this forward 0.19 s; one zero-padded batch 0.50 s (wrong, as above);
one padded batch with the positional-conv fix below 0.52 s (exact for the data2vec geometry,
not for "default" mode). On a GPU one padded batch would be expected to be faster (not
measured here). Making the padded batch exact needs a model change in
mt4ssl/models/transformer.py (zero the padding frames before every positional-conv block,
not only the first) and, for "default" mode, a GroupNorm over valid frames only in
mt4ssl/models/cnn.py; with both, `forward` could send one padded batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mt4ssl.errors import InputError
from mt4ssl.models.checkpoint import load_model
from mt4ssl.models.cnn import num_frames

try:
    from s3prl.upstream.interfaces import UpstreamBase
except ImportError as e:  # pragma: no cover - s3prl is the optional `superb` dependency
    raise ImportError(f"mt4ssl.superb needs s3prl 0.4.18 (pip install 'mt4ssl[superb]'): {e}") from e

__all__ = ["mt4ssl_local", "mt4ssl_url"]  # what `from mt4ssl.superb.upstream import *` adds to a hub

DOWNSAMPLE_RATE = 320  # samples per frame at 16 kHz (the CNN's total stride)
MIN_SAMPLES = 400  # the CNN's receptive field: one frame


class UpstreamExpert(UpstreamBase):
    """An mt4ssl checkpoint as an s3prl upstream (see the module docstring)."""

    def __init__(self, ckpt: str, **kwargs):
        super().__init__(**kwargs)
        try:
            model = load_model(ckpt)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # format-marked but broken
            raise InputError(f"{ckpt}: an mt4ssl checkpoint whose model does not load: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        model.targets = nn.ModuleDict()  # heads and EMA teacher: pretraining only
        model.encoder.layerdrop = 0.0  # a fixed number of hidden states in train mode too
        self.model = model
        self.num_layers = model.cfg.num_layers
        self.eval()

    def get_downsample_rates(self, key: str) -> int:
        return DOWNSAMPLE_RATE

    def forward(self, wavs: list[torch.Tensor]) -> dict:
        if len(wavs) == 0:
            raise ValueError("mt4ssl upstream: forward got an empty list of waveforms")
        bad = [i for i, w in enumerate(wavs) if w.dim() != 1 or w.numel() == 0]
        if bad:
            raise ValueError(f"mt4ssl upstream: waveforms {bad} are not non-empty 1-D tensors "
                             f"(shapes {[tuple(wavs[i].shape) for i in bad]})")
        dtype = self.model.post_extract_proj.weight.dtype
        wavs = [F.pad(w.to(dtype), (0, max(0, MIN_SAMPLES - w.numel()))) for w in wavs]

        groups: dict[int, list[int]] = {}  # length -> utterance indices
        for i, w in enumerate(wavs):
            groups.setdefault(w.numel(), []).append(i)
        per_utt: list[list[torch.Tensor] | None] = [None] * len(wavs)  # utterance -> states (T_i, D)
        for idx in groups.values():
            states, _ = self.model.extract_features(torch.stack([wavs[i] for i in idx]))
            for row, i in enumerate(idx):
                per_utt[i] = [h[row] for h in states]

        T = num_frames(max(w.numel() for w in wavs), self.model.cfg.conv_layers)

        def padded(h: torch.Tensor) -> torch.Tensor:  # (T_i, D) -> (T, D), last frame repeated
            return h if h.shape[0] == T else torch.cat([h, h[-1:].expand(T - h.shape[0], -1)])

        hidden_states = [torch.stack([padded(states[layer]) for states in per_utt])
                         for layer in range(self.num_layers + 1)]
        out = {"hidden_states": hidden_states, "last_hidden_state": hidden_states[-1]}
        out.update({f"hidden_state_{i}": h for i, h in enumerate(hidden_states)})
        return out


# ---------------------------------------------------------------------------- hub entries


def _local_path(name: str, ckpt, refresh: bool) -> str:
    if ckpt is None or str(ckpt) == "":
        raise InputError(f"{name}: give the mt4ssl checkpoint (-k CKPT, or path_or_url=CKPT)")
    ckpt = str(ckpt)
    if ckpt.startswith(("http://", "https://")):
        from s3prl.util.download import _urls_to_filepaths

        return _urls_to_filepaths(ckpt, refresh=refresh)
    return ckpt


def mt4ssl_local(ckpt: str, model_config=None, refresh: bool = False, **kwargs) -> UpstreamExpert:
    """An mt4ssl checkpoint (path, or URL) as an s3prl upstream."""
    if model_config is not None:
        raise InputError(f"mt4ssl_local: model_config {model_config!r} is not used: an mt4ssl "
                         "checkpoint carries its model config (drop -g)")
    if kwargs:
        raise InputError(f"mt4ssl_local: unknown option(s) {sorted(kwargs)} (it takes ckpt and refresh)")
    return UpstreamExpert(_local_path("mt4ssl_local", ckpt, refresh))


def mt4ssl_url(ckpt: str, refresh: bool = False, **kwargs) -> UpstreamExpert:
    """An mt4ssl checkpoint at a URL (downloaded once and cached by s3prl), or a path."""
    return mt4ssl_local(_local_path("mt4ssl_url", ckpt, refresh), refresh=refresh, **kwargs)
