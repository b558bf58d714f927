"""LightningModule for CLIP: contrastive training over the all-gathered global batch, and
held-out retrieval / zero-shot metrics at validation."""
from __future__ import annotations

import math
from dataclasses import asdict

import torch

from kiln.modules.blocks.retrieval import retrieval_among_candidates, zero_shot
from kiln.modules.clip.loss import clip_loss
from kiln.modules.clip.networks import CLIP, CLIPConfig, TextConfig, VisionConfig
from kiln.modules.blocks.tokenizer import ByteTokenizer
from kiln.modules.family import Family, Spec
from kiln.modules.optim import adamw_with_warmup_cosine


class CLIPModule(Family):
    """CLIP (Radford et al. 2021) trained with the symmetric InfoNCE loss.

    Args:
        embed_dim: width of the shared embedding space.
        vision / text: tower sizes (see `VisionConfig`, `TextConfig`).
        lr, weight_decay, betas, eps: AdamW, decay only on matrices (not gains, biases, the temperature).
        warmup_steps: linear warm-up, then cosine decay to 0 over `trainer.max_steps`.
        max_logit_scale: the temperature is clamped to 1/100 as in the paper.
        retrieval_candidates: held-out retrieval is top-1 among this many random pairs.
    """

    def __init__(
        self,
        embed_dim: int = 512,
        vision: VisionConfig | None = None,
        text: TextConfig | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int = 100,
        max_logit_scale: float = 100.0,
        retrieval_candidates: int = 100,
    ):
        super().__init__()
        vision = VisionConfig(**vision) if isinstance(vision, dict) else vision or VisionConfig()
        text = TextConfig(**text) if isinstance(text, dict) else text or TextConfig()
        # Plain dicts in the checkpoint, so it loads with weights_only=True.
        self.save_hyperparameters({
            "embed_dim": embed_dim, "vision": asdict(vision), "text": asdict(text), "lr": lr,
            "weight_decay": weight_decay, "betas": list(betas), "eps": eps, "warmup_steps": warmup_steps,
            "max_logit_scale": max_logit_scale, "retrieval_candidates": retrieval_candidates,
        })
        self.model = CLIP(CLIPConfig(embed_dim=embed_dim, vision=vision, text=text))
        self.tokenizer = ByteTokenizer(text.context_length)
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spec(self) -> Spec:
        return Spec("clip", components={"image": "model.visual", "text": "model.text"},
                    shard_units=tuple(self.model.shard_units), generates=False, evaluation="retrieval")

    def plan_inputs(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs of `self.model` for a batch (on the module's device; `kiln plan` uses meta)."""
        v, t = self.hparams.vision, self.hparams.text
        images = torch.zeros(batch_size, 3, v["image_size"], v["image_size"], device=self.device)
        return images, torch.zeros(batch_size, t["context_length"], dtype=torch.long, device=self.device)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions).to(self.device)

    def _gather(self):
        if self.trainer.world_size == 1:
            return None
        # (world, B, D) -> (world * B, D), rank-major; gradients flow back to each rank.
        return lambda t: self.all_gather(t, sync_grads=True).flatten(0, 1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image, text, scale = self.model(batch["image"], self.tokenize(batch["caption"]))
        loss = clip_loss(image, text, scale, self._gather(), self.global_rank)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/logit_scale", scale.detach())
        return loss

    def on_train_batch_end(self, *args) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(self.hparams.max_logit_scale))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        image, text, scale = self.model(batch["image"], self.tokenize(batch["caption"]))
        self.log("val/loss", clip_loss(image, text, scale), batch_size=len(image))
        self._val.append((image.float().cpu(), text.float().cpu()))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        image = torch.cat([v[0] for v in self._val])
        text = torch.cat([v[1] for v in self._val])
        self._val.clear()
        metrics = zero_shot(image, text)
        if len(image) >= self.hparams.retrieval_candidates:
            metrics |= retrieval_among_candidates(image, text, self.hparams.retrieval_candidates, draws=20)
        # Every rank scored the whole held-out set, so the values agree without a reduction.
        for name in ("retrieval/top1", "retrieval/image_to_text_top1", "zero_shot/top1"):
            if name in metrics:
                self.log(f"val/{name}", metrics[name], prog_bar=name == "retrieval/top1")

    @torch.no_grad()
    def embed(self, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_image(images), self.model.encode_text(self.tokenize(captions))

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_with_warmup_cosine(
            self.model, hp.lr, hp.weight_decay, tuple(hp.betas), hp.eps, hp.warmup_steps, self.trainer.max_steps
        )
