"""Foreign checkpoints -> this project's format: `mt4ssl convert {fairseq,hf} SRC OUT`.

fairseq pretraining checkpoints of data2vec-audio (`data2vec_audio`), HuBERT (`hubert`) and
the official MT4SSL code (`multi2vec`): the encoder's parameter names are fairseq's here, so
the map is short: `final_proj` (regression head) -> `targets.teacher.head`,
`final_proj_hubert` (MT4SSL classifier, sized by a fairseq dictionary with 4 special symbols
first) -> `targets.kmeans.heads.<name>` without those 4 rows, `_ema` (EMA teacher) ->
`targets.teacher.ema`. HuBERT's cosine-similarity head (`final_proj`, `label_embs_concat`)
has no counterpart and is left out. A fairseq checkpoint is a pickle: loading it runs code
from the file, so it is only done with `--trust-pickle`.

Hugging Face `Data2VecAudioModel` / `HubertModel` weights (a local `save_pretrained` folder):
Use: `cfg = config_from_hf(hf_model.config)`, `model = MT4SSL(cfg)`,
`model.load_state_dict(state_dict_from_hf(hf_model.state_dict()), strict=False)` (strict
except for the `targets.*` heads, which Hugging Face base models do not have).

Only post-LN encoders are supported (HuBERT `do_stable_layer_norm=False`, data2vec-audio).
Hidden states line up one to one: Hugging Face's `hidden_states[0]` is the input of layer 0
(after pos conv, encoder LayerNorm and dropout), `hidden_states[i]` the output of layer i,
exactly like `MT4SSL.extract_features`.
"""

from __future__ import annotations

import argparse
import ast
import pickle
import re
from pathlib import Path

import torch

from mt4ssl.errors import InputError
from mt4ssl.models.mt4ssl import MT4SSL, ModelConfig
from mt4ssl.targets import KMeansConfig, TeacherConfig

_LAYER_RENAMES = {
    "attention.q_proj": "self_attn.q_proj",
    "attention.k_proj": "self_attn.k_proj",
    "attention.v_proj": "self_attn.v_proj",
    "attention.out_proj": "self_attn.out_proj",
    "layer_norm": "self_attn_layer_norm",
    "feed_forward.intermediate_dense": "fc1",
    "feed_forward.output_dense": "fc2",
    "final_layer_norm": "final_layer_norm",
}


