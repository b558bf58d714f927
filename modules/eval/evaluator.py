"""The generative evaluator: `kiln eval` and the in-training `Evaluation` callback both run it.

Generated samples of a family (`Family.generate_for_eval`, per stage) against up to
`num_samples` held-out real images, each stage against the real images brought to its size. One
key scheme for both callers (the callback logs the keys under `eval/`, as metrics.jsonl and W&B
show them; a cascade's stages prefix theirs with `<stage>/`):

    fid, kid                 FID and KID on the feature network's features (`extractor` names it)
    precision, recall        improved precision and recall (k = 3) on the same features
    judge/accuracy           how often the data set's judge reads a class-conditional sample as
                             the class it was drawn for
    judge/real_accuracy      the judge's own accuracy on real held-out images, the ceiling beside it
    judge/diversity          per-class spread of the judge's features, samples over real images
                             (1: as varied as real; truncation lowers it)
    is, is_std               inception score on the judge's logits
    l1, l1_baseline          an upsampler on real images brought down to its input: the mean L1
                             of its output, and of bicubic upsampling, to the real images
    samples, heldout/images  how many samples and real images the scores are over

An image-to-image family (`spec().evaluation == "translation"`) is judged on held-out true pairs
instead (`kiln.modules.eval.translation`): `l1`, `l1_identity`, `l1_ratio`, `l1_nearest` (given the
training pairs, `read_bank`), `variance_ratio`, and for a family that translates both ways
`b2a/l1`, `cycle_a`, `cycle_b`; `fid` and `kid` compare its outputs with the held-out targets.

Sample i depends on (seed, i) only, so N ranks give one rank's scores: rank r draws samples r,
r + N, ..., and every rank makes the same number of generation calls (a sharded forward is a
collective: a rank calling once more than the others would wait forever). FID and KID go through
torchmetrics (`FidKid`, states summed or gathered over ranks at `compute`), judge accuracy through
torchmetrics' `multiclass_accuracy`; the other scores are computed on every rank from the
features gathered over ranks (`gather`, passed in: this module talks to no process group
itself). The inception score is kiln's, with seeded splits, where torchmetrics' `InceptionScore`
draws its splits unseeded and so differs run to run.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_accuracy

from kiln.modules.eval.metrics import FidKid, class_spread, inception_score, precision_recall
from kiln.modules.eval.translation import SUMS, translation_results, translation_sums
from kiln.modules.blocks.images import to_shape
from kiln.modules.family import Family

METRICS = ("fid", "kid", "precision_recall", "judge", "is", "l1", "translation")


def _same(tensor: Tensor) -> Tensor:
    return tensor


class Evaluator:
    """Args:
        extractor: the feature network for FID, KID, precision and recall (`name`, `num_features`).
        judge: the data set's judge (judge accuracy, diversity, inception score), or None.
        metrics: which of `METRICS` to compute.
        num_samples: samples generated (and at most this many real images).
        seed: the samples' seed (fixed: the same samples at every evaluation).
        batch_size: samples per generation call.
        rank, world: this process's share of the samples and real images.
        gather: every rank's rows of a tensor, in rank order, on every rank (identity on one).
        progress: wraps the loop over generation calls (`kiln eval` shows a progress line).
    """

    def __init__(self, extractor: nn.Module, judge: nn.Module | None = None, metrics: Iterable[str] = ("fid", "kid"),
                 num_samples: int = 1000, seed: int = 0, batch_size: int = 100, rank: int = 0, world: int = 1,
                 gather: Callable[[Tensor], Tensor] = _same,
                 progress: Callable[[Iterable, str], Iterable] = lambda items, what: items):
        self.metrics = list(metrics)
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(unknown)} (known: {', '.join(METRICS)})")
        if judge is None and {"judge", "is"} & set(self.metrics):
            raise ValueError("judge accuracy and inception score need a judge: --judge DATA_SET (e.g. fashion-mnist)")
        self.extractor, self.judge = extractor, judge
        self.num_samples, self.seed, self.batch_size = num_samples, seed, batch_size
        self.rank, self.world, self.gather, self.progress = rank, world, gather, progress
        self.real_images: Tensor | None = None  # this rank's share
        self.real_inputs: Tensor | None = None  # held-out pairs: their inputs (real_images: targets)
        self.bank: tuple[Tensor, Tensor] | None = None  # the training pairs (l1_nearest)
        self.captions: list[str] = []
        self.heldout = 0
        self._real: dict[tuple, Tensor] = {}  # stage shape -> this rank's real features
        self._real_judged: tuple[Tensor, Tensor] | None = None  # every rank's, by the judge

    # -- real images -----------------------------------------------------------------------------
    def read_real(self, batches: Iterable[dict]) -> None:
        """This rank's share of the first `num_samples` held-out images (batches as the model gets
        them: float images in [-1, 1], captions if any; for translation, pairs as `input` and
        `target`, or `a` and `b`)."""
        images, inputs, captions, seen = [], [], [], 0
        for batch in batches:
            source, target = _pair_fields(batch)
            take = batch[target][: max(0, self.num_samples - seen)]
            caption = list(batch.get("caption", [""] * len(batch[target])))[: len(take)]
            images.append(take[self.rank::self.world])
            if source is not None:
                inputs.append(batch[source][: len(take)][self.rank::self.world])
            captions += caption[self.rank::self.world]
            seen += len(take)
            if seen >= self.num_samples:
                break
        if not images:
            raise ValueError("the held-out set is empty: nothing to score the samples against")
        self.real_images, self.captions, self.heldout = torch.cat(images), captions, seen
        self.real_inputs = torch.cat(inputs) if inputs else None
        self._real, self._real_judged = {}, None

    def read_bank(self, batches: Iterable[dict]) -> None:
        """Every training pair (the lookup baseline `l1_nearest`), whole on every rank."""
        pairs = [tuple(batch[k].cpu() for k in _pair_fields(batch)) for batch in batches]
        self.bank = (torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])) if pairs else None

    def _real_features(self, shape: tuple, device: torch.device) -> Tensor:
        if shape not in self._real:
            real = self.real_images
            self._real[shape] = torch.cat([self.extractor(to_shape(real[i:i + self.batch_size].to(device), shape))
                                           for i in range(0, len(real), self.batch_size)])
        return self._real[shape]

    def _judged_real(self) -> tuple[Tensor, Tensor]:
        """The judge's (features, logits) of every rank's real images."""
        if self._real_judged is None:
            parts = [self.judge.features_and_logits(self.real_images[i:i + self.batch_size].cpu())
                     for i in range(0, len(self.real_images), self.batch_size)]
            self._real_judged = (self.gather(torch.cat([f for f, _ in parts])), self.gather(torch.cat([lg for _, lg in parts])))
        return self._real_judged

    # -- evaluating ------------------------------------------------------------------------------
    def calls(self) -> list[list[int]]:
        """This rank's sample indices, one list per generation call, as many calls on every rank
        (a rank with nothing left for a call gets an empty list: it generates a stand-in, dropped)."""
        mine = list(range(self.rank, self.num_samples, self.world))
        per_rank = -(-self.num_samples // self.world)
        return [mine[i:i + self.batch_size] for i in range(0, per_rank, self.batch_size)]

    @torch.no_grad()
    def __call__(self, model: Family, use_ema: bool | None = None, what: str = "generating") -> dict[str, float]:
        if self.real_images is None:
            raise RuntimeError("Evaluator: read_real() first")
        spec = model.spec()
        if spec.evaluation == "translation":
            return self._translation(model, use_ema)
        if "l1" in self.metrics and not spec.upsamples:
            raise ValueError(f"l1 is for upsamplers: this '{spec.name}' model does not upsample")
        was_training = model.training
        model.eval()
        # An upsampler without the stages before it has nothing to generate from: it is judged on real inputs.
        generates = (not spec.upsamples or len(spec.stages) > 1) and bool(set(self.metrics) - {"l1"})
        fake: dict[str, list] = {}
        for indices in self.progress(self.calls() if generates else [], what):
            for stage, (images, labels) in model.generate_for_eval(indices or [0], self.seed, use_ema=use_ema).items():
                if indices:  # else the stand-in
                    judged = self.judge.features_and_logits(images.cpu()) if self.judge is not None else None
                    fake.setdefault(stage, []).append((images.shape[1:], self.extractor(images.to(model.device)), judged, labels))
        result: dict[str, float] = {"heldout/images": float(self.heldout)}
        for stage, parts in fake.items():
            result |= {(f"{stage}/" if stage else "") + k: v for k, v in self._scores(parts, model.device).items()}
        if spec.upsamples and ("l1" in self.metrics or not generates):
            result |= self._super_resolution(model, use_ema)
        model.train(was_training)
        return result

    def _scores(self, parts: list, device: torch.device) -> dict[str, float]:
        features = torch.cat([p[1] for p in parts])
        real = self._real_features(tuple(parts[0][0]), device)
        out = {"samples": float(self.gather(torch.tensor([len(features)])).sum())}
        if {"fid", "kid"} & set(self.metrics):
            scores = FidKid(self.extractor).to(features.device)
            scores.update_features(real, real=True)
            scores.update_features(features, real=False)
            out |= {k: v for k, v in scores.compute().items() if k in self.metrics}
        if "precision_recall" in self.metrics:
            out |= precision_recall(self.gather(real), self.gather(features))
        if self.judge is not None:
            judged_features = self.gather(torch.cat([p[2][0] for p in parts]))
            logits = self.gather(torch.cat([p[2][1] for p in parts]))
            if "judge" in self.metrics and parts[0][3] is not None:
                labels = self.gather(torch.cat([p[3] for p in parts]).to(logits.device))
                out["judge/accuracy"] = multiclass_accuracy(logits, labels, logits.shape[1], average="micro").item()
                # Diversity within each class asked for, relative to real images as the judge reads them.
                real_features, real_logits = self._judged_real()
                out["judge/diversity"] = class_spread(judged_features, labels) / class_spread(real_features, real_logits.argmax(1))
            if "is" in self.metrics:
                out["is"], out["is_std"] = inception_score(logits)
            out["judge/real_accuracy"] = float(self.judge.accuracy)
        return out

    def _super_resolution(self, model: Family, use_ema: bool | None) -> dict[str, float]:
        """The upsampler on this rank's real images: L1 sums over ranks, and with fid/kid asked
        for, the same pair of distribution scores (`fid`, `fid_baseline`, ...)."""
        sums = torch.zeros(3, dtype=torch.float64)
        scores = {"": FidKid(self.extractor), "_baseline": FidKid(self.extractor)}
        real_images = self.real_images
        for i in self.progress(range(0, len(real_images), self.batch_size), "upsampling the held-out images"):
            real, out, bicubic = model.super_resolution(real_images[i:i + self.batch_size],
                                                        self.captions[i:i + self.batch_size], self.seed + i, use_ema=use_ema)
            sums += torch.tensor([(out - real).abs().mean(dim=(1, 2, 3)).sum().item(),
                                  (bicubic - real).abs().mean(dim=(1, 2, 3)).sum().item(), len(real)], dtype=torch.float64)
            if {"fid", "kid"} & set(self.metrics):
                for suffix, images in (("", out), ("_baseline", bicubic)):
                    scores[suffix].update(real, real=True)
                    scores[suffix].update(images, real=False)
        sums = self.gather(sums[None]).sum(0)
        result = {"l1": sums[0].item() / sums[2].item(), "l1_baseline": sums[1].item() / sums[2].item()}
        if {"fid", "kid"} & set(self.metrics):
            for suffix, metric in scores.items():
                result |= {f"{k}{suffix}": v for k, v in metric.compute().items() if k in self.metrics}
        return result

    def _translation(self, model: Family, use_ema: bool | None) -> dict[str, float]:
        """The held-out pairs through the translator, this rank's share, in as many calls on
        every rank (`calls`); input i of the held-out set draws its noise from seed + i."""
        if self.real_inputs is None:
            raise ValueError("a translator is judged on held-out pairs: the held-out batches hold no "
                             "'input'/'target' (or 'a'/'b') images")
        was_training, both_ways = model.training, "b2a" in model.spec().modes
        model.eval()
        translate = functools.partial(model.translate, use_ema=use_ema)
        sums = torch.zeros(len(SUMS), dtype=torch.float64)
        scores = FidKid(self.extractor).to(model.device) if {"fid", "kid"} & set(self.metrics) else None
        per_rank = -(-self.heldout // self.world)
        for i in self.progress(range(0, per_rank, self.batch_size), "translating the held-out images"):
            x, y = self.real_inputs[i:i + self.batch_size], self.real_images[i:i + self.batch_size]
            stand_in = not len(x)  # every rank calls alike (a sharded forward is a collective)
            x, y = (self.real_inputs[:1], self.real_images[:1]) if stand_in else (x, y)
            seeds = [self.seed + self.rank + (i + j) * self.world for j in range(len(x))]
            part, out = translation_sums(translate, x.to(model.device), y.to(model.device), seeds, both_ways, self.bank)
            if not stand_in:
                sums += part
                if scores is not None:
                    scores.update(y.to(model.device), real=True)
                    scores.update(out, real=False)
        result = {"heldout/images": float(self.heldout)}
        result |= translation_results(self.gather(sums[None]).sum(0), self.bank is not None, both_ways)
        if scores is not None:
            result |= {k: v for k, v in scores.compute().items() if k in self.metrics}
        model.train(was_training)
        return result


def _pair_fields(batch: dict) -> tuple[str | None, str]:
    """(input field, target field) of a held-out batch: a pair's, or (None, "image")."""
    for source, target in (("input", "target"), ("a", "b")):
        if source in batch and target in batch:
            return source, target
    return None, "image"
