"""The diffusion U-Net shared by the GLIDE, Imagen and DALL-E 2 families.

Architecture of ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis"),
as GLIDE (Nichol et al. 2022) uses it: res blocks with adaptive GroupNorm (the timestep embedding
gives a per-channel scale and shift), BigGAN-style res blocks for resampling, multi-head
self-attention at the low resolutions with a fixed width per head, skips concatenated on the way
up with one extra res block per up level. Text conditioning follows GLIDE: each attention layer
projects the text tokens to keys and values and concatenates them with the image tokens' ones
("concat_kv"), and a pooled text vector is added to the timestep embedding. "cross" puts a separate
cross-attention layer after self-attention instead (Imagen, Saharia et al. 2022, and latent
diffusion). Per-level res block counts cover Imagen's Efficient U-Net layout.

Plain PyTorch: no Lightning, no torch.distributed. ``UNet.shard_units`` names the blocks that
trainers/ wraps for FSDP2 and activation checkpointing.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

CONTEXT_MODES = ("concat_kv", "cross")

__all__ = ["UNet", "ResBlock", "AttentionBlock", "timestep_embedding", "group_norm", "run_block", "CONTEXT_MODES"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (N, dim) of timesteps t (N,), integer or fractional; cos half first
    (ADM's order, so weights ported from it line up)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32)
                      * (-math.log(max_period) / half))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= groups that divides channels, so tiny widths
    (8, 16, 48) build; paper widths (multiples of 32) get exactly ``groups``."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels)


def _zero(module: nn.Module) -> nn.Module:
    # ADM zero-initialises the last layer of every residual branch and the output conv, so each
    # block starts as the identity and the untrained U-Net outputs zeros.
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Downsample(nn.Module):
    """Halve the resolution: a stride-2 3x3 conv (the non-BigGAN path, resblock_updown=False)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest neighbour, then a 3x3 conv (resblock_updown=False)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResBlock(nn.Module):
    """ADM res block, optionally resampling (BigGAN-style: both branches resample, the residual
    branch after its first norm + SiLU). ``emb`` is the already SiLU-activated embedding: every
    block's embedding projection starts with SiLU, so the U-Net applies it once for all."""

    def __init__(self, channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0,
                 scale_shift_norm: bool = True, groups: int = 32, up: bool = False, down: bool = False):
        super().__init__()
        if up and down:
            raise ValueError("a res block resamples up or down, not both")
        self.up, self.down, self.scale_shift_norm = up, down, scale_shift_norm
        self.norm_in = group_norm(channels, groups)
        self.conv_in = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_channels if scale_shift_norm else out_channels)
        self.norm_out = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: Tensor) -> Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv_in(self._resample(F.silu(self.norm_in(x))))
        x = self._resample(x)
        e = self.emb(emb)[..., None, None]
        if self.scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm_out(h), 1 + scale)
        else:
            h = self.norm_out(h + e)
        h = self.conv_out(self.dropout(F.silu(h)))
        return self.skip(x) + h


def _heads(t: Tensor, n: int, heads: int) -> tuple[Tensor, ...]:
    """(N, L, n*C) tokens -> n tensors (N, heads, L, C/heads) with the head dim contiguous, as
    the fused SDPA kernels want."""
    # chunk, not a view + unbind: SDPA's gradients come back token-major, so chunk's backward (one
    # cat) lands them in the linear's layout, where unbind's stack needs a second copy
    b, length = t.shape[:2]
    return tuple(part.view(b, length, heads, -1).transpose(1, 2) for part in t.chunk(n, dim=-1))


def _merge(y: Tensor, shape: torch.Size) -> Tensor:
    """(N, heads, L, d) -> (N, L, heads*d) tokens."""
    return y.transpose(1, 2).reshape(shape[0], -1, shape[1])