def config_from_hf(hf_config, **overrides) -> ModelConfig:
    """ModelConfig for a Hugging Face data2vec-audio or HuBERT config (no targets)."""
    kind = hf_config.model_type
    if kind not in ("data2vec-audio", "hubert"):
        raise InputError(f"model_type {kind!r}: only 'data2vec-audio' and 'hubert' convert")
    if getattr(hf_config, "do_stable_layer_norm", False):
        raise InputError("pre-LN (do_stable_layer_norm=True) encoders are not supported")
    if kind == "hubert" and not hf_config.feat_proj_layer_norm:
        raise InputError("HuBERT configs without feat_proj_layer_norm are not supported")
    if kind == "data2vec-audio":
        pos = dict(
            pos_conv_depth=hf_config.num_conv_pos_embeddings, pos_conv_kernel=hf_config.conv_pos_kernel_size
        )
        mode = "layer_norm"
    else:
        pos = dict(pos_conv_depth=1, pos_conv_kernel=hf_config.num_conv_pos_embeddings)
        mode = "layer_norm" if hf_config.feat_extract_norm == "layer" else "default"
    fields = dict(
        conv_layers=tuple(zip(hf_config.conv_dim, hf_config.conv_kernel, hf_config.conv_stride, strict=True)),
        extractor_mode=mode,
        conv_bias=hf_config.conv_bias,
        embed_dim=hf_config.hidden_size,
        ffn_dim=hf_config.intermediate_size,
        num_heads=hf_config.num_attention_heads,
        num_layers=hf_config.num_hidden_layers,
        pos_conv_groups=hf_config.num_conv_pos_embedding_groups,
        targets=(),
        **pos,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def rename_hf_key(key: str, extractor_mode: str) -> str | None:
    """This project's name of a Hugging Face base-model parameter (prefix removed), or None.
    The one name table between the two formats: `mt4ssl export hf` uses it backwards."""
    m = re.fullmatch(r"feature_extractor\.conv_layers\.(\d+)\.(conv|layer_norm)\.(weight|bias)", key)
    if m:
        i, part, p = m.groups()
        if part == "conv":
            return f"feature_extractor.conv_layers.{i}.0.{p}"
        norm = "2.1" if extractor_mode == "layer_norm" else "2"
        return f"feature_extractor.conv_layers.{i}.{norm}.{p}"
    m = re.fullmatch(r"feature_projection\.(layer_norm|projection)\.(weight|bias)", key)
    if m:
        return ("layer_norm." if m.group(1) == "layer_norm" else "post_extract_proj.") + m.group(2)
    if key == "masked_spec_embed":
        return "mask_emb"
    m = re.fullmatch(r"encoder\.pos_conv_embed\.layers\.(\d+)\.conv\.(weight|bias)", key)
    if m:  # data2vec: stacked convs
        return f"encoder.pos_conv.{m.group(1)}.0.{m.group(2)}"
    pos_conv = {
        "encoder.pos_conv_embed.conv.parametrizations.weight.original0": "encoder.pos_conv.0.weight_g",
        "encoder.pos_conv_embed.conv.parametrizations.weight.original1": "encoder.pos_conv.0.weight_v",
        "encoder.pos_conv_embed.conv.weight_g": "encoder.pos_conv.0.weight_g",
        "encoder.pos_conv_embed.conv.weight_v": "encoder.pos_conv.0.weight_v",
        "encoder.pos_conv_embed.conv.bias": "encoder.pos_conv.0.bias",
    }
    if key in pos_conv:
        return pos_conv[key]
    if key.startswith("encoder.layer_norm."):
        return key
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m and m.group(2) in _LAYER_RENAMES:
        return f"encoder.layers.{m.group(1)}.{_LAYER_RENAMES[m.group(2)]}.{m.group(3)}"
    return None


def state_dict_from_hf(
    hf_state: dict[str, torch.Tensor], extractor_mode: str = "layer_norm"
) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face base-model state dict (optionally prefixed `data2vec_audio.` or
    `hubert.`) to this project's (= fairseq's) names. Unknown keys are an error."""
    out, unknown = {}, []
    for key, value in hf_state.items():
        bare = re.sub(r"^(data2vec_audio|hubert)\.", "", key)
        new = rename_hf_key(bare, extractor_mode)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise InputError(f"Hugging Face keys with no counterpart here: {unknown}")
    return out


# ---------------------------------------------------------------------------- fairseq

FAIRSEQ_MODELS = ("data2vec_audio", "hubert", "multi2vec")
FAIRSEQ_SPECIAL_SYMBOLS = 4  # <s> <pad> </s> <unk> come first in a fairseq Dictionary


def _literal_expr(text: str):
    """Evaluate fairseq's `conv_feature_layers` ("[(512, 10, 5)] + [(512, 3, 2)] * 4 + ...")
    without `eval`: literals, `+` and `*` only."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = ev(node.left), ev(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        raise InputError(f"conv_feature_layers {text!r}: only literals, + and * are allowed")

    return ev(ast.parse(text, mode="eval"))


def fairseq_config(ckpt: dict) -> tuple[dict, dict]:
    """(model config, task config) of a fairseq checkpoint as plain dicts (interpolations
    such as `${optimization.max_update}` resolved)."""
    if ckpt.get("cfg") is not None:
        cfg = ckpt["cfg"]
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:
            pass
        return dict(cfg["model"]), dict(cfg.get("task") or {})
    if ckpt.get("args") is not None:  # fairseq < 0.10: an argparse.Namespace
        args = vars(ckpt["args"])
        return {"_name": args.get("arch"), **args}, args
    raise InputError("no 'cfg' or 'args' in the checkpoint: not a fairseq checkpoint")


