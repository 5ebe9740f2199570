"""Positional convolution + post-LN Transformer encoder (wav2vec 2.0 / HuBERT / data2vec).

Shapes are batch-first: x is (B, T, C); padding_mask is (B, T) with True at padding frames.

Encoder, as in the papers (fairseq `layer_norm_first=False`):

    x = x with padding frames zeroed
    x = LayerNorm(x + pos_conv(x))          # hidden_states[0] (after dropout)
    for each layer:                          # post-LN layer
        x = LN(x + Dropout(SelfAttention(x)))
        f = fc2(Dropout(GELU(fc1(x))))        # FFN output before the residual add
        x = LN(x + Dropout(f))               # hidden_states[i + 1]

The FFN output `f` of every layer is also returned: the data2vec/MT4SSL teacher builds its
targets from it. Parameter names follow fairseq's TransformerEncoder (`pos_conv`,
`layer_norm`, `layers.{i}.self_attn.{q,k,v,out}_proj`, `self_attn_layer_norm`, `fc1`, `fc2`,
`final_layer_norm`), so fairseq checkpoints load as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mt4ssl.models.cnn import TransposeLast

# ---------------------------------------------------------------------------- positional conv


class SamePad(nn.Module):
    """Drop the extra last frame an even kernel with padding k // 2 produces."""

    def __init__(self, kernel: int):
        super().__init__()
        self.remove = 1 if kernel % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : x.shape[-1] - self.remove]


