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


# The sums one rank keeps (`translation_sums`), added over ranks before `translation_results`.
SUMS = ("images", "l1", "l1_identity", "l1_nearest", "variance", "variance_target", "b2a/l1", "b2a/l1_identity",
        "cycle_a", "cycle_b")


def _l1(x: Tensor, y: Tensor) -> Tensor:
    """Per-image mean |x - y| of images in [-1, 1], on the [0, 1] scale, summed over the batch."""
    return (x.double() - y.double()).abs().mean(dim=(1, 2, 3)).sum() / 2


def translation_sums(translate, inputs: Tensor, targets: Tensor, seeds: list[int], both_ways: bool,
                     bank: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """One batch of held-out pairs (images in [-1, 1]) through `translate(images, mode, seeds)`:
    the sums of `SUMS` (float64) and the a -> b outputs (for FID on the target domain).

    `variance` is each output's own pixel variance (a collapsed translator draws flat or identical
    images), beside the targets'; with `both_ways`, b -> a is scored too and the cycle errors
    |G_ba(G_ab(a)) - a| and |G_ab(G_ba(b)) - b| are kept."""
    out = translate(inputs, "a2b", seeds)
    sums = dict.fromkeys(SUMS, torch.zeros((), dtype=torch.float64))
    sums |= {"images": torch.tensor(float(len(inputs)), dtype=torch.float64), "l1": _l1(out, targets),
             "l1_identity": _l1(inputs, targets),
             "variance": out.double().flatten(1).var(1).sum() / 4, "variance_target": targets.double().flatten(1).var(1).sum() / 4}
    if bank is not None:
        sums["l1_nearest"] = _l1(nearest_targets(inputs.cpu(), *bank).to(targets.device), targets)
    if both_ways:
        back = translate(targets, "b2a", seeds)
        sums |= {"b2a/l1": _l1(back, inputs), "b2a/l1_identity": _l1(targets, inputs),
                 "cycle_a": _l1(translate(out, "b2a", seeds), inputs), "cycle_b": _l1(translate(back, "a2b", seeds), targets)}
    return torch.stack([sums[k].cpu() for k in SUMS]), out


def translation_results(sums: Tensor, nearest: bool, both_ways: bool) -> dict[str, float]:
    """Means from the sums of every rank (`translation_sums`); `variance_ratio` is the outputs'
    per-image variance over the targets' (near 0: collapse to flat images)."""
    mean = {k: (v / sums[0]).item() for k, v in zip(SUMS[1:], sums[1:])}
    out = {"l1": mean["l1"], "l1_identity": mean["l1_identity"], "l1_ratio": mean["l1"] / mean["l1_identity"],
           "variance_ratio": mean["variance"] / mean["variance_target"]}
    if nearest:
        out |= {"l1_nearest": mean["l1_nearest"], "l1_nearest_ratio": mean["l1_nearest"] / mean["l1_identity"]}
    if both_ways:
        out |= {k: mean[k] for k in ("b2a/l1", "b2a/l1_identity", "cycle_a", "cycle_b")}
    return out
