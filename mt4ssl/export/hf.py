"""mt4ssl checkpoint -> Hugging Face transformers folder: `mt4ssl export hf CKPT DIR [--force]`.

    DIR/config.json                 Data2VecAudioConfig or HubertConfig
    DIR/model.safetensors           the weights, under transformers' names
    DIR/preprocessor_config.json    Wav2Vec2FeatureExtractor

    from transformers import AutoFeatureExtractor, AutoModel
    extractor, model = AutoFeatureExtractor.from_pretrained(DIR), AutoModel.from_pretrained(DIR)
    x = extractor(waveforms, sampling_rate=16000, padding=True, return_tensors="pt")
    model(**x, output_hidden_states=True).hidden_states   # == MT4SSL.extract_features

A fine-tuned CTC checkpoint (`mt4ssl finetune`, mt4ssl/finetune/model.py: encoder + `ctc` head
and letter dictionary) becomes Data2VecAudioForCTC / HubertForCTC with a Wav2Vec2Processor:

    DIR/config.json, DIR/model.safetensors   ...ForCTC (lm_head = the CTC projection)
    DIR/preprocessor_config.json             Wav2Vec2FeatureExtractor (as above)
    DIR/vocab.json, DIR/tokenizer_config.json, DIR/processor_config.json
                                             Wav2Vec2CTCTokenizer + Wav2Vec2Processor

    processor, model = AutoProcessor.from_pretrained(DIR), AutoModelForCTC.from_pretrained(DIR)
    logits = model(**processor(waveforms, sampling_rate=16000, padding=True, return_tensors="pt")).logits
    processor.batch_decode(logits.argmax(-1))   # == the project's greedy decoding

vocab.json is the project's dictionary index for index: its blank (index 0) is the tokenizer's
pad token and the model's pad_token_id (what transformers' CTC decoding drops and its CTC loss
uses as blank), `|` is the word delimiter (decoded as a space). The tokenizer has no bos, eos or
unk tokens, so its size is exactly the head's. It splits text into characters, so every symbol
but the blank must be one character (letters are).

Which class: the inverse of `mt4ssl convert hf` (models/convert.py, `config_from_hf`):
  pos_conv_depth > 1 (stacked convs + LayerNorm, data2vec) with the LayerNorm CNN
      -> Data2VecAudioModel (num_conv_pos_embeddings = depth, conv_pos_kernel_size = kernel)
  pos_conv_depth == 1 (one weight-normed conv: HuBERT, wav2vec 2.0)
      -> HubertModel (num_conv_pos_embeddings = kernel), CNN norm "group" for extractor_mode
         "default" and "layer" for "layer_norm" (HuBERT Large's CNN)
  stacked positional convs with the GroupNorm CNN: no transformers class has both, an error.
The exporter then converts the transformers config back with `config_from_hf` and requires the
same architecture, so the two directions cannot drift apart. Weights are renamed with
convert.py's table read backwards (`rename_hf_key`): one table for both directions. The
pretraining heads (`targets.*`: k-means classifiers, regression head, EMA teacher) have no
place in a transformers base model; they are left out and listed on the console.

The feature extractor: do_normalize = the checkpoint's `normalize` (zero mean, unit variance per
utterance over its valid samples, what the model does inside); return_attention_mask=True for
both geometries, because this project's encoder masks padding frames in the attention whatever
its CNN norm, so a padded batch gives the project's states only with the mask. (Hugging Face's
wav2vec2-base folders say False for the GroupNorm CNN: those models were fine-tuned in fairseq
without a padding mask. These checkpoints were not.)

Every ModelConfig field is accounted for in the tables below; a field this exporter does not
know (one added to ModelConfig after it was written) stops the export, naming the field, rather
than writing a network that may compute something else. All checks run before anything is
written; the folder is written into a temporary folder beside DIR and renamed into place.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from mt4ssl.config import config_from_dict
from mt4ssl.errors import InputError
from mt4ssl.models.checkpoint import load_checkpoint
from mt4ssl.models.cnn import SAMPLE_RATE
from mt4ssl.models.convert import config_from_hf, rename_hf_key
from mt4ssl.models.mt4ssl import ModelConfig

# model_type -> (transformers config class, encoder class)
HF_CLASSES = {
    "data2vec-audio": ("Data2VecAudioConfig", "Data2VecAudioModel"),
    "hubert": ("HubertConfig", "HubertModel"),
}
HF_CTC_CLASSES = {"data2vec-audio": "Data2VecAudioForCTC", "hubert": "HubertForCTC"}
WORD_DELIMITER = "|"  # fairseq's .ltr word boundary

# ModelConfig fields copied one to one into the transformers config (same key for both classes)
_COPIED = {
    "embed_dim": "hidden_size",
    "ffn_dim": "intermediate_size",
    "num_heads": "num_attention_heads",
    "num_layers": "num_hidden_layers",
    "conv_bias": "conv_bias",
    "pos_conv_groups": "num_conv_pos_embedding_groups",
    "dropout": "hidden_dropout",
    "attention_dropout": "attention_dropout",
    "activation_dropout": "activation_dropout",
    "layerdrop": "layerdrop",
    "dropout_input": "feat_proj_dropout",
    # masking for further training in transformers (no effect at inference)
    "mask_prob": "mask_time_prob",
    "mask_length": "mask_time_length",
    "mask_min_spans": "mask_time_min_masks",
    "mask_channel_prob": "mask_feature_prob",
    "mask_channel_length": "mask_feature_length",
}
# fields that decide the class and its geometry (see `hf_model_type`, `hf_config_kwargs`)
_GEOMETRY = ("conv_layers", "extractor_mode", "pos_conv_depth", "pos_conv_kernel")
# the feature extractor's do_normalize
_PREPROCESSOR = ("normalize",)
# fields with no effect on what the exported network computes, and why they are not carried
_NOT_CARRIED = {
    "require_same_masks": "a pretraining masking detail transformers' masking does not have",
    "targets": "pretraining heads are not part of a transformers base model",
    "kmeans": "pretraining heads are not part of a transformers base model",
    "teacher": "pretraining heads are not part of a transformers base model",
}
# architecture fields that must survive the round trip through `config_from_hf`
_ARCHITECTURE = ("conv_layers", "extractor_mode", "conv_bias", "embed_dim", "ffn_dim", "num_heads",
                 "num_layers", "pos_conv_depth", "pos_conv_kernel", "pos_conv_groups")


def _check_known_fields(cfg: ModelConfig) -> None:
    known = set(_COPIED) | set(_GEOMETRY) | set(_PREPROCESSOR) | set(_NOT_CARRIED)
    unknown = [f.name for f in dataclasses.fields(cfg) if f.name not in known]
    if unknown:
        values = ", ".join(f"{name}={getattr(cfg, name)!r}" for name in unknown)
        raise InputError(f"model_config {values}: no known transformers equivalent for this setting "
                         "(mt4ssl export hf does not know it), so the export would not compute the same")


def hf_model_type(cfg: ModelConfig) -> str:
    """The transformers model_type that computes what `cfg` computes, or an InputError."""
    if cfg.pos_conv_depth == 1:
        return "hubert"
    if cfg.extractor_mode != "layer_norm":
        raise InputError(
            f"model_config extractor_mode={cfg.extractor_mode!r} with pos_conv_depth={cfg.pos_conv_depth}: "
            "transformers has no such model (Data2VecAudioModel has the stacked positional convs but only "
            "the LayerNorm CNN, extractor_mode='layer_norm'; HubertModel has the GroupNorm CNN but one "
            "weight-normed positional conv, pos_conv_depth=1)")
    return "data2vec-audio"


def hf_config_kwargs(cfg: ModelConfig) -> tuple[str, dict]:
    """(model_type, keyword arguments of its transformers config class) for `cfg`."""
    _check_known_fields(cfg)
    kind = hf_model_type(cfg)
    kwargs = {hf_key: getattr(cfg, ours) for ours, hf_key in _COPIED.items()}
    kwargs.update(
        conv_dim=[dim for dim, _, _ in cfg.conv_layers],
        conv_kernel=[kernel for _, kernel, _ in cfg.conv_layers],
        conv_stride=[stride for _, _, stride in cfg.conv_layers],
        hidden_act="gelu",
        feat_extract_activation="gelu",
        layer_norm_eps=1e-5,
    )
    if kind == "data2vec-audio":
        kwargs.update(num_conv_pos_embeddings=cfg.pos_conv_depth, conv_pos_kernel_size=cfg.pos_conv_kernel)
    else:
        kwargs.update(num_conv_pos_embeddings=cfg.pos_conv_kernel, do_stable_layer_norm=False,
                      feat_proj_layer_norm=True, conv_pos_batch_norm=False,
                      feat_extract_norm="layer" if cfg.extractor_mode == "layer_norm" else "group")
    return kind, kwargs


def hf_config(cfg: ModelConfig, **extra):
    """The transformers config (Data2VecAudioConfig / HubertConfig) equivalent to `cfg`."""
    import transformers

    kind, kwargs = hf_config_kwargs(cfg)
    config = getattr(transformers, HF_CLASSES[kind][0])(**kwargs, **extra)
    back = config_from_hf(config)  # the importer's reading of it
    differ = [f for f in _ARCHITECTURE if getattr(back, f) != getattr(cfg, f)]
    if differ:
        raise InputError("model_config " + ", ".join(f"{f}={getattr(cfg, f)!r}" for f in differ) +
                         f": transformers' {HF_CLASSES[kind][1]} cannot express it (it would read back as " +
                         ", ".join(f"{f}={getattr(back, f)!r}" for f in differ) + ")")
    return config


def feature_extractor(cfg: ModelConfig):
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                    do_normalize=cfg.normalize, return_attention_mask=True)


def hf_state_dict(hf_model, ours: dict[str, torch.Tensor], extractor_mode: str,
                  extra: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Weights for every parameter of `hf_model` (a base model or a model with a head, whose
    base sits under `base_model_prefix`), taken from our state dict through `rename_hf_key`;
    `extra` gives the head's weights under transformers' names. Returns (state dict, our keys
    left out). A missing weight or a shape mismatch is an InputError."""
    prefix = f"{hf_model.base_model_prefix}."
    extra = extra or {}
    out, used, problems = {}, set(), []
    for key, expected in hf_model.state_dict().items():
        if key in extra:
            value = extra[key]
        else:
            bare = key[len(prefix):] if key.startswith(prefix) else key
            name = rename_hf_key(bare, extractor_mode)
            if name is None or name not in ours:
                problems.append(f"{key} (no weight {name or 'named for it'} in the checkpoint)")
                continue
            value = ours[name]
            used.add(name)
        if tuple(value.shape) != tuple(expected.shape):
            problems.append(f"{key} (shape {tuple(value.shape)}, transformers expects {tuple(expected.shape)})")
            continue
        out[key] = value.detach().to(expected.dtype)
    if problems:
        raise InputError(f"the checkpoint does not fill transformers' model: {problems[:8]}"
                         f"{' ...' if len(problems) > 8 else ''}")
    return out, [k for k in ours if k not in used]


