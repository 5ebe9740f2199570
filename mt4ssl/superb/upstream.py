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
The checkpoint carries its model config; s3prl's `model_config` (`-g FILE`) is a YAML of
upstream options instead: `precision: fp32 | bf16 | fp16 | auto` (autocast of the forward;
auto = bf16 where the device has native bf16; the states are returned as float32), and
`cache_gb: G` (off by default): a frozen upstream (eval mode, no gradient, as s3prl runs it
unless `-f`) keeps each utterance's states in memory, least recently used dropped past G GB,
keyed by a hash of its samples, so epochs after the first skip the upstream for utterances
that come back unchanged (PR, ASR, SID, IC and KS's word clips; KS's random noise crops and
any data augmentation are new samples each time). The states are those of the utterance
alone in any case, so caching changes no number, only the time.

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

So the upstream zeroes the padding frames before every positional-conv block
(`TransformerEncoder.exact_padding`, off for pretraining, which keeps fairseq's behaviour).
With the per-frame LayerNorm CNN (extractor_mode "layer_norm": data2vec, MT4SSL, the
project's presets) a padded batch is then exact to float tolerance, and on a GPU forward
sends the batch as one padded batch. On CPU, and in "default" mode (GroupNorm over time:
converted HuBERT Base) everywhere, it runs the utterances in groups of equal length, each
group one unpadded batch (SUPERB batches rarely hold two equal lengths: in effect one
utterance at a time), which computes no padding frame. Measured on CPU (AMD EPYC, capability
AVX512 with AVX-512 BF16, 1 thread), tiny preset (4 x 256), 16 waveforms of 1-6 s (50 s):
groups 60 audio-s/s in fp32, 117 in bf16; one padded batch 26 and 52 (it computes 96 s of
audio). On a GPU the padded batch is expected to win (one launch instead of 16; not
measured here: no GPU).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from pathlib import Path

import torch
import yaml
import torch.nn.functional as F
from torch import nn

from mt4ssl.errors import InputError
from mt4ssl.models.checkpoint import load_model
from mt4ssl.models.cnn import num_frames
from mt4ssl.utils.precision import DTYPES, PRECISIONS, resolve_precision

try:
    from s3prl.upstream.interfaces import UpstreamBase
except ImportError as e:  # pragma: no cover - s3prl is the optional `superb` dependency
    raise ImportError(f"mt4ssl.superb needs s3prl 0.4.18 (pip install 'mt4ssl[superb]'): {e}") from e

log = logging.getLogger(__name__)

__all__ = ["mt4ssl_local", "mt4ssl_url"]  # what `from mt4ssl.superb.upstream import *` adds to a hub

DOWNSAMPLE_RATE = 320  # samples per frame at 16 kHz (the CNN's total stride)
MIN_SAMPLES = 400  # the CNN's receptive field: one frame


class UpstreamExpert(UpstreamBase):
    """An mt4ssl checkpoint as an s3prl upstream (see the module docstring)."""

    def __init__(self, ckpt: str, precision: str = "fp32", cache_gb: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if precision not in PRECISIONS:
            raise InputError(f"mt4ssl upstream: precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        if not isinstance(cache_gb, (int, float)) or not 0 <= cache_gb < float("inf"):
            raise InputError(f"mt4ssl upstream: cache_gb {cache_gb!r}: expected a number >= 0")
        self.precision = precision
        self.cache_bytes = int(cache_gb * 2**30)
        self._cache: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()  # LRU: samples' hash -> states
        self._cache_used = self.cache_hits = self.cache_misses = 0
        try:
            model = load_model(ckpt)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # format-marked but broken
            raise InputError(f"{ckpt}: an mt4ssl checkpoint whose model does not load: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        model.targets = nn.ModuleDict()  # heads and EMA teacher: pretraining only
        model.encoder.layerdrop = 0.0  # a fixed number of hidden states in train mode too
        model.encoder.exact_padding = True  # positional conv: padding zeroed before every block
        # a padded batch is exact unless the CNN normalizes over time (GroupNorm, "default")
        self.exact_batches = model.cfg.extractor_mode == "layer_norm"
        self.pad_on_cpu = False  # on CPU the groups are faster (module docstring)
        self._dtypes: dict[str, tuple[str, str]] = {}  # device -> (precision, why), logged once
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
        device = wavs[0].device
        if str(device) not in self._dtypes:
            self._dtypes[str(device)] = resolve_precision(self.precision, device)
            log.info("mt4ssl upstream on %s: precision %s (%s)", device, *self._dtypes[str(device)])
        precision = self._dtypes[str(device)][0]
        with torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32"):
            out = self._forward(wavs)
        if precision != "fp32":
            out = {k: ([h.float() for h in v] if isinstance(v, list) else v.float()) for k, v in out.items()}
        return out

    def _states(self, wavs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Each utterance's states alone: num_layers + 1 tensors (T_i, D)."""
        conv = self.model.cfg.conv_layers
        per_utt: list[list[torch.Tensor] | None] = [None] * len(wavs)
        if self.exact_batches and (self.pad_on_cpu or wavs[0].device.type != "cpu"):  # one padded batch
            lengths = torch.tensor([w.numel() for w in wavs], device=wavs[0].device)
            batch = torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True)
            padding = torch.arange(batch.shape[1], device=batch.device)[None, :] >= lengths[:, None]
            states, _ = self.model.extract_features(batch, padding if bool(padding.any()) else None)
            for i, n in enumerate(lengths.tolist()):
                per_utt[i] = [h[i, :num_frames(n, conv)] for h in states]
        else:  # groups of equal length, each an unpadded batch
            groups: dict[int, list[int]] = {}  # length -> utterance indices
            for i, w in enumerate(wavs):
                groups.setdefault(w.numel(), []).append(i)
            for idx in groups.values():
                states, _ = self.model.extract_features(torch.stack([wavs[i] for i in idx]))
                for row, i in enumerate(idx):
                    per_utt[i] = [h[row] for h in states]
        return per_utt

    def _cached_states(self, wavs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """`_states`, through the cache when it is on and the upstream is frozen (eval mode, no
        gradient: then an utterance's states depend on its samples only)."""
        if self.cache_bytes <= 0 or self.training or torch.is_grad_enabled():
            return self._states(wavs)
        keys = [(w.numel(), str(w.dtype), hashlib.blake2b(w.detach().cpu().numpy().tobytes(),
                                                          digest_size=16).hexdigest()) for w in wavs]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if missing:
            for i, states in zip(missing, self._states([wavs[i] for i in missing])):
                states = [h.clone() for h in states]  # not views of a batch
                size = sum(h.numel() * h.element_size() for h in states)
                while self._cache and self._cache_used + size > self.cache_bytes:
                    _, old = self._cache.popitem(last=False)  # least recently used
                    self._cache_used -= sum(h.numel() * h.element_size() for h in old)
                if size <= self.cache_bytes:
                    self._cache[keys[i]], self._cache_used = states, self._cache_used + size
                else:
                    return self._states(wavs)
        self.cache_hits += len(wavs) - len(missing)
        self.cache_misses += len(missing)
        for k in keys:
            self._cache.move_to_end(k)
        return [self._cache[k] for k in keys]

    def _forward(self, wavs: list[torch.Tensor]) -> dict:
        conv = self.model.cfg.conv_layers
        per_utt = self._cached_states(wavs)
        T = num_frames(max(w.numel() for w in wavs), conv)

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


UPSTREAM_OPTIONS = {"precision": "autocast precision of the forward: fp32 (default), bf16, fp16, or "
                                 "auto (bf16 where the device has native bf16, else fp32)",
                    "cache_gb": "keep the states of up to this many GB of utterances in memory, keyed by "
                                "a hash of their samples, for a frozen upstream (0: off, the default)"}


def read_options(model_config) -> dict:
    """The upstream options of s3prl's `-g MODEL_CONFIG`: a YAML file (or a dict) with keys of
    UPSTREAM_OPTIONS. The checkpoint carries the model's own config."""
    if model_config is None or model_config == "":
        return {}
    if isinstance(model_config, dict):
        options, where = model_config, "model_config"
    else:
        path = Path(model_config)
        if not path.is_file():
            raise InputError(f"mt4ssl upstream: model_config {path}: file not found (a YAML of upstream options: "
                             f"{', '.join(UPSTREAM_OPTIONS)}; the checkpoint carries the model's config)")
        options, where = yaml.safe_load(path.read_text()) or {}, str(path)
        if not isinstance(options, dict):
            raise InputError(f"{where}: expected a mapping of upstream options ({', '.join(UPSTREAM_OPTIONS)})")
    unknown = sorted(set(options) - set(UPSTREAM_OPTIONS))
    if unknown:
        raise InputError(f"{where}: unknown upstream option(s) {unknown}; known: "
                         + "; ".join(f"{k}: {v}" for k, v in UPSTREAM_OPTIONS.items()))
    return dict(options)


def mt4ssl_local(ckpt: str, model_config=None, refresh: bool = False, **kwargs) -> UpstreamExpert:
    """An mt4ssl checkpoint (path, or URL) as an s3prl upstream; `model_config` (`-g`): a
    YAML of upstream options (UPSTREAM_OPTIONS), keyword arguments the same options."""
    unknown = sorted(set(kwargs) - set(UPSTREAM_OPTIONS))
    if unknown:
        raise InputError(f"mt4ssl_local: unknown option(s) {unknown} (it takes ckpt, refresh, model_config "
                         f"and {', '.join(UPSTREAM_OPTIONS)})")
    options = {**read_options(model_config), **kwargs}
    return UpstreamExpert(_local_path("mt4ssl_local", ckpt, refresh), **options)


def mt4ssl_url(ckpt: str, model_config=None, refresh: bool = False, **kwargs) -> UpstreamExpert:
    """An mt4ssl checkpoint at a URL (downloaded once and cached by s3prl), or a path."""
    return mt4ssl_local(_local_path("mt4ssl_url", ckpt, refresh), model_config, refresh=refresh, **kwargs)
