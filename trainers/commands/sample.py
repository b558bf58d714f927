"""`kiln sample --ckpt CKPT --out DIR [conditions] [sampling options]`: write generated images as PNGs.

Conditions (what the family is asked to draw), each repeatable:
    --prompt TEXT        text-to-image families
    --class N            class-conditional families
    --input IMG          image-to-image families (and StyleGAN's projection mode)
    --label-map IMG      label map -> image (SPADE)
Sampling options, each passed only to a family that has it:
    --guidance-scale S   classifier-free guidance
    --steps N            sampler steps
    --sampler NAME       e.g. ddpm, ddim, dpmpp_2m
    --truncation T       GAN truncation
    --augmentation-level L   a super-resolution stage's input noise level in [0, 1] (Imagen)
    --mode NAME          a family's other sampling mode (e.g. `project`)
    --num N              images per condition (default 1); --seed S fixes all noise

A family takes part through its contract (kiln.modules.family): `Spec.conditions` names the
conditions it takes (`prompts`, `classes`, `inputs`, `label_maps`), `Spec.options` the sampling
settings it keeps in its hyper-parameters, `Spec.modes` its modes, and `generate(num, seed, *,
use_ema, **conditions, mode=...)` returns images in [-1, 1], (N, C, H, W) (or a dict stage ->
images for a cascade). Asking for what the family does not take is an error that lists what it
takes. Sampling uses the EMA weights when the checkpoint has them (--no-ema: the live ones).

Writes DIR/<index>-<condition>.png per image (DIR/<stage>/... per cascade stage) and DIR/grid.png.
"""
from __future__ import annotations

import re

import fsspec
import torch
from PIL import Image

from kiln.modules.family import Family
from kiln.trainers.commands.args import CommandParser
from kiln.trainers.checkpoints.checkpoint import CheckpointError, open_run
from kiln.trainers.callbacks.progress import working
from kiln.trainers.callbacks.samples import grid_image

# option on the command line -> what it is to the family: a condition of `generate`, a sampling
# setting of `Spec.options`, or the mode
OPTIONS = {"prompt": "prompts", "class_": "classes", "input": "inputs", "label_map": "label_maps",
           "guidance_scale": "guidance_scale", "steps": "steps", "sampler": "sampler",
           "truncation": "truncation", "augmentation_level": "augmentation_level", "mode": "mode"}


def _flag(keyword: str) -> str:
    option = next(k for k, v in OPTIONS.items() if v == keyword)
    return "--" + option.rstrip("_").replace("_", "-")


def _read_image(url: str) -> torch.Tensor:
    """An image file -> (C, H, W) in [-1, 1]; grey stays one channel."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.isfile(path):
        raise FileNotFoundError(f"input image not found: {url}")
    with fs.open(path, "rb") as f:
        image = Image.open(f)
        image = image.convert("L" if image.mode in ("1", "L", "I;16") else "RGB")
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    c = 1 if image.mode == "L" else 3
    return pixels.view(image.height, image.width, c).permute(2, 0, 1).float() / 127.5 - 1


def _read_label_map(url: str) -> torch.Tensor:
    """A label map stored as a grey PNG (pixel value = label) -> (H, W) int64."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.isfile(path):
        raise FileNotFoundError(f"label map not found: {url}")
    with fs.open(path, "rb") as f:
        image = Image.open(f)
        if image.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"{url} is not a label map (mode {image.mode}; expected one channel of label ids)")
        return torch.tensor(list(image.getdata()), dtype=torch.int64).view(image.height, image.width)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "x"


def check_options(model: Family, given: dict) -> None:
    """One line naming what the family cannot do and what it can."""
    spec = model.spec()
    if not spec.generates:
        raise CheckpointError(f"a '{spec.name}' checkpoint does not generate images: nothing to sample")
    accepted = {*spec.conditions, *spec.options, *(("mode",) if spec.modes else ())}
    unknown = [k for k in given if k not in accepted]
    if unknown:
        takes = ", ".join(_flag(k) for k in OPTIONS.values() if k in accepted) or "no options"
        raise ValueError(f"the '{spec.name}' family does not take {', '.join(_flag(k) for k in unknown)} (it takes: {takes})")


def conditions_of(given: dict, num: int) -> list[str]:
    """A name per generated image, for its file name: the condition it was drawn for."""
    for key in ("prompts", "classes", "inputs", "label_maps"):
        if key in given:
            names = [_slug(str(c)) if key != "inputs" and key != "label_maps" else _slug(c.rsplit("/", 1)[-1].rsplit(".", 1)[0])
                     for c in given[key]]
            return [name for name in names for _ in range(num)]
    return ["sample"] * num


def write_images(images: torch.Tensor, names: list[str], out: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    written = []
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    for i, (image, name) in enumerate(zip(pixels, names)):
        array = image.permute(1, 2, 0).numpy()
        pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        path = f"{root.rstrip('/')}/{i:04d}-{name}.png"
        with fs.open(path, "wb") as f:
            pil.save(f, format="PNG")
        written.append(path)
    with fs.open(f"{root.rstrip('/')}/grid.png", "wb") as f:
        grid_image(images, nrow=min(len(images), 8)).save(f, format="PNG")
    return written


def main(argv: list[str]) -> None:
    parser = CommandParser(prog="kiln sample", description=__doc__)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True, help="folder (path or URL) for the PNGs")
    parser.add_argument("--prompt", action="append", help="a text prompt (repeatable)")
    parser.add_argument("--class", dest="class_", action="append", type=int, help="a class index (repeatable)")
    parser.add_argument("--input", action="append", help="an input image (repeatable)")
    parser.add_argument("--label-map", action="append", help="a label-map PNG (repeatable)")
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--sampler")
    parser.add_argument("--truncation", type=float)
    parser.add_argument("--augmentation-level", type=float)
    parser.add_argument("--mode")
    parser.add_argument("--num", type=int, default=1, help="images per condition")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ema", action="store_true", help="sample with the live weights, not the EMA")
    args = parser.parse_args(argv)
    if args.num < 1:
        raise ValueError(f"--num must be at least 1, got {args.num}")

    given = {OPTIONS[k]: v for k, v in vars(args).items() if k in OPTIONS and v is not None}
    _, model, _ = open_run(args.ckpt, "sample from")
    check_options(model, given)
    names = conditions_of(given, args.num)
    if "inputs" in given:
        given["inputs"] = torch.stack([_read_image(u) for u in given["inputs"]])
    if "label_maps" in given:
        given["label_maps"] = torch.stack([_read_label_map(u) for u in given["label_maps"]])
    settings = model.spec().options
    for option in [k for k in given if k in settings]:
        model.hparams[settings[option]] = given.pop(option)
    model.eval()
    with torch.no_grad(), working(f"kiln sample: generating {len(names)} image{'s' if len(names) != 1 else ''}"):
        images = model.generate(args.num, args.seed, use_ema=False if args.no_ema else None, **given)
    stages = images if isinstance(images, dict) else {"": images}
    for stage, batch in stages.items():
        out = f"{args.out.rstrip('/')}/{stage}" if stage else args.out
        written = write_images(batch, names, out)
        print(f"{len(written)} images ({tuple(batch.shape[1:])}) -> {out}")
