"""Sample grids: the same fixed prompts, classes or inputs with the same noise, saved every N steps
as `samples/<name>-step<N>.png` (and as W&B images), so one grid can be followed over training
(`kiln report` lays them out by step)."""
from __future__ import annotations

import io
import math

import fsspec
import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image, ImageDraw, ImageFont

from kiln.modules.family import Family


def grid_image(images: torch.Tensor, nrow: int | None = None, pad: int = 2, labels: list[str] | None = None) -> Image.Image:
    """Images in [-1, 1], (N, C, H, W), C in {1, 3} -> one PIL image, `nrow` per row; `labels`
    (one per row: the row's prompt or class) are written in a column on the left."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    font = ImageFont.load_default()
    left = max((math.ceil(font.getlength(t)) for t in labels), default=0) + 2 * pad if labels else 0
    canvas = np.full((rows * (h + pad) + pad, left + nrow * (w + pad) + pad, 3), 255, np.uint8)
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    pixels = pixels.expand(-1, 3, -1, -1) if c == 1 else pixels
    for i, image in enumerate(pixels.permute(0, 2, 3, 1).numpy()):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), left + pad + col * (w + pad)
        canvas[y:y + h, x:x + w] = image
    grid = Image.fromarray(canvas)
    if labels:
        if len(labels) != rows:
            raise ValueError(f"a grid of {rows} rows got {len(labels)} row labels")
        draw = ImageDraw.Draw(grid)
        for r, text in enumerate(labels):
            draw.text((pad, pad + r * (h + pad) + h // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return grid


def save_grid(images: torch.Tensor, url: str, nrow: int | None = None, labels: list[str] | None = None) -> None:
    buffer = io.BytesIO()
    grid_image(images, nrow, labels=labels).save(buffer, format="PNG")
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, buffer.getvalue())


class SampleGrid(L.Callback):
    """Every `every_n_steps` (and at the end), rank 0 asks a family that generates for its grid
    (`Family.sample_grid`: fixed conditions, fixed noise, EMA weights -> a `Grid`: images, images
    per row, and optionally one label per row) and saves it. A family with nothing to draw from
    (GLIDE's upsampler without a base model) returns None."""

    def __init__(self, run_dir: str, every_n_steps: int = 500, name: str = "grid"):
        self.run_dir, self.every_n_steps, self.name = run_dir.rstrip("/"), every_n_steps, name

    def _save(self, trainer: L.Trainer, pl_module: Family) -> None:
        if not pl_module.spec().generates:
            return
        grid = pl_module.sample_grid()  # every rank: sampling may need collectives (FSDP2, ZeRO-3)
        if grid is None or not trainer.is_global_zero:
            return
        images, nrow, labels = grid.images, grid.per_row, grid.labels
        step = trainer.global_step
        save_grid(images, f"{self.run_dir}/samples/{self.name}-step{step:07d}.png", nrow, labels)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=f"samples/{self.name}", images=[grid_image(images, nrow, labels=labels)], step=step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step % self.every_n_steps:
            self._save(trainer, pl_module)
