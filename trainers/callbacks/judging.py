"""Judging in the loop: every K steps, M samples generated across the ranks, scored against the
held-out real images on every rank's share, the scores reduced over ranks and logged.

A generative family provides `generate_for_eval(indices, seed) -> {stage: (images in [-1, 1],
labels or None)}` (kiln.modules.family), one stage "" or a cascade's several, each stage judged
on its own against the real images brought to its size. Sample i depends on (seed, i) only, so the same M samples
come out whatever the number of ranks, and N ranks give the one-rank scores (torchmetrics sums or
gathers the FID/KID states; judge counts are all-reduced). Metric keys name the feature network:
`eval/fid/<extractor>`, `eval/kid/<extractor>`, `eval/judge_accuracy` (and
`eval/judge_real_accuracy`, the judge's own accuracy on real held-out data, beside it); a
cascade's stages under `eval/<stage>/`.
"""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from kiln.modules.eval.extractors import build_extractor
from kiln.modules.eval.metrics import FidKid
from kiln.modules.family import Family


class GenerativeEval(L.Callback):
    """Args:
        every_n_steps: evaluate every this many optimizer steps (and at the end of training).
        num_samples: generated samples per evaluation (and at most this many real ones).
        extractor: feature network for FID/KID (`efficientnet-lite0`, `hed-vgg16`, `judge-<data set>`).
        extractor_weights: a weights file for it (default: the packaged one).
        judge: data set whose judge scores conditional samples by class (None: no judge).
        batch_size: samples generated per call.
        seed: the samples' seed (fixed: the same noise at every evaluation).
    """

    def __init__(self, every_n_steps: int = 1000, num_samples: int = 1000, extractor: str = "efficientnet-lite0",
                 extractor_weights: str | None = None, judge: str | None = None, batch_size: int = 100, seed: int = 0):
        self.every_n_steps, self.num_samples, self.batch_size, self.seed = every_n_steps, num_samples, batch_size, seed
        self.extractor_name, self.extractor_weights, self.judge_name = extractor, extractor_weights, judge
        self._extractor = None
        self._metrics: dict[str, FidKid] = {}  # stage -> scores ("" for a single-stage family)
        self._judge = None
        self._last = -1
        self.last: dict[str, float] = {}  # the latest scores

    def setup(self, trainer: L.Trainer, pl_module: Family, stage: str) -> None:
        if not pl_module.spec().generates:
            raise ValueError(f"GenerativeEval: the '{pl_module.spec().name}' family does not generate images")
        # Built here, before the strategy starts, so a bad extractor or judge fails fast.
        self._extractor = build_extractor(self.extractor_name, self.extractor_weights)
        if self.judge_name:
            from kiln.modules.eval.judge import get_judge

            self._judge = get_judge(self.judge_name)

    def _calls(self, trainer: L.Trainer) -> list[list[int]]:
        """This rank's sample indices, one list per generation call. Every rank makes the same
        number of calls whatever `num_samples` is: under FSDP2 or ZeRO-3 a forward gathers weights
        from all ranks, so a rank that called once more than the others would wait forever. A
        rank with nothing left for a call gets an empty list (it generates a stand-in and drops it)."""
        mine = list(range(trainer.global_rank, self.num_samples, trainer.world_size))
        per_rank = -(-self.num_samples // trainer.world_size)
        return [mine[i:i + self.batch_size] for i in range(0, per_rank, self.batch_size)]

    @torch.no_grad()
    def _real_features(self, trainer: L.Trainer, pl_module: L.LightningModule, metric: FidKid, size: tuple) -> None:
        """This rank's share of the held-out images, up to `num_samples` in all, at `size`."""
        loader = trainer.datamodule.val_dataloader()
        seen = 0
        for batch in loader:
            batch = trainer.datamodule.on_after_batch_transfer(trainer.datamodule.on_before_batch_transfer(batch, 0), 0)
            take = batch["image"][: max(0, self.num_samples - seen)]
            seen += len(take)
            mine = take[trainer.global_rank::trainer.world_size].to(pl_module.device)
            if len(mine):
                metric.update(resize_like(mine, size), real=True)
            if seen >= self.num_samples:
                break

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        if trainer.global_step == self._last:
            return {}
        self._last = trainer.global_step
        correct: dict[str, torch.Tensor] = {}  # stage -> (correct, judged)
        was_training = pl_module.training
        pl_module.eval()
        for metric in self._metrics.values():
            metric.reset_fake()
        for indices in self._calls(trainer):
            for stage, (images, labels) in pl_module.generate_for_eval(indices or [0], self.seed).items():
                if stage not in self._metrics:
                    self._metrics[stage] = FidKid(self._extractor).to(pl_module.device)
                    self._real_features(trainer, pl_module, self._metrics[stage], tuple(images.shape[1:]))
                if not indices:  # the stand-in
                    continue
                self._metrics[stage].update(images, real=False)
                if self._judge is not None and labels is not None:
                    predicted = self._judge.logits(images.cpu()).argmax(1)
                    counts = torch.tensor([(predicted == labels.cpu()).sum().item(), len(labels)], dtype=torch.float64)
                    correct[stage] = correct.get(stage, torch.zeros(2, dtype=torch.float64)) + counts
        pl_module.train(was_training)
        out = {}
        for stage, metric in self._metrics.items():
            scores = metric.compute()
            prefix, name = f"eval/{stage}/" if stage else "eval/", scores["extractor"]
            out |= {f"{prefix}fid/{name}": scores["fid"], f"{prefix}kid/{name}": scores["kid"]}
            if self._judge is not None:
                judged = correct.get(stage, torch.zeros(2, dtype=torch.float64))
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.all_reduce(judged)
                if judged[1] > 0:
                    out[f"{prefix}judge_accuracy"] = (judged[0] / judged[1]).item()
                    out[f"{prefix}judge_real_accuracy"] = float(self._judge.accuracy)
        for logger in trainer.loggers:
            logger.log_metrics(out, step=trainer.global_step)
        self.last = out
        return out

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate(trainer, pl_module)


def resize_like(images: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Real images brought to a stage's (C, H, W): antialiased resize, grey <-> RGB."""
    c, h, w = shape
    if images.shape[-2:] != (h, w):
        images = F.interpolate(images, size=(h, w), mode="bilinear", antialias=True).clamp(-1, 1)
    if images.shape[1] != c:
        images = images.mean(1, keepdim=True) if c == 1 else images.expand(-1, c, -1, -1)
    return images