class WeightNormConv1d(nn.Module):
    """Conv1d whose weight is g * v / ||v||, the norm taken over all axes but the kernel axis.

    This is torch's `weight_norm(conv, dim=2)` written out, with fairseq's parameter names
    (`weight_g` of shape (1, 1, k), `weight_v`, `bias`).
    """

    def __init__(self, dim: int, kernel: int, groups: int):
        super().__init__()
        self.padding, self.groups = kernel // 2, groups
        std = math.sqrt(4.0 / (kernel * dim))  # wav2vec 2.0's init
        v = torch.randn(dim, dim // groups, kernel) * std
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(v.norm(dim=(0, 1), keepdim=True))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.weight_v
        weight = self.weight_g * v / v.norm(dim=(0, 1), keepdim=True)
        return F.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


def positional_conv(dim: int, kernel: int, groups: int, depth: int) -> nn.Sequential:
    """The convolutional relative position embedding, (B, C, T) -> (B, C, T).

    depth 1 (wav2vec 2.0, HuBERT): weight-normed Conv1d(kernel 128, groups 16), SamePad, GELU.
        Parameters: `0.weight_g`, `0.weight_v`, `0.bias`.
    depth > 1 (data2vec): `depth` blocks of [Conv1d(kernel 19, groups 16, padding 9), SamePad,
        LayerNorm over channels without affine parameters, GELU]. Parameters: `{i}.0.weight/bias`.
    """
    if depth == 1:
        return nn.Sequential(WeightNormConv1d(dim, kernel, groups), SamePad(kernel), nn.GELU())

    def block() -> nn.Sequential:
        conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        nn.init.zeros_(conv.bias)
        return nn.Sequential(
            conv,
            SamePad(kernel),
            TransposeLast(),
            nn.LayerNorm(dim, elementwise_affine=False),
            TransposeLast(contiguous=True),
            nn.GELU(),
        )

    return nn.Sequential(*[block() for _ in range(depth)])


# ---------------------------------------------------------------------------- Transformer


class SelfAttention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention` (flash / memory-
    efficient kernels on GPU). `attn_mask` is None (no padding) or (B, 1, 1, T) bool, True =
    the key takes part."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.dropout = num_heads, dropout
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, H, T, C / H)
            return t.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class TransformerLayer(nn.Module):
    """Post-LN Transformer layer. Returns (output, FFN output before the residual add)."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
    ):
        super().__init__()
        self.dropout, self.activation_dropout = dropout, activation_dropout
        self.self_attn = SelfAttention(dim, num_heads, attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attn = F.dropout(self.self_attn(x, attn_mask), self.dropout, self.training)
        x = self.self_attn_layer_norm(x + attn)
        hidden = F.dropout(F.gelu(self.fc1(x)), self.activation_dropout, self.training)
        ffn = self.fc2(hidden)
        x = self.final_layer_norm(x + F.dropout(ffn, self.dropout, self.training))
        return x, ffn


@dataclass
class EncoderOutput:
    """x: last layer's output (B, T, C).
    hidden_states: input of layer 0 (after pos conv + LayerNorm) and the output of every layer
        run: num_layers + 1 entries, HuBERT/Hugging Face convention. A layer skipped by
        layerdrop repeats its input.
    ffn_outputs: per layer run, the FFN output before the residual add (None when skipped).
    """

    x: torch.Tensor
    hidden_states: list[torch.Tensor]
    ffn_outputs: list[torch.Tensor | None]


class TransformerEncoder(nn.Module):
    def __init__(
        self,
        dim: int = 768,
        ffn_dim: int = 3072,
        num_heads: int = 12,
        num_layers: int = 12,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        activation_dropout: float = 0.0,
        layerdrop: float = 0.05,
        pos_conv_depth: int = 5,
        pos_conv_kernel: int = 19,
        pos_conv_groups: int = 16,
    ):
        super().__init__()
        self.dropout, self.layerdrop = dropout, layerdrop
        self.exact_padding = False  # see positions()
        self.pos_conv = positional_conv(dim, pos_conv_kernel, pos_conv_groups, pos_conv_depth)
        self.layer_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            TransformerLayer(dim, ffn_dim, num_heads, dropout, attention_dropout, activation_dropout)
            for _ in range(num_layers)
        )
        for layer in self.layers:  # BERT init, as fairseq's init_bert_params
            for module in layer.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, mean=0.0, std=0.02)
                    nn.init.zeros_(module.bias)

    def positions(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """pos_conv of x (B, T, C) with its padding frames zeroed -> (B, C, T).

        As in fairseq and Hugging Face, only the input is zeroed: in the data2vec stack the
        blocks after the first read what block 1 wrote into the padding frames, so the last
        frames of a padded utterance differ from the utterance alone. With `exact_padding`
        set (the s3prl upstream does), the padding frames are zeroed before every block, so
        each utterance of a padded batch gets what it gets alone."""
        y = x.transpose(1, 2)
        if not self.exact_padding or padding_mask is None or not isinstance(self.pos_conv[0], nn.Sequential):
            return self.pos_conv(y)
        pad = padding_mask.unsqueeze(1)
        for block in self.pos_conv:
            y = block(y.masked_fill(pad, 0.0))
        return y

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        num_layers: int | None = None,
    ) -> EncoderOutput:
        """x (B, T, C); padding_mask (B, T) True = padding, or None; run only the first
        `num_layers` layers if given (for feature extraction at an intermediate layer)."""
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.positions(x, padding_mask).transpose(1, 2)
        x = self.layer_norm(x)
        x = F.dropout(x, self.dropout, self.training)

        attn_mask = None if padding_mask is None else ~padding_mask[:, None, None, :]
        hidden_states, ffn_outputs = [x], []
        compiling = torch.compiler.is_compiling()
        for layer in self.layers[:num_layers]:
            if self.training and self.layerdrop > 0 and compiling:
                # no data-dependent branch under torch.compile: the layer runs and its output
                # is kept with probability 1 - layerdrop (same model, no layerdrop saving)
                y, ffn = layer(x, attn_mask)
                x = torch.where(torch.rand((), device=x.device) < self.layerdrop, x, y)
            elif self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop:
                ffn = None
            else:
                x, ffn = layer(x, attn_mask)
            hidden_states.append(x)
            ffn_outputs.append(ffn)
        return EncoderOutput(x=x, hidden_states=hidden_states, ffn_outputs=ffn_outputs)