@dataclass
class Export:
    """What goes into the folder, all built in memory before anything is written."""

    model: object  # a transformers PreTrainedModel
    extractor: object  # Wav2Vec2FeatureExtractor
    left_out: list[str]
    tokenizer: object | None = None  # Wav2Vec2CTCTokenizer of a CTC model

    def files(self) -> set[str]:
        files = {"config.json", "model.safetensors", "preprocessor_config.json"}
        return files | ({"vocab.json", "tokenizer_config.json"} if self.tokenizer is not None else set())

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder, safe_serialization=True)
        self.extractor.save_pretrained(folder)  # preprocessor_config.json, read by every version
        if self.tokenizer is not None:
            from transformers import Wav2Vec2Processor

            Wav2Vec2Processor(feature_extractor=self.extractor, tokenizer=self.tokenizer).save_pretrained(folder)


def _summarize(keys: list[str]) -> list[str]:
    """targets.kmeans.heads.km.weight, targets.kmeans.heads.km.bias, ... -> targets.kmeans.*"""
    groups: dict[str, int] = {}
    for k in keys:
        head = ".".join(k.split(".")[:2]) + ".*" if k.startswith("targets.") else k
        groups[head] = groups.get(head, 0) + 1
    return [f"{g} ({n} tensors)" if n > 1 else g for g, n in groups.items()]


