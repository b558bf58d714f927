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
        extractor: a feature network with `name` and `num_features` (kiln.modules.pretrained.extractors).
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
        # torchmetrics gathers a list state (KID keeps its features in one, unreduced) one tensor
        # per list entry: ranks that updated a different number of times would pair different
        # gathers and hang or mix their samples. One tensor per rank, however many updates.
        for name in ("real_features", "fake_features"):
            parts = _as_list(getattr(self.kid, name))
            setattr(self.kid, name, [torch.cat(parts) if parts else
                                     torch.zeros(0, self.extractor.num_features, dtype=torch.float64, device=self.kid.device)])
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


def gather(features: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, in rank order, on every rank (uneven counts allowed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return features
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, features.cpu())
    return torch.cat(parts).to(features.device)


def _radii(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    out = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the row itself is at distance 0
    return torch.cat(out)


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """For each point: does some centre's k-NN ball hold it?"""
    out = []
    for i in range(0, len(points), chunk):
        out.append((torch.cdist(points[i:i + chunk], centres) <= radii[None]).any(dim=1))
    return torch.cat(out)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision is the share of
    generated samples inside the real manifold (the union of each real feature's k-NN ball),
    recall the share of real samples inside the generated one."""
    real, fake = real.double(), fake.double()
    precision = _covered(fake, real, _radii(real, k)).double().mean().item()
    recall = _covered(real, fake, _radii(fake, k)).double().mean().item()
    return {"precision": precision, "recall": recall}


def class_spread(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes present (with at least 2 samples) of the per-dimension variance of
    their features: trace(cov) / D, averaged over classes. Samples of one class that all look
    alike score near 0; truncation lowers it."""
    features = features.double()
    spreads = [features[labels == c].var(dim=0).mean() for c in labels.unique() if (labels == c).sum() >= 2]
    if not spreads:
        raise ValueError("class spread needs at least 2 samples of some class")
    return torch.stack(spreads).mean().item()


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """Inception score (Salimans et al. 2016) from a classifier's logits: exp(E[KL(p(y|x) || p(y))]),
    mean and standard deviation over `splits` random splits (seeded)."""
    probs = logits.double().softmax(dim=1)
    order = torch.randperm(len(probs), generator=torch.Generator().manual_seed(seed))
    scores = []
    for part in probs[order].chunk(splits):
        marginal = part.mean(dim=0, keepdim=True)
        kl = (part * (part.clamp_min(1e-12).log() - marginal.clamp_min(1e-12).log())).sum(dim=1).mean()
        scores.append(kl.exp())
    scores = torch.stack(scores)
    return scores.mean().item(), scores.std(unbiased=False).item() if splits > 1 else 0.0


def _clip_size(clip_module, images: torch.Tensor) -> torch.Tensor:
    size = clip_module.hparams.vision["image_size"]
    if images.shape[-1] != size:
        images = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear",
                                                 align_corners=False, antialias=True)
    return images.float()


@torch.no_grad()
def prompt_ranking(clip_module, images: torch.Tensor, targets: list[int], prompts: list[str]) -> float:
    """The share of images whose most similar prompt, among `prompts`, is the one they were drawn
    for (`prompts[targets[i]]`), by a kiln CLIP model: chance is 1 / len(prompts)."""
    image = clip_module.model.encode_image(_clip_size(clip_module, images))
    text = clip_module.model.encode_text(clip_module.tokenize(prompts))
    return ((image @ text.T).argmax(1) == torch.tensor(targets)).double().mean().item()


def clip_score(clip_module, images: torch.Tensor, captions: list[str]) -> float:
    """CLIP score (Hessel et al. 2021): 100 x max(cos(image, caption), 0), averaged, with a kiln
    CLIP model (`CLIPModule`) that was trained on the same kind of images."""
    if clip_module is None:
        raise ValueError("clip_score needs a CLIP model: give a kiln CLIP checkpoint (--clip-ckpt PATH)")
    image, text = clip_module.embed(_clip_size(clip_module, images), captions)
    return (100 * torch.nn.functional.cosine_similarity(image, text).clamp_min(0)).mean().item()
