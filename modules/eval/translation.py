"""Scores of an image-to-image translator on held-out true pairs (issue #27): how far its output
is from the true target, beside two answers that need no learning at all.

    l1           mean |G(input) - target| per pixel and channel, images in [0, 1]
    l1_identity  the input itself as the answer: what a translator that changes nothing scores
    l1_nearest   a lookup table's answer: the training target of the training input nearest to
                 the held-out input by pixel (L2) distance. A translator that only recalls its
                 training pairs scores about this; beating it shows translation, not retrieval.

A held-out split whose designs have siblings in training (another skin tone) makes the lookup
strong; one of whole held-out designs makes it weak. Both are reported.
"""
from __future__ import annotations

import torch
from torch import Tensor


def nearest_targets(inputs: Tensor, train_inputs: Tensor, train_targets: Tensor, chunk: int = 256) -> Tensor:
    """For each of `inputs` (N, C, H, W), the target of its nearest training input by L2 pixel
    distance (ties: the first)."""
    if train_inputs.shape[1:] != inputs.shape[1:] or len(train_inputs) != len(train_targets) or not len(train_inputs):
        raise ValueError(f"nearest targets need training pairs shaped like the inputs {tuple(inputs.shape[1:])}, "
                         f"got {len(train_inputs)} inputs {tuple(train_inputs.shape[1:])} and {len(train_targets)} targets")
    bank = train_inputs.flatten(1).double()
    picks = [torch.cdist(part.flatten(1).double(), bank).argmin(1) for part in inputs.split(chunk)]
    return train_targets[torch.cat(picks)]


def translation_scores(outputs: Tensor, targets: Tensor, inputs: Tensor, train_inputs: Tensor | None = None,
                       train_targets: Tensor | None = None) -> dict[str, float]:
    """l1, l1_identity and (given the training pairs) l1_nearest, over images in [0, 1]."""
    if not outputs.shape == targets.shape == inputs.shape:
        raise ValueError(f"outputs, targets and inputs must match in shape, got {tuple(outputs.shape)}, "
                         f"{tuple(targets.shape)} and {tuple(inputs.shape)}")
    out = {"l1": (outputs.double() - targets.double()).abs().mean().item(),
           "l1_identity": (inputs.double() - targets.double()).abs().mean().item()}
    if train_inputs is not None and train_targets is not None:
        nearest = nearest_targets(inputs, train_inputs, train_targets)
        out["l1_nearest"] = (nearest.double() - targets.double()).abs().mean().item()
    return out
