"""Evaluation in the loop: every K steps (and at the end), `num_samples` samples generated across
the ranks and scored against the held-out real images by kiln's one evaluator
(`kiln.modules.eval.evaluator`, which `kiln eval` runs too), the scores logged under `eval/`
with the same keys `kiln eval` writes (`eval/fid`, `eval/kid`, `eval/judge/accuracy`,
`eval/judge/real_accuracy`; a cascade's stages as `eval/<stage>/fid`, ...; a translator's
`eval/l1`, `eval/l1_ratio`, ...). The feature network
is named in the run's config; N ranks give one rank's scores.
"""
from __future__ import annotations

import lightning as L
import torch

from kiln.datamodules.datasets import training_pairs
from kiln.modules.eval.evaluator import Evaluator
from kiln.modules.eval.extractors import build_extractor
from kiln.modules.eval.metrics import gather
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
        self._evaluator: Evaluator | None = None
        self._last = -1
        self.last: dict[str, float] = {}  # the latest scores

    def setup(self, trainer: L.Trainer, pl_module: Family, stage: str) -> None:
        if not pl_module.spec().generates:
            raise ValueError(f"GenerativeEval: the '{pl_module.spec().name}' family does not generate images")
        # Built here, before the strategy starts, so a bad extractor or judge fails fast.
        judge = None
        if self.judge_name:
            from kiln.modules.eval.judge import get_judge

            judge = get_judge(self.judge_name)
        metrics = ("fid", "kid") + (("judge",) if judge is not None else ()) \
            + (("translation",) if pl_module.spec().evaluation == "translation" else ())
        self._evaluator = Evaluator(build_extractor(self.extractor_name, self.extractor_weights), judge, metrics,
                                    self.num_samples, self.seed, self.batch_size, gather=gather)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: Family) -> dict[str, float]:
        if trainer.global_step == self._last:
            return {}
        self._last = trainer.global_step
        evaluator = self._evaluator
        if evaluator.real_images is None:  # this rank's share of the held-out images, once
            evaluator.rank, evaluator.world = trainer.global_rank, trainer.world_size
            evaluator.extractor.to(pl_module.device)
            data = trainer.datamodule
            evaluator.read_real(data.on_after_batch_transfer(data.on_before_batch_transfer(batch, 0), 0)
                                for batch in data.val_dataloader())
            if pl_module.spec().evaluation == "translation" and (pairs := training_pairs(data)) is not None:
                evaluator.read_bank(pairs)
        out = {f"eval/{k}": v for k, v in evaluator(pl_module).items()}
        for logger in trainer.loggers:
            logger.log_metrics(out, step=trainer.global_step)
        self.last = out
        return out

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Family, *args) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Family) -> None:
        self.evaluate(trainer, pl_module)
