"""Imagen's Efficient U-Net (Saharia et al. 2022, "Photorealistic Text-to-Image Diffusion Models
with Deep Language Understanding", Appendix B and Figures A.28-A.30), the network of its
super-resolution stages. Against the ADM U-Net (`kiln.modules.blocks.unet.UNet`) it:

- moves parameters to the low resolutions: a res block count per level, growing downwards;
- scales the skip connections by 1/sqrt(2) (the down path's output each up level concatenates);
- resamples where it is cheap: a DBlock downsamples (a stride-2 3x3 conv) *before* its
  convolutions and a UBlock upsamples *after* them, so the res blocks of a level run at the
  level's own, lower resolution;
- attends where asked, and only as asked: per level, self-attention with text cross-attention,
  or text cross-attention alone (`cross_attention_levels`), which the 256 and 1024 px stages use.

One skip per level, from each DBlock to the UBlock of the same level; no middle block (the
lowest level's blocks are the bottleneck). Conditioning: the timestep embedding plus, when
given, a pooled text vector and the noise-augmentation level of the low-resolution input (its
own sinusoidal embedding and MLP, Imagen's noise-conditioning augmentation), applied in every res
block as a scale and shift of its second GroupNorm (ADM's res block). Plain PyTorch.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln.modules.blocks.unet import (AttentionBlock, Downsample, ResBlock, Upsample, _zero, group_norm, run_block,
                                     timestep_embedding)

__all__ = ["EfficientUNet"]

SKIP_SCALE = 2 ** -0.5


class EfficientUNet(nn.Module):
    """x (N, in_channels, H, W), timesteps t (N,) -> (N, out_channels, H, W).

    Args:
        channels, channel_mult: level i has ``channel_mult[i] * channels`` channels at H / 2**i.
        num_res_blocks: res blocks per level (an int: the same at every level), in the DBlock and
            again in the UBlock.
        attention_levels: levels with self-attention (and text cross-attention when a context is
            configured).
        cross_attention_levels: levels with text cross-attention and no self-attention.
        context_dim, pooled_dim: widths of the text tokens and the pooled text vector.
        augmentation_level: embed a second timestep, the low-resolution input's noise level.
    """

    shard_units = (ResBlock, AttentionBlock)

    def __init__(self, in_channels: int = 3, out_channels: int = 3, channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int | Sequence[int] = (2, 4, 8, 8),
                 attention_levels: Sequence[int] = (), cross_attention_levels: Sequence[int] = (3,),
                 head_channels: int = 64, dropout: float = 0.0, context_dim: int | None = None,
                 pooled_dim: int | None = None, augmentation_level: bool = False, groups: int = 32,
                 time_embed_mult: int = 4, checkpoint: bool = False):
        super().__init__()
        levels = len(channel_mult)
        blocks = [num_res_blocks] * levels if isinstance(num_res_blocks, int) else list(num_res_blocks)
        if levels < 1 or len(blocks) != levels:
            raise ValueError(f"num_res_blocks has {len(blocks)} entries for {levels} levels")
        both = set(attention_levels) & set(cross_attention_levels)
        if both:
            raise ValueError(f"levels {sorted(both)} are in both attention_levels and cross_attention_levels")
        if any(not 0 <= a < levels for a in (*attention_levels, *cross_attention_levels)):
            raise ValueError(f"attention levels outside 0..{levels - 1}")
        if cross_attention_levels and context_dim is None:
            raise ValueError("cross_attention_levels need a context_dim (the text tokens' width)")
        self.channels, self.levels, self.checkpoint = channels, levels, checkpoint
        emb_dim = time_embed_mult * channels

        def mlp() -> nn.Sequential:
            return nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.time_embed = mlp()
        self.augmentation_embed = mlp() if augmentation_level else None
        self.pooled_proj = nn.Linear(pooled_dim, emb_dim) if pooled_dim is not None else None

        def level_blocks(level: int, ch: int) -> list[nn.Module]:
            width = channel_mult[level] * channels
            out = []
            for _ in range(blocks[level]):
                out.append(ResBlock(ch, width, emb_dim, dropout, True, groups))
                ch = width
            if level in attention_levels:
                out.append(AttentionBlock(width, head_channels, context_dim, "cross", groups))
            elif level in cross_attention_levels:
                out.append(AttentionBlock(width, head_channels, context_dim, "cross", groups, self_attention=False))
            return out

        ch = channel_mult[0] * channels
        self.input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips = []
        for level in range(levels):
            stage = nn.ModuleList([Downsample(ch)] if level else [])  # resample first
            stage.extend(level_blocks(level, ch))
            ch = channel_mult[level] * channels
            self.down.append(stage)
            skips.append(ch)
        self.up = nn.ModuleList()
        for level in reversed(range(levels)):
            stage = nn.ModuleList(level_blocks(level, ch + skips.pop()))
            ch = channel_mult[level] * channels
            if level:
                stage.append(Upsample(ch))  # resample last
            self.up.append(stage)
        self.out = nn.Sequential(group_norm(ch, groups), nn.SiLU(), _zero(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def _run(self, stage: nn.ModuleList, h: Tensor, emb: Tensor, context, context_mask) -> Tensor:
        for block in stage:
            h = run_block(block, h, emb, context, context_mask, self.checkpoint)
        return h

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None,
                pooled: Tensor | None = None, augmentation_t: Tensor | None = None) -> Tensor:
        height, width = x.shape[-2:]
        m = 2 ** (self.levels - 1)
        pad_h, pad_w = -height % m, -width % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t.expand(x.shape[0]) if t.ndim == 0 else t, self.channels).to(dtype))
        if self.augmentation_embed is not None:
            if augmentation_t is None:
                raise ValueError("this U-Net is conditioned on the augmentation level: pass augmentation_t")
            emb = emb + self.augmentation_embed(timestep_embedding(augmentation_t, self.channels).to(dtype))
        if self.pooled_proj is not None and pooled is not None:
            emb = emb + self.pooled_proj(pooled)
        emb = F.silu(emb)
        h = self.input_conv(x).contiguous(memory_format=torch.channels_last)
        skips = []
        for stage in self.down:
            h = self._run(stage, h, emb, context, context_mask)
            skips.append(h)
        for stage in self.up:
            h = self._run(stage, torch.cat([h, skips.pop() * SKIP_SCALE], dim=1), emb, context, context_mask)
        out = self.out(h)
        return out[..., :height, :width] if pad_h or pad_w else out