def build_encoder_export(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> Export:
    import transformers

    config = hf_config(cfg)
    model = getattr(transformers, HF_CLASSES[config.model_type][1])(config).eval()
    state, left_out = hf_state_dict(model, weights, cfg.extractor_mode)
    model.load_state_dict(state, strict=True)
    return Export(model=model, extractor=feature_extractor(cfg), left_out=left_out)


def ctc_tokenizer(symbols: tuple[str, ...], where: str):
    """A Wav2Vec2CTCTokenizer whose vocabulary is `symbols` index for index (blank first)."""
    import json

    from transformers import Wav2Vec2CTCTokenizer

    bad = [s for s in symbols[1:] if len(s) != 1 or s.isspace()]
    if bad:
        raise InputError(f"{where}: dictionary symbols {bad[:8]}: Wav2Vec2CTCTokenizer reads text one character "
                         "at a time, so every symbol but the blank must be a single non-space character")
    if WORD_DELIMITER not in symbols:
        raise InputError(f"{where}: the dictionary has no word delimiter {WORD_DELIMITER!r} (a letter dictionary "
                         "has it); transformers' CTC tokenizer could not put spaces between words")
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / "vocab.json"
        vocab.write_text(json.dumps({s: i for i, s in enumerate(symbols)}, ensure_ascii=False))
        tokenizer = Wav2Vec2CTCTokenizer(str(vocab), pad_token=symbols[0], unk_token=None, bos_token=None,
                                         eos_token=None, word_delimiter_token=WORD_DELIMITER,
                                         do_lower_case=False, clean_up_tokenization_spaces=False)
    if len(tokenizer) != len(symbols) or tokenizer.pad_token_id != 0:
        raise RuntimeError(f"Wav2Vec2CTCTokenizer has {len(tokenizer)} tokens and pad id "
                           f"{tokenizer.pad_token_id}, not the dictionary's {len(symbols)} and 0")
    return tokenizer


def build_ctc_export(state: dict, where: str) -> Export:
    """Data2VecAudioForCTC / HubertForCTC + processor of a fine-tuned checkpoint."""
    import transformers

    from mt4ssl.finetune.model import ctc_from_state

    cfg = config_from_dict(ModelConfig, state["model_config"], f"{where}: model_config")
    hf_config(cfg)  # an unsupported setting is reported before the model is built
    ctc, dictionary = ctc_from_state(state, where)
    tokenizer = ctc_tokenizer(dictionary.symbols, where)
    cfg = ctc.encoder.cfg
    config = hf_config(cfg, vocab_size=len(dictionary), pad_token_id=dictionary.blank, bos_token_id=None,
                       eos_token_id=None, final_dropout=float(ctc.final_dropout.p))
    model = getattr(transformers, HF_CTC_CLASSES[config.model_type])(config).eval()
    head = {"lm_head.weight": ctc.proj.weight, "lm_head.bias": ctc.proj.bias}
    weights, left_out = hf_state_dict(model, ctc.encoder.state_dict(), cfg.extractor_mode, head)
    model.load_state_dict(weights, strict=True)
    return Export(model=model, extractor=feature_extractor(cfg), left_out=left_out, tokenizer=tokenizer)


def build_export(path: Path) -> Export:
    """The export of an mt4ssl checkpoint: a CTC model if it has a `ctc` head, else an encoder.
    A file that is not an mt4ssl model checkpoint is a clear error."""
    state = load_checkpoint(path)
    if not isinstance(state.get("model_config"), dict) or not isinstance(state.get("model"), dict):
        raise InputError(f"{path}: an mt4ssl file without 'model_config' and 'model': not a model checkpoint")
    if "ctc" in state:
        return build_ctc_export(state, str(path))
    cfg = config_from_dict(ModelConfig, state["model_config"], f"{path}: model_config")
    return build_encoder_export(cfg, state["model"])


# ---------------------------------------------------------------------------- the folder


def check_destination(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"{out}: folder exists and is not empty (use --force to replace it)")


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_folder(out: Path, export: Export, force: bool) -> None:
    """Write the folder into a temporary folder beside `out`, then rename it into place; on any
    failure `out` is as it was (absent, empty or the previous export) and the temporary is gone."""
    check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = None
    try:
        export.save(tmp)
        written = {p.name for p in tmp.iterdir()}
        needed = export.files()
        if not needed <= written:
            raise RuntimeError(f"transformers wrote {sorted(written)}, not the expected {sorted(needed)}")
        for path in [*tmp.iterdir(), tmp]:
            _fsync(path)
        if out.is_dir() and any(out.iterdir()):  # --force: set the previous export aside first
            old = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
            os.rename(out, old)
        os.replace(tmp, out)  # replaces an empty folder too
    except BaseException:
        if old is not None and not out.exists():
            os.rename(old, out)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=("hf",), help="export format: hf = a Hugging Face transformers folder")
    p.add_argument("ckpt", type=Path, help="mt4ssl checkpoint (pretrain, convert: an encoder; finetune: "
                                           "a CTC model with its processor)")
    p.add_argument("out", type=Path, help="folder to write (config.json, model.safetensors, "
                                          "preprocessor_config.json; + vocab.json and tokenizer files for CTC)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")


def run(args: argparse.Namespace) -> int:
    check_destination(args.out, args.force)
    export = build_export(args.ckpt)
    write_folder(args.out, export, args.force)
    config = export.model.config
    n_params = sum(p.numel() for p in export.model.parameters())
    print(f"{args.out}: {type(export.model).__name__} ({config.model_type}), {config.num_hidden_layers} layers x "
          f"{config.hidden_size}, {n_params / 1e6:.1f} M parameters in model.safetensors; feature extractor "
          f"do_normalize={export.extractor.do_normalize}, return_attention_mask=True")
    if export.tokenizer is not None:
        print(f"CTC head: {config.vocab_size} outputs; Wav2Vec2Processor with vocab.json (blank "
              f"{export.tokenizer.pad_token!r} = pad token id 0, word delimiter {WORD_DELIMITER!r})")
    if export.left_out:
        print(f"left out (no place in transformers' {type(export.model).__name__}): "
              f"{', '.join(_summarize(export.left_out))}")
    loader = "AutoModelForCTC" if export.tokenizer is not None else "AutoModel"
    print(f"load it with: transformers.{loader}.from_pretrained({str(args.out)!r})")
    return 0
