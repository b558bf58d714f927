"""Retrieval metrics for a family that embeds images and texts in one space (`Spec.evaluation ==
"retrieval"`, CLIP): retrieval among random candidate sets and zero-shot classification over the
whole caption vocabulary. Its validation step and `kiln eval` both score with these.

Inputs are L2-normalised embeddings whose row i of images and row i of texts describe the
same item (emoji keys, here); each caption is one class.
"""
from __future__ import annotations

import torch


def retrieval_among_candidates(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    candidates: int = 100,
    draws: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """Top-1 of both directions inside random subsets of `candidates` pairs, averaged over draws.

    text -> image: each caption of a draw picks one of the draw's images; image -> text likewise.
    Chance is 1 / candidates.
    """
    n = image_emb.shape[0]
    if n < candidates:
        raise ValueError(f"retrieval needs at least {candidates} held-out pairs, got {n}")
    sim = image_emb.float() @ text_emb.float().T  # (images, texts)
    gen = torch.Generator().manual_seed(seed)
    t2i = i2t = 0.0
    target = torch.arange(candidates)
    for _ in range(draws):
        idx = torch.randperm(n, generator=gen)[:candidates]
        sub = sim[idx][:, idx]
        i2t += (sub.argmax(dim=1) == target).float().mean().item()
        t2i += (sub.argmax(dim=0) == target).float().mean().item()
    return {
        "retrieval/top1": t2i / draws,
        "retrieval/text_to_image_top1": t2i / draws,
        "retrieval/image_to_text_top1": i2t / draws,
        "retrieval/candidates": float(candidates),
    }


def zero_shot(image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict[str, float]:
    """Classify every image among all captions (one class per caption), top-1 and top-5."""
    sim = image_emb.float() @ text_emb.float().T
    target = torch.arange(sim.shape[0]).unsqueeze(1)
    top5 = sim.topk(min(5, sim.shape[1]), dim=1).indices
    return {
        "zero_shot/top1": (top5[:, :1] == target).any(dim=1).float().mean().item(),
        "zero_shot/top5": (top5 == target).any(dim=1).float().mean().item(),
        "zero_shot/classes": float(sim.shape[1]),
    }
