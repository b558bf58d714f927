"""CLIP: Learning Transferable Visual Models From Natural Language Supervision (Radford et al. 2021).

A ViT image tower and a causal transformer text tower, each projected (no bias) into a shared
embedding space, and a learned temperature. Layout and initialisation follow the paper's
released models, so the named sizes reproduce their parameter counts (docs/paper-sizes.md).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kiln.modules.blocks.transformer import Block, Transformer
from kiln.modules.blocks.tokenizer import EOT, VOCAB_SIZE


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = VOCAB_SIZE
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    # Captions run in this many groups of similar length (exact; a speed knob, see TextTransformer).
    length_buckets: int = 1


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    init_logit_scale: float = math.log(1 / 0.07)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        d = dict(d)
        return cls(vision=VisionConfig(**d.pop("vision")), text=TextConfig(**d.pop("text")), **d)


def _init_transformer(t: Transformer, width: int) -> None:
    # CLIP's scheme: residual-branch outputs shrink with depth so deep towers start near identity.
    layers = len(t.blocks)
    attn_std, proj_std, fc_std = width**-0.5, width**-0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
    for block in t.blocks:
        nn.init.normal_(block.attn.qkv.weight, std=attn_std)
        nn.init.normal_(block.attn.proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.proj.weight, std=proj_std)
        for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
            nn.init.zeros_(lin.bias)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        grid = cfg.image_size // cfg.patch_size
        scale = cfg.width**-0.5
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio)
        self.ln_post = nn.LayerNorm(cfg.width)
        self.proj = nn.Parameter(scale * torch.randn(cfg.width, embed_dim))
        _init_transformer(self.transformer, cfg.width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        self.length_buckets = cfg.length_buckets
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.projection, std=cfg.width**-0.5)
        _init_transformer(self.transformer, cfg.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Pool at the end-of-text token: under the causal mask it is the one that sees the whole caption.
        eot = (tokens == EOT).int().argmax(dim=1)
        if self.length_buckets <= 1 or tokens.shape[0] < 2 * self.length_buckets:
            return self._encode(tokens, eot)
        # Padding after a caption's EOT cannot reach it, so captions may run in groups of similar
        # length, each cut at its own longest: exact, and far cheaper for short captions.
        order = eot.argsort()
        parts = [self._encode(tokens[idx], eot[idx]) for idx in order.chunk(self.length_buckets)]
        return torch.cat(parts)[order.argsort()]

    def _encode(self, tokens: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        # On the meta device (`kiln plan`) lengths are unknown: plan for full-length captions.
        n = tokens.shape[1] if tokens.is_meta else int(eot.max()) + 1
        x = self.token_embedding(tokens[:, :n]) + self.positional_embedding[:n]
        x = self.ln_final(self.transformer(x, causal=True))
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.projection


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim)
        self.text = TextTransformer(cfg.text, cfg.embed_dim)
        # Shape (1,), not a scalar: FSDP2 shards along dim 0.
        self.logit_scale = nn.Parameter(torch.full((1,), cfg.init_logit_scale))

    # Declared for trainers/: the repeated units that FSDP shards and checkpointing wraps.
    shard_units = (Block,)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = self.visual(images)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = self.text(tokens)
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        # A fresh scalar, not a view of the parameter (FSDP2 hooks need outputs that are not views).
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp().sum()
