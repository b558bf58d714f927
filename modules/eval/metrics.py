"""Distribution scores over generated vs real images, from torchmetrics with kiln's extractors.

`FidKid` accumulates features of real and generated batches on every rank; torchmetrics sums
(FID) or gathers (KID) its states across ranks at `compute`, so N ranks each scoring 1/N of the
samples give the score one rank gives on all of them.
"""
from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance


class FidKid(nn.Module):
    """FID (Heusel et al. 2017) and KID (Binkowski et al. 2018, unbiased MMD with the cubic
    polynomial kernel) in one pass over the features.

    Args:
        extractor: a feature network with `name` and `num_features` (kiln.modules.eval.extractors).
        kid_subset_size: KID is averaged over `kid_subsets` random subsets of this many samples;
            None uses every sample once (deterministic).
    """

    def __init__(self, extractor: nn.Module, kid_subsets: int = 1, kid_subset_size: int | None = None):
        super().__init__()
        self.extractor = extractor
        self.fid = FrechetInceptionDistance(feature=_Identity(extractor.num_features), reset_real_features=False)
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.kid = KernelInceptionDistance(feature=_Identity(extractor.num_features), subsets=kid_subsets,
                                           subset_size=kid_subset_size or 1, reset_real_features=False)

    @torch.no_grad()
    def update(self, images: torch.Tensor, real: bool) -> None:
        self.update_features(self.extractor(images), real)

    def update_features(self, features: torch.Tensor, real: bool) -> None:
        features = features.double()
        self.fid.update(features, real=real)
        self.kid.update(features, real=real)

    def compute(self) -> dict[str, float | str]:
        if self.kid_subset_size is None:  # every sample of every rank, once
            counts = torch.tensor([sum(len(f) for f in _as_list(self.kid.real_features)),
                                   sum(len(f) for f in _as_list(self.kid.fake_features))])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(counts)
            self.kid.subset_size = int(counts.min())
        kid, _ = self.kid.compute()
        return {"fid": float(self.fid.compute()), "kid": float(kid), "extractor": self.extractor.name}

    def reset_fake(self) -> None:
        self.fid.reset()
        self.kid.reset()


def _as_list(state) -> list[torch.Tensor]:
    return state if isinstance(state, list) else [state]


class _Identity(nn.Module):
    """torchmetrics' `feature` slot, given features already extracted (by `FidKid.extractor`)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features