def config_from_fairseq(model: dict, task: dict, kmeans_classes: int | None = None,
                        label_name: str = "km") -> ModelConfig:
    """ModelConfig of a fairseq data2vec_audio / hubert / multi2vec model config."""
    name = model.get("_name")
    if name not in FAIRSEQ_MODELS:
        raise InputError(f"model {name!r}: only {FAIRSEQ_MODELS} convert")
    if model.get("layer_norm_first"):
        raise InputError("pre-LN encoders (layer_norm_first=True, e.g. Large 'lv60') are not supported")
    unsupported = [k for k in ("layer_norm_target_layer", "batch_norm_target_layer", "group_norm_target_layer",
                               "instance_norm_targets", "layer_norm_targets") if model.get(k)]
    if name != "hubert" and (unsupported or not model.get("instance_norm_target_layer", True)):
        raise InputError(f"teacher target normalisation {unsupported or 'none'}: only "
                         "instance_norm_target_layer=True is implemented")
    depth = int(model.get("pos_conv_depth", 1))
    conv_pos = int(model.get("conv_pos", 128))
    targets, kmeans, teacher = [], KMeansConfig(), TeacherConfig()
    if name == "data2vec_audio" or (name == "multi2vec" and model.get("mse_loss", True)):
        targets.append("teacher")
        teacher = TeacherConfig(top_k=int(model.get("average_top_k_layers", 8)),
                                ema_decay=float(model.get("ema_decay", 0.999)),
                                ema_end_decay=float(model.get("ema_end_decay", 0.9999)),
                                ema_anneal_updates=int(model.get("ema_anneal_end_step", 30000)),
                                loss_scale=model.get("loss_scale"))
    if name == "multi2vec" and model.get("ce_loss", True) and kmeans_classes:
        targets.insert(0, "kmeans")
        kmeans = KMeansConfig(labels=(label_name,), num_classes=(kmeans_classes,))
    return ModelConfig(
        conv_layers=tuple(tuple(int(v) for v in layer) for layer in
                          _literal_expr(model.get("conv_feature_layers",
                                                  "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"))),
        extractor_mode=model.get("extractor_mode", "default"),
        conv_bias=bool(model.get("conv_bias", False)),
        normalize=bool(task.get("normalize", name != "hubert")),
        embed_dim=int(model.get("encoder_embed_dim", 768)),
        ffn_dim=int(model.get("encoder_ffn_embed_dim", 3072)),
        num_heads=int(model.get("encoder_attention_heads", 12)),
        num_layers=int(model.get("encoder_layers", 12)),
        dropout=float(model.get("dropout", 0.1)),
        attention_dropout=float(model.get("attention_dropout", 0.1)),
        activation_dropout=float(model.get("activation_dropout", 0.0)),
        layerdrop=float(model.get("encoder_layerdrop", 0.05)),
        dropout_input=float(model.get("dropout_input", 0.0)),
        pos_conv_depth=depth,
        pos_conv_kernel=conv_pos if depth == 1 else max(3, conv_pos // depth),
        pos_conv_groups=int(model.get("conv_pos_groups", 16)),
        mask_prob=float(model.get("mask_prob", 0.65)),
        mask_length=int(model.get("mask_length", 10)),
        require_same_masks=bool(model.get("require_same_masks", True)),
        mask_channel_prob=float(model.get("mask_channel_prob", 0.0)),
        mask_channel_length=int(model.get("mask_channel_length", 64)),
        targets=tuple(targets),
        kmeans=kmeans,
        teacher=teacher,
    )


def convert_fairseq(ckpt: dict, label_name: str = "km") -> tuple[MT4SSL, list[str], list[str]]:
    """A fairseq checkpoint dict -> (our model, mapped fairseq keys, left-out fairseq keys)."""
    model_cfg, task_cfg = fairseq_config(ckpt)
    state = ckpt.get("model")
    if not isinstance(state, dict):
        raise InputError("no 'model' state dict in the checkpoint")
    name = model_cfg["_name"]
    head = state.get("final_proj_hubert.weight")
    n_classes = head.shape[0] - FAIRSEQ_SPECIAL_SYMBOLS if head is not None and name == "multi2vec" else None
    model = MT4SSL(config_from_fairseq(model_cfg, task_cfg, n_classes, label_name))
    ours = model.state_dict()

    renamed, mapped, left_out = {}, [], []
    for key, value in state.items():
        if key == "_ema" and "teacher" in model.targets:
            for sub, v in value.items():
                renamed[f"targets.teacher.ema.{sub}"] = v
            mapped.append("_ema.*")
            continue
        new = key.replace(".parametrizations.weight.original0", ".weight_g").replace(
            ".parametrizations.weight.original1", ".weight_v")
        if key.startswith("final_proj_hubert.") and "kmeans" in model.targets:
            new = key.replace("final_proj_hubert.", f"targets.kmeans.heads.{label_name}.")
            value = value[FAIRSEQ_SPECIAL_SYMBOLS:]
        elif key.startswith("final_proj.") and name != "hubert" and "teacher" in model.targets:
            new = key.replace("final_proj.", "targets.teacher.head.")
        if new in ours and ours[new].shape == value.shape:
            renamed[new] = value
            mapped.append(key)
        else:
            left_out.append(key)
    missing = [k for k in ours if k not in renamed and not k.startswith("targets.teacher.ema.")]
    if missing:
        raise InputError(f"the checkpoint lacks weights this model needs: {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")
    model.load_state_dict(renamed, strict=False)
    if "teacher" in model.targets and not any(k.startswith("targets.teacher.ema.") for k in renamed):
        model.targets["teacher"].reset(model.encoder)  # no EMA saved: start it from the student
        left_out.append("(no _ema in the checkpoint: teacher initialised from the student)")
    return model, mapped, left_out


def load_fairseq_checkpoint(path: Path, trust_pickle: bool) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        if not trust_pickle:
            raise InputError(
                f"{path}: this fairseq checkpoint is a pickle that runs code when loaded; if you "
                "trust the file, rerun with --trust-pickle") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise InputError(f"{path}: cannot load ({str(e).splitlines()[0]})") from None


def convert_hf(folder: Path) -> MT4SSL:
    """A local Hugging Face `save_pretrained` folder of a data2vec-audio / HuBERT model."""
    from transformers import AutoConfig, AutoModel

    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: no config.json (expected a save_pretrained folder)")
    try:
        hf = AutoModel.from_pretrained(folder, local_files_only=True)
    except pickle.UnpicklingError:
        raise InputError(f"{folder}: its weights are a pickle that would run code when loaded "
                         f"(refused: only weights_only loading); convert them to safetensors where they "
                         f"were made") from None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"{folder}: transformers cannot load it: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    model = MT4SSL(config_from_hf(AutoConfig.from_pretrained(folder, local_files_only=True)))
    model.load_state_dict(state_dict_from_hf(hf.state_dict(), model.cfg.extractor_mode), strict=True)
    return model


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", choices=("fairseq", "hf"), help="checkpoint kind")
    p.add_argument("src", type=Path, help="fairseq checkpoint file, or Hugging Face folder")
    p.add_argument("out", type=Path, help="mt4ssl checkpoint to write")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled fairseq checkpoint (runs code from the file)")
    p.add_argument("--label-name", default="km",
                   help="name of the k-means label set of an MT4SSL classifier (default: km)")


def run(args: argparse.Namespace) -> int:
    from mt4ssl.config import config_to_dict
    from mt4ssl.models.checkpoint import save_checkpoint

    if args.source == "fairseq":
        model, mapped, left_out = convert_fairseq(load_fairseq_checkpoint(args.src, args.trust_pickle),
                                                  args.label_name)
    else:
        model, mapped, left_out = convert_hf(args.src), ["all encoder weights"], []
    save_checkpoint(args.out, model, converted_from=str(args.src))
    cfg = model.cfg
    print(f"{args.out}: {cfg.num_layers} layers x {cfg.embed_dim}, targets {list(cfg.targets)}, "
          f"{model.num_parameters() / 1e6:.1f} M parameters (student + heads)")
    print(f"mapped {len(mapped)} weight(s)" + (f"; left out: {', '.join(left_out)}" if left_out else
                                                "; nothing left out"))
    default = config_to_dict(ModelConfig())
    changed = {k: v for k, v in config_to_dict(cfg).items() if v != default[k]}
    print(f"config (non-default fields): {changed}")
    return 0
