"""GLIDE (Nichol et al. 2022, "GLIDE: Towards Photorealistic Image Generation and Editing with
Text-Guided Diffusion Models"): a transformer text encoder of its own, whose output conditions an
ADM U-Net twice: the final token's embedding is added to the timestep embedding (where ADM puts
its class embedding), and the last layer's token sequence is projected into every attention
layer's keys and values ("concat_kv" in `kiln.modules.blocks.unet`).

Two such networks make the model: the base one at 64 px and a text-conditional upsampler to
256 px, whose U-Net also sees the low-resolution image (upsampled, as 3 extra input channels).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kiln.modules.blocks.transformer import Block, Transformer
from kiln.modules.blocks.unet import UNet
from kiln.modules.blocks.tokenizer import PAD


@dataclass
class TextConfig:
    """The text transformer. The paper: 24 blocks of width 2048 (base), width 1024 (upsampler),
    a 50,257-token BPE vocabulary and 128 positions. kiln tokenizes bytes (259 ids, which a
    larger vocabulary table accepts unchanged)."""

    vocab_size: int = 259
    context_length: int = 32
    width: int = 128
    layers: int = 2
    heads: int = 4


class TextEncoder(nn.Module):
    """Token ids (N, L) -> (tokens (N, L, width), pooled (N, width), mask (N, L)).

    Attention is causal, so padding after the end token never reaches a real token and the
    end token's embedding, the pooled vector, has read the whole caption."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads)
        self.ln_final = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        x = self.ln_final(self.transformer(x, causal=True))
        mask = tokens != PAD
        last = mask.sum(1).clamp_min(1) - 1  # the end token: the last real one
        pooled = x[torch.arange(len(x), device=x.device), last]
        return x, pooled, mask


class GLIDENet(nn.Module):
    """Text encoder + U-Net: (x_t, t, tokens[, low_res]) -> the U-Net's output.

    `low_res` (upsampler only) is the conditioning image already at the output size."""

    shard_units = (Block, *UNet.shard_units)

    def __init__(self, text: TextConfig, unet: dict, upsampler: bool = False):
        super().__init__()
        self.upsampler = upsampler
        self.text = TextEncoder(text)
        self.unet = UNet(**{**unet, "context_dim": text.width, "pooled_dim": text.width})

    def forward(self, x: Tensor, t: Tensor, tokens: Tensor, low_res: Tensor | None = None) -> Tensor:
        context, pooled, mask = self.text(tokens)
        if self.upsampler:
            if low_res is None:
                raise ValueError("the GLIDE upsampler needs the low-resolution image")
            x = torch.cat([x, low_res.to(x.dtype)], dim=1)
        return self.unet(x, t, context=context, context_mask=mask, pooled=pooled)
