"""LightningModule for Imagen (Saharia et al. 2022): one stage of the cascade per run.

A frozen pretrained text encoder (`kiln.modules.pretrained.text_encoders`) reads the caption;
its tokens condition the U-Net by cross-attention and their mean by the timestep embedding.
The base stage draws from text; every super-resolution stage names the checkpoint of the stage
below it (`previous_ckpt`), so a cascade of any length is a chain of checkpoints, each trained,
sharded and checkpointed on its own, and `kiln sample` / `kiln eval` on the last one run (and
judge, `<stage>/...`) every stage.

Noise-conditioning augmentation (the paper's Section 2.5): a super-resolution stage trains on a
low-resolution input noised by the forward process to a level drawn uniformly from
[0, augmentation_max] per sample, and is told the level (a second timestep embedding); sampling
noises its input to one fixed level, `augmentation_level` (`--augmentation-level`).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from kiln.modules.blocks.diffusion import GaussianDiffusion, classifier_free_guidance, drop_condition, seeded_noise
from kiln.modules.blocks.images import to_shape
from kiln.modules.ema import weights_for_sampling
from kiln.modules.family import Family, Generated, Grid, Spec
from kiln.modules.imagen.networks import ImagenNet
from kiln.modules.loading import load_module
from kiln.modules.optim import adamw_with_warmup_cosine
from kiln.modules.pretrained.text_encoders import FrozenTextEncoder

STAGE_NOISE = 500_009  # stage k of a chain draws its noise from seed * 1_000_003 + i + k * STAGE_NOISE
AUGMENTATION_NOISE = 250_007  # and the noise that augments its input from that seed + AUGMENTATION_NOISE


class ImagenModule(Family):
    """Imagen, one stage.

    Args:
        stage: "base" (text -> image) or "sr" (text + low-resolution image -> image).
        name: the stage's name in a cascade's keys (default "base", or "sr<image_size>").
        image_size, low_res_size: output side; (sr) the input side training downsamples to.
        channels: image channels (1 for grey data; the data's RGB is averaged).
        text_encoder: `FrozenTextEncoder` arguments (kind, path, max_length, config).
        text_width: project the text to this width for the U-Net (None: the encoder's).
        unet_type: "adm" (the paper's base: ADM's U-Net with text cross-attention) or
            "efficient" (Efficient U-Net, the paper's super-resolution stages).
        unet: the U-Net's arguments except channel counts and text widths.
        diffusion: `GaussianDiffusion` arguments.
        caption_dropout: probability of training on the empty caption (the paper: 10%).
        noise_augmentation, augmentation_max, augmentation_level: (sr) see the module docstring.
        dynamic_threshold: the percentile of dynamic thresholding at sampling (the paper: 0.995);
            None: static clipping to [-1, 1].
        lr, weight_decay, betas, warmup_steps: AdamW with linear warm-up and cosine decay.
        sampler, sample_steps, guidance_scale: sampling defaults.
        grid_prompts, grid_per_prompt: the sample grid's prompts and images of each.
        eval_prompts: the prompt of each class (sample i is drawn for class i mod len).
        previous_ckpt: (sr) the checkpoint of the stage below, to sample the whole cascade.
        train_crop: (sr) train on random crops of this side (the paper's 256 -> 1024 stage trains on
            256 px crops, 64 px inputs); sampling still draws whole images.
    """

    def __init__(
        self,
        stage: Literal["base", "sr"] = "base",
        name: str | None = None,
        image_size: int = 64,
        low_res_size: int | None = None,
        channels: int = 3,
        text_encoder: dict | None = None,
        text_width: int | None = None,
        unet_type: Literal["adm", "efficient"] = "adm",
        unet: dict | None = None,
        diffusion: dict | None = None,
        caption_dropout: float = 0.1,
        noise_augmentation: bool = True,
        augmentation_max: float = 1.0,
        augmentation_level: float = 0.0,
        dynamic_threshold: float | None = 0.995,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 100,
        sampler: str = "ddim",
        sample_steps: int = 50,
        guidance_scale: float = 5.0,
        grid_prompts: list[str] | None = None,
        grid_per_prompt: int = 4,
        eval_prompts: list[str] | None = None,
        previous_ckpt: str | None = None,
        train_crop: int | None = None,
    ):
        super().__init__()
        if stage not in ("base", "sr"):
            raise ValueError(f"stage must be 'base' or 'sr', got {stage!r}")
        sr = stage == "sr"
        if sr and not (low_res_size and low_res_size < image_size):
            raise ValueError(f"an sr stage needs low_res_size below image_size ({image_size}), got {low_res_size}")
        if sr and unet_type != "efficient":
            raise ValueError("an sr stage uses the efficient U-Net (ADM's has no augmentation-level embedding)")
        if unet_type not in ("adm", "efficient"):
            raise ValueError(f"unet_type must be 'adm' or 'efficient', got {unet_type!r}")
        if train_crop is not None and not (sr and 0 < train_crop <= image_size
                                           and train_crop * (low_res_size or 0) % image_size == 0):
            raise ValueError(f"train_crop ({train_crop}) is for sr stages: a side up to image_size whose low-resolution "
                             f"crop is a whole number of pixels")
        if not 0.0 <= augmentation_level <= 1.0 or not 0.0 <= augmentation_max <= 1.0:
            raise ValueError("augmentation levels are in [0, 1]")
        unet = dict(unet or {})
        for key in ("in_channels", "out_channels", "context_dim", "pooled_dim", "context_mode", "augmentation_level"):
            if key in unet:
                raise ValueError(f"unet.{key} follows from the other settings; remove it from the config")
        text_encoder = dict(text_encoder or {"kind": "minilm", "max_length": 32})
        diffusion = dict(diffusion or {"schedule": "cosine", "parameterization": "v"})
        self.save_hyperparameters({
            "stage": stage, "name": name or ("base" if not sr else f"sr{image_size}"), "image_size": image_size,
            "low_res_size": low_res_size, "channels": channels, "text_encoder": text_encoder, "text_width": text_width, "unet_type": unet_type,
            "unet": unet, "diffusion": diffusion, "caption_dropout": caption_dropout,
            "noise_augmentation": noise_augmentation and sr, "augmentation_max": augmentation_max,
            "augmentation_level": augmentation_level, "dynamic_threshold": dynamic_threshold, "lr": lr,
            "weight_decay": weight_decay, "betas": list(betas), "warmup_steps": warmup_steps, "sampler": sampler,
            "sample_steps": sample_steps, "guidance_scale": guidance_scale, "grid_prompts": list(grid_prompts or []),
            "grid_per_prompt": grid_per_prompt, "eval_prompts": list(eval_prompts or []),
            "previous_ckpt": previous_ckpt, "train_crop": train_crop,
        })
        self.diffusion = GaussianDiffusion(**diffusion)
        # Frozen and outside the module tree (see kiln.modules.pretrained.text_encoders).
        object.__setattr__(self, "text_encoder", FrozenTextEncoder(**text_encoder))
        io = {"in_channels": channels * (2 if sr else 1),
              "out_channels": channels * (2 if self.diffusion.learned_variance else 1)}
        if unet_type == "efficient":
            io["augmentation_level"] = self.hparams.noise_augmentation
        self.model = ImagenNet(self.text_encoder.dim, text_width, unet_type, {**unet, **io})
        self._previous: ImagenModule | None = None

    # -- declared to trainers/ -------------------------------------------------------------------
    def spec(self) -> Spec:
        sr = self.hparams.stage == "sr"
        return Spec("imagen", components={"unet": "model.unet"}, frozen={"text_encoder": "text_encoder"},
                    shard_units=tuple(self.model.shard_units),
                    conditions=("prompts", "inputs") if sr else ("prompts",),
                    options={"guidance_scale": "guidance_scale", "sampler": "sampler", "steps": "sample_steps",
                             "augmentation_level": "augmentation_level"},
                    stages=self.stage_names(), upsamples=sr)

    def stage_names(self) -> tuple[str, ...]:
        """The chain's stage names, base first; ("",) for a stage that samples alone."""
        if self.hparams.stage == "base":
            return ("",)
        if not self.hparams.previous_ckpt:
            return ("",)
        if self._previous is None and self.model.unet.input_conv.weight.is_meta:
            return ("previous", self.hparams.name)  # planned on the meta device: the chain is not read
        names = self.previous().stage_names()
        return (*(n or "base" for n in names), self.hparams.name)

    def plan_inputs(self, batch_size: int) -> tuple[Tensor, ...]:
        hp, device, dim = self.hparams, self.device, self.text_encoder.dim
        length = hp.text_encoder.get("max_length", 32)
        side = hp.train_crop or hp.image_size
        x = torch.zeros(batch_size, hp.channels * (2 if hp.stage == "sr" else 1), side, side, device=device)
        t = torch.zeros(batch_size, dtype=torch.long, device=device)
        context = torch.zeros(batch_size, length, dim, device=device)
        mask = torch.ones(batch_size, length, dtype=torch.bool, device=device)
        pooled = torch.zeros(batch_size, dim, device=device)
        if hp.noise_augmentation:
            return x, t, context, mask, pooled, t
        return x, t, context, mask, pooled

    # -- conditioning ----------------------------------------------------------------------------
    def encode(self, captions: list[str]) -> dict[str, Tensor]:
        """The frozen encoder's (tokens, mask, pooled) for `captions`, on this module's device."""
        if self.text_encoder.device != self.device:
            self.text_encoder.to(self.device)
        tokens, mask, pooled = self.text_encoder(list(captions))
        return {"context": tokens, "context_mask": mask, "pooled": pooled}

    def cached_text(self, batch: dict, drop: list[bool]) -> dict[str, Tensor]:
        """The batch's cached embeddings as `encode` gives them, dropped captions replaced by the
        empty caption's encoding; embeddings of another encoder are refused."""
        mine, theirs = self.text_encoder.fingerprint, set(batch["text_encoder"])
        if theirs != {mine}:
            raise ValueError(f"the shards' text embeddings come from {sorted(theirs)[0]!r}, this stage's encoder is "
                             f"{mine!r}: rebuild them with `kiln data text-embeddings` and this stage's encoder")
        tokens, mask = batch["text_tokens"].to(self.device).float(), batch["text_mask"].to(self.device)
        if tokens.shape[1] != self.text_encoder.max_length:
            raise ValueError(f"the data gives {tokens.shape[1]} text tokens, the encoder's max_length is "
                             f"{self.text_encoder.max_length}: set the mapper's text_length to it")
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        cond = {"context": tokens, "context_mask": mask, "pooled": pooled}
        if any(drop):
            empty = self.encode([""])
            rows = torch.tensor(drop, device=self.device)
            cond = {k: torch.where(rows.view(-1, *[1] * (v.ndim - 1)), empty[k].expand_as(v), v) for k, v in cond.items()}
        return cond

    def _shape(self) -> tuple[int, int, int]:
        return self.hparams.channels, self.hparams.image_size, self.hparams.image_size

    def low_res(self, images: Tensor) -> Tensor:
        """Real images (or crops) -> an sr stage's input: down by image_size / low_res_size (antialiased)."""
        size = images.shape[-1] * self.hparams.low_res_size // self.hparams.image_size
        return to_shape(images, (self.hparams.channels, size, size))

    def upsampled(self, low: Tensor) -> Tensor:
        """A low-resolution image up by image_size / low_res_size (bicubic): the baseline, and the U-Net's input."""
        size = low.shape[-1] * self.hparams.image_size // self.hparams.low_res_size
        return to_shape(low, (self.hparams.channels, size, size), mode="bicubic")

    def _crop(self, x0: Tensor) -> Tensor:
        side = self.hparams.train_crop
        if not side or side == x0.shape[-1]:
            return x0
        at = torch.randint(0, x0.shape[-1] - side + 1, (len(x0), 2)).tolist()
        return torch.stack([x[:, i:i + side, j:j + side] for x, (i, j) in zip(x0, at)])

    def augment(self, low: Tensor, level: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise `low` (at the output size) to `level` in [0, 1] per sample: (noised input, timestep)."""
        t = (level * (self.diffusion.num_timesteps - 1)).round().long().to(low.device)
        return self.diffusion.q_sample(low, t, None if noise is None else noise.to(low)), t

    def _noise(self, seeds: list[int]) -> tuple[Tensor, Tensor]:
        """(the sampler's starting noise, the noise augmenting an sr stage's input), per seed."""
        return seeded_noise(self._shape(), seeds), seeded_noise(self._shape(), [s + AUGMENTATION_NOISE for s in seeds])

    def _conditioned(self, net, cond: dict[str, Tensor]):
        def run(x: Tensor, t: Tensor, c: dict[str, Tensor]) -> Tensor:
            if "low_res" in c:
                x = torch.cat([x, c["low_res"].to(x.dtype)], dim=1)
            return net(x, t, c["context"], c["context_mask"], c["pooled"], c.get("augmentation_t"))
        return run

    # -- training --------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        hp = self.hparams
        x0 = self._crop(to_shape(batch["image"], self._shape(), mode="bicubic"))
        drop = drop_condition(len(x0), hp.caption_dropout).tolist()
        if "text_tokens" in batch:  # cached in the shards (`kiln data text-embeddings`)
            cond = self.cached_text(batch, drop)
        else:
            cond = self.encode(["" if d else c for c, d in zip(batch["caption"], drop)])
        if hp.stage == "sr":
            low = self.upsampled(self.low_res(x0))
            if hp.noise_augmentation:
                low, cond["augmentation_t"] = self.augment(low, torch.rand(len(x0)) * hp.augmentation_max)
            cond["low_res"] = low
        run = self._conditioned(self.model, cond)
        losses = self.diffusion.training_losses(lambda x, t: run(x, t, cond), x0)
        self.log("train/loss", losses["loss"], prog_bar=True, sync_dist=True)
        self.log("train/mse", losses["mse"].detach())
        return losses["loss"]

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_with_warmup_cosine(self.model, hp.lr, hp.weight_decay, tuple(hp.betas), 1e-8,
                                        hp.warmup_steps, self.trainer.max_steps)

    # -- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: list[str], noise: Tensor, *, low_res: Tensor | None = None,
               augmentation_noise: Tensor | None = None, guidance_scale: float | None = None, steps: int | None = None, sampler: str | None = None,
               dynamic_threshold: float | None | Literal["config"] = "config", use_ema: bool | None = None) -> Tensor:
        """Images in [-1, 1] for `prompts` from `noise`; `low_res` (sr) at any size, noised to
        `augmentation_level` by `augmentation_noise` (default: drawn here) when the stage was trained
        with noise augmentation."""
        hp = self.hparams
        net = weights_for_sampling(self, use_ema)
        cond, uncond = self.encode(prompts), self.encode([""] * len(prompts))
        if hp.stage == "sr":
            if low_res is None:
                raise ValueError("an Imagen sr stage samples from a low-resolution image (--input, or previous_ckpt)")
            low = self.upsampled(to_shape(low_res.to(self.device), (hp.channels, hp.low_res_size, hp.low_res_size)))
            if hp.noise_augmentation:
                level = torch.full((len(prompts),), float(hp.augmentation_level))
                low, aug_t = self.augment(low, level, augmentation_noise)
                cond["augmentation_t"] = uncond["augmentation_t"] = aug_t
            cond["low_res"] = uncond["low_res"] = low
        scale = hp.guidance_scale if guidance_scale is None else guidance_scale
        model_fn = classifier_free_guidance(self._conditioned(net, cond), cond, uncond, scale, channels=hp.channels)
        threshold = hp.dynamic_threshold if dynamic_threshold == "config" else dynamic_threshold
        return self.diffusion.sample(model_fn, noise.shape, sampler=sampler or hp.sampler,
                                     steps=steps or hp.sample_steps, noise=noise.to(self.device),
                                     dynamic_threshold=threshold)

    def previous(self) -> ImagenModule:
        """The stage below (`previous_ckpt`), loaded once; not a submodule, so it stays out of
        this stage's state dict, optimiser and EMA."""
        if self._previous is None:
            if not self.hparams.previous_ckpt:
                raise ValueError("this Imagen sr stage names no previous_ckpt: give it input images instead")
            previous = load_module(self.hparams.previous_ckpt)
            if not isinstance(previous, ImagenModule) or previous.hparams.image_size != self.hparams.low_res_size:
                raise ValueError(f"previous_ckpt {self.hparams.previous_ckpt} is not an Imagen stage drawing "
                                 f"{self.hparams.low_res_size} px images")
            object.__setattr__(self, "_previous", previous.eval().to(self.device))
        return self._previous

    def _chain(self, prompts: list[str], indices: list[int], seed: int, use_ema: bool | None) -> dict[str, Tensor]:
        """Every stage's images for `prompts` (sample i's noise from (seed, i, stage) only)."""
        if self.hparams.stage == "base":
            noise, _ = self._noise([seed * 1_000_003 + i for i in indices])
            return {"base": self.sample(prompts, noise, use_ema=use_ema)}
        out = self.previous()._chain(prompts, indices, seed, use_ema)
        noise, augmentation = self._noise([seed * 1_000_003 + i + len(out) * STAGE_NOISE for i in indices])
        high = self.sample(prompts, noise, low_res=list(out.values())[-1], augmentation_noise=augmentation,
                           use_ema=use_ema)
        return out | {self.hparams.name: high}

    @torch.no_grad()
    def generate(self, num: int = 1, seed: int = 0, *, use_ema: bool | None = None, prompts: list[str] | None = None,
                 inputs: Tensor | None = None) -> Tensor | dict[str, Tensor]:
        """`kiln sample`: `num` images per prompt (or per input image, for an sr stage); a
        chain returns every stage."""
        if inputs is not None:
            if self.hparams.stage == "base":
                raise ValueError("the Imagen base stage draws from text only: --input is for sr stages")
            inputs = inputs.repeat_interleave(num, 0)
            prompts = [p for p in (prompts or [""] * (len(inputs) // num)) for _ in range(num)]
            if len(prompts) != len(inputs):
                raise ValueError(f"{len(prompts) // num} prompts for {len(inputs) // num} input images: give one per image")
            noise, augmentation = self._noise([seed * 1_000_003 + i for i in range(len(prompts))])
            return self.sample(prompts, noise, low_res=inputs, augmentation_noise=augmentation, use_ema=use_ema)
        prompts = [p for p in (prompts or [""]) for _ in range(num)]
        out = self._chain(prompts, list(range(len(prompts))), seed, use_ema)
        return out["base"] if len(out) == 1 else out

    @torch.no_grad()
    def generate_for_eval(self, indices: list[int], seed: int, *, use_ema: bool | None = None) -> Generated:
        """Sample i: pair i mod len of the labelled prompts (`eval_prompts` by class, or those
        of `use_labelled_prompts`); every stage of a chain."""
        prompts, labels = self.labelled_prompts(indices)
        out = self._chain(prompts, indices, seed, use_ema)
        if len(out) == 1:
            return {"": (out["base"], labels)}
        return {name: (images, labels) for name, images in out.items()}

    @torch.no_grad()
    def super_resolution(self, images: Tensor, prompts: list[str], seed: int = 0, *,
                         use_ema: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Real images -> (them at the output size, this stage's output from their downsampled
        version, bicubic upsampling of that same input)."""
        real = to_shape(images.to(self.device), self._shape(), mode="bicubic")
        low = self.low_res(real)
        noise, augmentation = self._noise([seed * 1_000_003 + i for i in range(len(real))])
        out = self.sample(prompts, noise, low_res=low, augmentation_noise=augmentation, use_ema=use_ema)
        return real, out, self.upsampled(low)

    @torch.no_grad()
    def sample_grid(self, *, use_ema: bool | None = None) -> Grid | None:
        hp = self.hparams
        if not hp.grid_prompts or (hp.stage == "sr" and not hp.previous_ckpt):
            return None
        out = self.generate(hp.grid_per_prompt, 0, prompts=hp.grid_prompts, use_ema=use_ema)
        images = list(out.values())[-1] if isinstance(out, dict) else out
        return Grid(images, hp.grid_per_prompt, list(hp.grid_prompts))
