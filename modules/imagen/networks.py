"""Imagen's trainable network: the frozen encoder's text, normalised and projected to the width
the U-Net's attention reads (the paper applies LayerNorm to the text embeddings before its
attention and pooling layers), and the U-Net: ADM's with text cross-attention (the paper's base
stage) or the Efficient U-Net (its super-resolution stages). Plain PyTorch.
"""
from __future__ import annotations

from torch import Tensor, nn

from kiln.modules.blocks.efficient_unet import EfficientUNet
from kiln.modules.blocks.unet import UNet


class ImagenNet(nn.Module):
    """(x_t, t, text tokens, mask, pooled[, augmentation_t]) -> the U-Net's output.

    Args:
        text_dim: the frozen encoder's width.
        text_width: the width its tokens and pooled vector are projected to (None: kept).
        unet_type: "adm" or "efficient"; unet: that U-Net's arguments, text widths excluded.
    """

    def __init__(self, text_dim: int, text_width: int | None, unet_type: str, unet: dict):
        super().__init__()
        width = text_width or text_dim
        self.text_norm = nn.LayerNorm(text_dim)
        self.text_proj = nn.Linear(text_dim, width) if text_width else nn.Identity()
        text = {"context_dim": width, "pooled_dim": width}
        if unet_type == "adm":
            self.unet = UNet(**unet, **text, context_mode="cross")
        else:
            self.unet = EfficientUNet(**unet, **text)
        self.shard_units = self.unet.shard_units

    def forward(self, x: Tensor, t: Tensor, context: Tensor, context_mask: Tensor, pooled: Tensor,
                augmentation_t: Tensor | None = None) -> Tensor:
        context = self.text_proj(self.text_norm(context))
        pooled = self.text_proj(self.text_norm(pooled))
        extra = {"augmentation_t": augmentation_t} if augmentation_t is not None else {}
        return self.unet(x, t, context=context, context_mask=context_mask, pooled=pooled, **extra)
