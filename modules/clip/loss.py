"""CLIP's symmetric InfoNCE loss over a global batch that is spread across ranks.

Each rank scores its own images against every rank's texts (and its texts against every
rank's images), with the features of all ranks gathered *with* gradient. The mean of the
per-rank losses is then exactly the loss of one process holding the whole batch, and so are
the gradients once data parallelism averages them: the cross terms that a gradient-free
gather would drop reach the rank that produced each feature through the gather's backward.
The gather itself is passed in, so this file stays free of torch.distributed.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Gather = Callable[[torch.Tensor], torch.Tensor]


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    gather: Gather | None = None,
    rank: int = 0,
) -> torch.Tensor:
    """Symmetric cross-entropy of the local rows against the global batch.

    `gather` maps a local (B, D) tensor to the (world * B, D) concatenation over ranks, in rank
    order, differentiably; None means a single process.
    """
    all_images = gather(image_features) if gather else image_features
    all_texts = gather(text_features) if gather else text_features
    logits_per_image = logit_scale * image_features @ all_texts.T
    logits_per_text = logit_scale * text_features @ all_images.T
    b = image_features.shape[0]
    labels = torch.arange(rank * b, (rank + 1) * b, device=image_features.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