def _to_image(tokens: Tensor, shape: torch.Size) -> Tensor:
    # (N, L, C) -> (N, C, H, W) as a strided view: the channels-last layout the U-Net keeps
    return tokens.transpose(1, 2).view(shape)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W image tokens, with text tokens either joined to its
    keys/values ("concat_kv", GLIDE) or attended by a following cross-attention layer ("cross").
    ``ff_mult`` > 0 ends the block with a pre-LayerNorm GEGLU feed-forward of hidden width
    ``ff_mult * channels`` (Shazeer 2020, "GLU Variants Improve Transformer"), which makes it the
    transformer block of latent diffusion / Stable Diffusion (Rombach et al. 2022); 0, ADM's and
    GLIDE's block, has none.

    ``self_attention=False`` keeps only the cross-attention (Imagen's Efficient U-Net levels with
    text cross-attention only). ``context_mask`` (N, L) is True for real tokens; padding is masked
    out, image tokens never.
    """

    def __init__(self, channels: int, head_channels: int = 64, context_dim: int | None = None,
                 context_mode: str = "concat_kv", groups: int = 32, ff_mult: int = 0, self_attention: bool = True):
        super().__init__()
        if context_mode not in CONTEXT_MODES:
            raise ValueError(f"context_mode must be one of {CONTEXT_MODES}, got {context_mode!r}")
        if ff_mult < 0:
            raise ValueError(f"ff_mult must be >= 0, got {ff_mult}")
        if not self_attention and (context_dim is None or context_mode != "cross"):
            raise ValueError("an attention block without self-attention needs cross-attention (context_mode 'cross')")
        self.heads = max(1, channels // head_channels)
        if channels % self.heads:
            raise ValueError(f"{channels} channels do not split into heads of {head_channels}")
        self.norm = self.qkv = self.proj = None
        if self_attention:
            self.norm = group_norm(channels, groups)
            self.qkv = nn.Linear(channels, 3 * channels)
            self.proj = _zero(nn.Linear(channels, channels))
        self.context_kv = self.cross = None
        if context_dim is not None and context_mode == "concat_kv":
            self.context_kv = nn.Linear(context_dim, 2 * channels)
        elif context_dim is not None:
            self.cross = nn.ModuleDict({
                "norm": group_norm(channels, groups),
                "q": nn.Linear(channels, channels),
                "kv": nn.Linear(context_dim, 2 * channels),
                "proj": _zero(nn.Linear(channels, channels)),
            })
        self.ff = None
        if ff_mult > 0:
            self.ff = nn.ModuleDict({
                "norm": nn.LayerNorm(channels),
                "proj": nn.Linear(channels, 2 * ff_mult * channels),  # value and gate halves
                "out": _zero(nn.Linear(ff_mult * channels, channels)),
            })

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        if self.qkv is not None:
            x = self._self_attention(x, context, context_mask)
        if self.cross is not None and context is not None:
            x = self._cross_attention(x, context, context_mask)
        if self.ff is not None:
            shape = x.shape
            h, gate = self.ff["proj"](self.ff["norm"](x.flatten(2).transpose(1, 2))).chunk(2, dim=-1)
            x = x + _to_image(self.ff["out"](h * F.gelu(gate)), shape)
        return x

    def _self_attention(self, x: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        shape = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = _heads(self.qkv(tokens), 3, self.heads)
        mask = None
        if self.context_kv is not None and context is not None:
            kc, vc = _heads(self.context_kv(context), 2, self.heads)
            k, v = torch.cat([kc, k], dim=2), torch.cat([vc, v], dim=2)
            if context_mask is not None:
                mask = F.pad(context_mask.bool(), (0, q.shape[2]), value=True)[:, None, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + _to_image(self.proj(_merge(y, shape)), shape)

    def _cross_attention(self, x: Tensor, context: Tensor, context_mask: Tensor | None) -> Tensor:
        shape = x.shape
        tokens = self.cross["norm"](x).flatten(2).transpose(1, 2)
        (q,) = _heads(self.cross["q"](tokens), 1, self.heads)
        k, v = _heads(self.cross["kv"](context), 2, self.heads)
        keep = mask = None
        if context_mask is not None:
            # a sample with no real token would give a softmax over nothing (NaN): let it attend
            # to its padding and drop the result instead
            keep = context_mask.bool().any(dim=1)
            mask = (context_mask.bool() | ~keep[:, None])[:, None, None]
        y = self.cross["proj"](_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), shape))
        if keep is not None:
            y = y * keep[:, None, None].to(y.dtype)
        return x + _to_image(y, shape)


def run_block(block: nn.Module, h: Tensor, emb: Tensor, context: Tensor | None, context_mask: Tensor | None,
              checkpoint: bool = False) -> Tensor:
    """One U-Net block on the inputs its kind takes (a res block the embedding, an attention block
    the text, a resampler neither), under activation checkpointing when asked and gradients are on."""
    if isinstance(block, ResBlock):
        args = (h, emb)
    elif isinstance(block, AttentionBlock):
        args = (h, context, context_mask)
    else:
        args = (h,)
    if checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class _Stage(nn.ModuleList):
    """Blocks that run in sequence between two skip connections (ADM's TimestepEmbedSequential)."""


class UNet(nn.Module):
    """ADM U-Net: x (N, in_channels, H, W), timesteps t (N,) -> (N, out_channels, H, W).

    ``attention_levels`` index ``channel_mult`` (level i works at resolution H / 2**i); the
    middle block always attends. Sizes not divisible by 2**(levels - 1) are zero-padded on the
    bottom/right and the output cropped back. ``context_dim``, ``pooled_dim`` and ``num_classes``
    add the token, pooled-vector and class conditionings; a conditioning left as None in
    ``forward`` is skipped (the unconditional path of classifier-free guidance passes its own
    null inputs instead, as GLIDE does with empty captions). ``ff_mult`` > 0 gives every attention
    block a GEGLU feed-forward (latent diffusion's transformer block; see ``AttentionBlock``).

    Activations are channels-last in memory from the input convolution on (the output too; the
    values are the same either way): the CPU's convolution kernels run faster on them than on NCHW
    (here up to 3x forward), GPUs' tensor-core convolutions want them, and attention's (N, H*W, C)
    tokens are then a view of the image rather than a transposed copy.
    """

    shard_units = (ResBlock, AttentionBlock)

    def __init__(self, in_channels: int = 3, out_channels: int = 3, channels: int = 64,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), num_res_blocks: int | Sequence[int] = 2,
                 attention_levels: Sequence[int] = (1, 2, 3), head_channels: int = 64,
                 dropout: float = 0.0, context_dim: int | None = None, context_mode: str = "concat_kv",
                 pooled_dim: int | None = None, num_classes: int | None = None,
                 scale_shift_norm: bool = True, resblock_updown: bool = True, groups: int = 32,
                 time_embed_mult: int = 4, checkpoint: bool = False, ff_mult: int = 0):
        super().__init__()
        levels = len(channel_mult)
        if levels < 1:
            raise ValueError("channel_mult needs at least one level")
        blocks = [num_res_blocks] * levels if isinstance(num_res_blocks, int) else list(num_res_blocks)
        if len(blocks) != levels:
            raise ValueError(f"num_res_blocks has {len(blocks)} entries for {levels} levels")
        if any(not 0 <= a < levels for a in attention_levels):
            raise ValueError(f"attention_levels {tuple(attention_levels)} outside 0..{levels - 1}")
        if context_mode not in CONTEXT_MODES:
            raise ValueError(f"context_mode must be one of {CONTEXT_MODES}, got {context_mode!r}")
        self.channels, self.levels, self.checkpoint = channels, levels, checkpoint
        emb_dim = time_embed_mult * channels

        self.time_embed = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes, emb_dim) if num_classes is not None else None
        self.pooled_proj = nn.Linear(pooled_dim, emb_dim) if pooled_dim is not None else None

        def res(cin: int, cout: int, **updown) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, scale_shift_norm, groups, **updown)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, head_channels, context_dim, context_mode, groups, ff_mult)

        ch = channel_mult[0] * channels
        self.input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)
        skips = [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(blocks[level]):
                stage = _Stage([res(ch, mult * channels)])
                ch = mult * channels
                if level in attention_levels:
                    stage.append(attn(ch))
                self.down.append(stage)
                skips.append(ch)
            if level != levels - 1:
                self.down.append(_Stage([res(ch, ch, down=True) if resblock_updown else Downsample(ch)]))
                skips.append(ch)

        self.middle = _Stage([res(ch, ch), attn(ch), res(ch, ch)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(blocks[level] + 1):
                stage = _Stage([res(ch + skips.pop(), mult * channels)])
                ch = mult * channels
                if level in attention_levels:
                    stage.append(attn(ch))
                if level and i == blocks[level]:
                    stage.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch))
                self.up.append(stage)

        self.out = nn.Sequential(group_norm(ch, groups), nn.SiLU(),
                                 _zero(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def _block(self, block: nn.Module, h: Tensor, emb: Tensor, context: Tensor | None,
               context_mask: Tensor | None) -> Tensor:
        return run_block(block, h, emb, context, context_mask, self.checkpoint)

    def _stage(self, stage: _Stage, h: Tensor, *cond) -> Tensor:
        for block in stage:
            h = self._block(block, h, *cond)
        return h

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None,
                context_mask: Tensor | None = None, pooled: Tensor | None = None,
                y: Tensor | None = None) -> Tensor:
        height, width = x.shape[-2:]
        m = 2 ** (self.levels - 1)
        pad_h, pad_w = -height % m, -width % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        if t.ndim == 0:
            t = t.expand(x.shape[0])

        lin = self.time_embed[0]
        emb = self.time_embed(timestep_embedding(t, self.channels).to(lin.weight.dtype))
        if self.class_embed is not None and y is not None:
            emb = emb + self.class_embed(y)
        if self.pooled_proj is not None and pooled is not None:
            emb = emb + self.pooled_proj(pooled)
        cond = (F.silu(emb), context, context_mask)

        # channels-last from here on: convolutions, norms, resampling and concatenation keep it
        h = self.input_conv(x).contiguous(memory_format=torch.channels_last)
        skips = [h]
        for stage in self.down:
            h = self._stage(stage, h, *cond)
            skips.append(h)
        h = self._stage(self.middle, h, *cond)
        for stage in self.up:
            h = self._stage(stage, torch.cat([h, skips.pop()], dim=1), *cond)
        out = self.out(h)
        return out[..., :height, :width] if pad_h or pad_w else out
