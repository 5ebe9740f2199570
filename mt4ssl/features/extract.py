"""Hidden states of a checkpoint: `mt4ssl extract CKPT INPUT --out DIR [--layers ...]`.

INPUT is an audio file: writes `DIR/<name>.npy`, shape (layers, frames, dim).
INPUT is a `.tsv` manifest: writes feature shards, one folder per layer, `DIR/layer<L>/`,
in the format of `mt4ssl features` (sharded with --shard/--nshard, resumable), so
second-iteration k-means runs on them as on MFCCs:
    mt4ssl extract it1/checkpoint_last.pt data/train.tsv --out feats --layers 6
    mt4ssl kmeans feats/layer6 train km500.npz -k 500

Layer 0 is the Transformer's input (after the positional conv and LayerNorm), layer i the
output of block i (HuBERT's convention, as s3prl's hidden_states): 13 layers for Base.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from mt4ssl.data.audio import read_audio
from mt4ssl.errors import InputError
from mt4ssl.features.dump import FeatureKind, dump_shard, shard_prefix
from mt4ssl.models.checkpoint import load_model
from mt4ssl.models.cnn import FRAME_RATE, num_frames
from mt4ssl.models.mt4ssl import MT4SSL
from mt4ssl.utils.io import atomic_open
from mt4ssl.utils.precision import DTYPES, resolve_precision

log = logging.getLogger(__name__)


def layer_kind(model: MT4SSL, layers: list[int], device: torch.device, dtype: torch.dtype | None) -> FeatureKind:
    """A feature kind whose outputs are the given layers' hidden states of `model`."""
    n_states = model.cfg.num_layers + 1
    bad = [layer for layer in layers if not 0 <= layer < n_states]
    if bad:
        raise InputError(f"--layers {bad}: this model has layers 0..{n_states - 1}")

    @torch.inference_mode()
    def compute(wav: np.ndarray) -> list[np.ndarray]:
        x = torch.from_numpy(wav).to(device).unsqueeze(0)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            states, _ = model.extract_features(x, layers=max(layers))
        return [states[layer][0].float().cpu().numpy() for layer in layers]

    return FeatureKind(f"layer-{model.cfg.embed_dim}", FRAME_RATE, model.cfg.embed_dim, num_frames,
                       compute, outputs=tuple(f"layer{layer}" for layer in layers))


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", type=Path, help="mt4ssl checkpoint (see `mt4ssl convert` for fairseq ones)")
    p.add_argument("input", type=Path, help="an audio file, or a {split}.tsv manifest")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--layers", type=int, nargs="+", help="layers to write (default: all)")
    p.add_argument("--shard", type=int, default=0, help="manifest input: this shard's index")
    p.add_argument("--nshard", type=int, default=1, help="manifest input: number of shards")
    p.add_argument("--all-shards", action="store_true", help="manifest input: every shard here")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="fp32",
                   help="fp32 (default), bf16 autocast, or auto: bf16 where the device runs it "
                        "natively (CUDA with bf16, CPUs with AMX or AVX-512 BF16), else fp32")


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    model = load_model(args.ckpt, map_location=device)
    layers = args.layers if args.layers is not None else list(range(model.cfg.num_layers + 1))
    precision, why = resolve_precision(args.precision, device)
    log.info("precision %s (%s)", precision, why)
    kind = layer_kind(model, layers, device, DTYPES[precision])
    if args.input.suffix == ".tsv":
        split = args.input.stem
        shards = range(args.nshard) if args.all_shards else [args.shard]
        for shard in shards:
            dump_shard(kind, args.input, args.out, split, shard, args.nshard)
        last = shard_prefix(args.out / kind.outputs[-1], split, shards[-1], args.nshard)
        print(f"{args.out}/layer{{{','.join(map(str, layers))}}}/{split}_*_{args.nshard}.npy "
              f"written (e.g. {last}.npy)")
        return 0
    wav = read_audio(args.input)
    if num_frames(len(wav)) == 0:
        raise InputError(f"{args.input}: {len(wav)} samples are too short for one frame (400 needed)")
    states = np.stack(kind.compute(wav))
    out = args.out / f"{args.input.stem}.npy"
    with atomic_open(out, "wb") as f:
        np.save(f, states)
    print(f"{out}: layers {layers}, shape {states.shape} (layers, frames, dim)")
    return 0
