"""LightningModule for GLIDE: one stage per run (the base model, or the text-conditional
upsampler), trained with conditioning dropout and sampled with classifier-free guidance.

An upsampler run that names its base checkpoint (`base_ckpt`) samples the whole cascade: text ->
base image -> upsampled image, and `kiln eval` / the evaluation callback judge both stages.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kiln.modules.blocks.diffusion import GaussianDiffusion, classifier_free_guidance, drop_condition
from kiln.modules.blocks.diffusion import seeded_noise as _noise
from kiln.modules.blocks.images import to_shape
from kiln.modules.blocks.tokenizer import ByteTokenizer
from kiln.modules.family import Family, Generated, Grid, Spec
from kiln.modules.glide.networks import GLIDENet, TextConfig
from kiln.modules.optim import adamw_with_warmup_cosine
from kiln.modules.ema import weights_for_sampling
from kiln.modules.loading import load_module


class GLIDEModule(Family):
    """GLIDE, one stage.

    Args:
        stage: "base" (text -> image) or "upsampler" (text + low-resolution image -> image).
        image_size: output side in pixels.
        low_res_size: the upsampler's input side (training downsamples the real images to it).
        channels: image channels (1 for grey data such as Fashion-MNIST; the data's RGB is averaged).
        text: the text transformer (`TextConfig`).
        unet: `kiln.modules.blocks.unet.UNet` arguments except the channel counts and the text
            widths, which follow from the other settings.
        diffusion: `GaussianDiffusion` arguments (GLIDE: cosine schedule, 1000 steps, learned variance).
        caption_dropout: probability of training on the empty caption (for guidance; the paper: 20%).
        lr, weight_decay, betas, warmup_steps: AdamW with linear warm-up and cosine decay.
        sampler, sample_steps, guidance_scale: sampling defaults (grids, evaluation, `kiln sample`).
        grid_prompts, grid_per_prompt: the sample grid's fixed prompts, and images of each (one row each).
        eval_prompts: the prompt of each class, for class-conditional judging (sample i is drawn for
            class i mod len(eval_prompts)).
        base_ckpt: (upsampler) the base model's checkpoint, to sample and judge the whole cascade.
    """

    def __init__(
        self,
        stage: Literal["base", "upsampler"] = "base",
        image_size: int = 64,
        low_res_size: int | None = None,
        channels: int = 3,
        text: TextConfig | None = None,
        unet: dict | None = None,
        diffusion: dict | None = None,
        caption_dropout: float = 0.2,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        sampler: str = "ddim",
        sample_steps: int = 50,
        guidance_scale: float = 3.0,
        grid_prompts: list[str] | None = None,
        grid_per_prompt: int = 4,
        eval_prompts: list[str] | None = None,
        base_ckpt: str | None = None,
    ):
        super().__init__()
        text = TextConfig(**text) if isinstance(text, dict) else text or TextConfig()
        unet = dict(unet or {})
        diffusion = dict(diffusion or {"schedule": "cosine", "learned_variance": True})
        upsampler = stage == "upsampler"
        if stage not in ("base", "upsampler"):
            raise ValueError(f"stage must be 'base' or 'upsampler', got {stage!r}")
        if upsampler and not (low_res_size and low_res_size < image_size):
            raise ValueError(f"the upsampler needs low_res_size below image_size ({image_size}), got {low_res_size}")
        for key in ("in_channels", "out_channels", "context_dim", "pooled_dim"):
            if key in unet:
                raise ValueError(f"unet.{key} follows from the other settings; remove it from the config")
        self.save_hyperparameters({
            "stage": stage, "image_size": image_size, "low_res_size": low_res_size, "channels": channels,
            "text": asdict(text), "unet": unet, "diffusion": diffusion, "caption_dropout": caption_dropout,
            "lr": lr, "weight_decay": weight_decay, "betas": list(betas), "warmup_steps": warmup_steps,
            "sampler": sampler, "sample_steps": sample_steps, "guidance_scale": guidance_scale,
            "grid_prompts": list(grid_prompts or []), "grid_per_prompt": grid_per_prompt,
            "eval_prompts": list(eval_prompts or []), "base_ckpt": base_ckpt,
        })
        self.diffusion = GaussianDiffusion(**diffusion)
        out_channels = channels * (2 if self.diffusion.learned_variance else 1)
        self.model = GLIDENet(text, {**unet, "in_channels": channels * (2 if upsampler else 1),
                                     "out_channels": out_channels}, upsampler=upsampler)
        self.tokenizer = ByteTokenizer(text.context_length)
        self._base: GLIDEModule | None = None

    # -- declared to trainers/ -------------------------------------------------------------------
    def spec(self) -> Spec:
        upsampler = self.hparams.stage == "upsampler"
        return Spec("glide", components={"text": "model.text", "unet": "model.unet"},
                    shard_units=tuple(self.model.shard_units),
                    conditions=("prompts", "inputs") if upsampler else ("prompts",),
                    options={"guidance_scale": "guidance_scale", "sampler": "sampler", "steps": "sample_steps"},
                    stages=("base", "upsampled") if upsampler and self.hparams.base_ckpt else ("",),
                    upsamples=upsampler)

    def plan_inputs(self, batch_size: int) -> tuple[Tensor, ...]:
        hp, device = self.hparams, self.device
        x = torch.zeros(batch_size, hp.channels, hp.image_size, hp.image_size, device=device)
        t = torch.zeros(batch_size, dtype=torch.long, device=device)
        tokens = torch.zeros(batch_size, hp.text["context_length"], dtype=torch.long, device=device)
        return (x, t, tokens, x) if hp.stage == "upsampler" else (x, t, tokens)

    # -- training --------------------------------------------------------------------------------
    def _channels(self, images: Tensor) -> Tensor:
        if images.shape[1] == self.hparams.channels:
            return images
        return images.mean(1, keepdim=True) if self.hparams.channels == 1 else images.expand(-1, 3, -1, -1)

    def _images(self, images: Tensor) -> Tensor:
        return to_shape(images, self._shape(), mode="bicubic")

    def low_res(self, images: Tensor) -> Tensor:
        """Real images -> the upsampler's input: down to low_res_size (antialiased)."""
        return F.interpolate(images, size=self.hparams.low_res_size, mode="bilinear", antialias=True).clamp(-1, 1)

    def upsampled(self, low: Tensor) -> Tensor:
        """A low-resolution image brought to the output size (bicubic): the U-Net's extra channels,
        and the baseline that the upsampler must beat."""
        return F.interpolate(self._channels(low), size=self.hparams.image_size, mode="bicubic").clamp(-1, 1)

    def tokenize(self, captions: list[str]) -> Tensor:
        return self.tokenizer(captions).to(self.device)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x0 = self._images(batch["image"])
        drop = drop_condition(len(x0), self.hparams.caption_dropout).tolist()
        tokens = self.tokenize(["" if d else c for c, d in zip(batch["caption"], drop)])
        low = self.upsampled(self.low_res(x0)) if self.hparams.stage == "upsampler" else None
        losses = self.diffusion.training_losses(lambda x, t: self.model(x, t, tokens, low), x0)
        self.log("train/loss", losses["loss"], prog_bar=True, sync_dist=True)
        self.log("train/mse", losses["mse"].detach())
        if self.diffusion.learned_variance:
            self.log("train/vlb", losses["vlb"].detach())
        return losses["loss"]

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_with_warmup_cosine(self.model, hp.lr, hp.weight_decay, tuple(hp.betas), 1e-8,
                                        hp.warmup_steps, self.trainer.max_steps)

    # -- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: list[str], noise: Tensor, *, low_res: Tensor | None = None,
               guidance_scale: float | None = None, steps: int | None = None, sampler: str | None = None,
               use_ema: bool | None = None) -> Tensor:
        """Images in [-1, 1] for `prompts` from `noise` (N, C, H, W); `low_res` (upsampler) at any size."""
        hp = self.hparams
        net = weights_for_sampling(self, use_ema)
        scale = hp.guidance_scale if guidance_scale is None else guidance_scale
        if hp.stage == "upsampler":
            if low_res is None:
                raise ValueError("the GLIDE upsampler samples from a low-resolution image (--input, or base_ckpt)")
            low_res = self.upsampled(F.interpolate(low_res.to(self.device), size=hp.low_res_size, mode="bilinear",
                                                   antialias=True).clamp(-1, 1))
        cond = {"tokens": self.tokenize(prompts), "low_res": low_res}
        uncond = {"tokens": self.tokenize([""]).expand(len(prompts), -1), "low_res": low_res}
        model_fn = classifier_free_guidance(lambda x, t, c: net(x, t, c["tokens"], c["low_res"]),
                                            cond, uncond, scale, channels=hp.channels)
        return self.diffusion.sample(model_fn, noise.shape, sampler=sampler or hp.sampler,
                                     steps=steps or hp.sample_steps, noise=noise.to(self.device))

    def base(self) -> GLIDEModule:
        """The base model named by `base_ckpt` (the upsampler's cascade), loaded once."""
        if self._base is None:
            if not self.hparams.base_ckpt:
                raise ValueError("this GLIDE upsampler names no base_ckpt: give it input images instead")
            base = load_module(self.hparams.base_ckpt)
            if not isinstance(base, GLIDEModule) or base.hparams.stage != "base":
                raise ValueError(f"base_ckpt {self.hparams.base_ckpt} is not a GLIDE base-stage checkpoint")
            # Not a submodule: the base stays out of this stage's state dict, optimiser and EMA.
            object.__setattr__(self, "_base", base.eval().to(self.device))
        return self._base

    def _shape(self) -> tuple[int, int, int]:
        return self.hparams.channels, self.hparams.image_size, self.hparams.image_size

    @torch.no_grad()
    def generate(self, num: int = 1, seed: int = 0, *, use_ema: bool | None = None, prompts: list[str] | None = None,
                 inputs: Tensor | None = None) -> Tensor | dict[str, Tensor]:
        """`kiln sample`: `num` images per prompt (or per input image, for the upsampler)."""
        options = {"use_ema": use_ema}
        if self.hparams.stage == "base":
            if inputs is not None:
                raise ValueError("the GLIDE base model draws from text only: --input is for the upsampler")
            prompts = [p for p in (prompts or [""]) for _ in range(num)]
            return self.sample(prompts, _noise(self._shape(), [seed * 1_000_003 + i for i in range(len(prompts))]),
                               **options)
        if inputs is not None:
            inputs = inputs.repeat_interleave(num, 0)
            prompts = [p for p in (prompts or [""] * (len(inputs) // num)) for _ in range(num)]
            if len(prompts) != len(inputs):
                raise ValueError(f"{len(prompts) // num} prompts for {len(inputs) // num} input images: give one per image")
            noise = _noise(self._shape(), [seed * 1_000_003 + i for i in range(len(prompts))])
            return self.sample(prompts, noise, low_res=inputs, **options)
        low = self.base().generate(num, seed, prompts=prompts, **options)
        prompts = [p for p in (prompts or [""]) for _ in range(num)]
        noise = _noise(self._shape(), [seed * 1_000_003 + i + 500_009 for i in range(len(prompts))])
        return {"base": low, "upsampled": self.sample(prompts, noise, low_res=low, **options)}

    @torch.no_grad()
    def generate_for_eval(self, indices: list[int], seed: int, *, use_ema: bool | None = None) -> Generated:
        """Sample i: pair i mod len of the labelled prompts (`eval_prompts` by class, or those of
        `use_labelled_prompts`), noise from (seed, i) only. The upsampler with a base checkpoint
        returns both stages."""
        prompts, labels = self.labelled_prompts(indices)
        if self.hparams.stage == "base":
            return {"": (self.sample(prompts, _noise(self._shape(), [seed * 1_000_003 + i for i in indices]),
                                     use_ema=use_ema), labels)}
        base = self.base()
        low = base.sample(prompts, _noise(base._shape(), [seed * 1_000_003 + i for i in indices]), use_ema=use_ema)
        high = self.sample(prompts, _noise(self._shape(), [seed * 1_000_003 + i + 500_009 for i in indices]),
                           low_res=low, use_ema=use_ema)
        return {"base": (low, labels), "upsampled": (high, labels)}

    @torch.no_grad()
    def super_resolution(self, images: Tensor, prompts: list[str], seed: int = 0, *,
                         use_ema: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Real images -> (the real images at the output size, the upsampler's output from their
        downsampled version, bicubic upsampling of that same input): the upsampler's judging."""
        real = self._images(images.to(self.device))
        low = self.low_res(real)
        out = self.sample(prompts, _noise(self._shape(), [seed * 1_000_003 + i for i in range(len(real))]), low_res=low,
                          use_ema=use_ema)
        return real, out, self.upsampled(low)

    @torch.no_grad()
    def sample_grid(self, *, use_ema: bool | None = None) -> Grid | None:
        """The configured prompts, `grid_per_prompt` images each, fixed noise, a row per prompt
        labelled with it (the SampleGrid callback)."""
        hp = self.hparams
        if not hp.grid_prompts or (hp.stage == "upsampler" and not hp.base_ckpt):
            return None
        out = self.generate(hp.grid_per_prompt, 0, prompts=hp.grid_prompts, use_ema=use_ema)
        images = out["upsampled"] if isinstance(out, dict) else out
        return Grid(images, hp.grid_per_prompt, list(hp.grid_prompts))
