"""Hugging Face `Data2VecAudioModel` / `HubertModel` weights -> this project's encoder.

Use: `cfg = config_from_hf(hf_model.config)`, `model = MT4SSL(cfg)`,
`model.load_state_dict(state_dict_from_hf(hf_model.state_dict()), strict=False)` (strict
except for the `targets.*` heads, which Hugging Face base models do not have).

Only post-LN encoders are supported (HuBERT `do_stable_layer_norm=False`, data2vec-audio).
Hidden states line up one to one: Hugging Face's `hidden_states[0]` is the input of layer 0
(after pos conv, encoder LayerNorm and dropout), `hidden_states[i]` the output of layer i,
exactly like `MT4SSL.extract_features`.
"""

from __future__ import annotations

import re

import torch

from mt4ssl.errors import InputError
from mt4ssl.models.mt4ssl import ModelConfig

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


def _rename(key: str, extractor_mode: str) -> str | None:
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
        new = _rename(bare, extractor_mode)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise InputError(f"Hugging Face keys with no counterpart here: {unknown}")
    return out
