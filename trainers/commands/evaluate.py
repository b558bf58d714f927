"""`kiln eval --ckpt CKPT [--metrics a,b] --out metrics.json`: judge a checkpoint on the
held-out data named in its run's config. The JSON is flat (metric name -> number), with the
same metrics of an untrained model of the same config under `<name>_untrained`.
"""
from __future__ import annotations

import functools
import json

import fsspec
import lightning as L
import torch

from kiln.modules.family import Family
from kiln.trainers.commands.args import CommandParser
from kiln.trainers.checkpoints.checkpoint import CheckpointError, build_from_checkpoint, family_of, load_checkpoint
from kiln.trainers.callbacks.progress import track


@torch.no_grad()
def evaluate_clip(models: list, data: L.LightningDataModule, metrics: list[str], candidates: int = 100,
                  draws: int = 100) -> list[dict[str, float]]:
    """Judge each model on the held-out set, each item once, reading the data a single time."""
    from kiln.modules.clip.evaluation import retrieval_among_candidates, zero_shot

    for model in models:
        model.eval()
    pairs: list[list[tuple]] = [[] for _ in models]
    seen: set[str] = set()
    for batch in data.val_dataloader():
        # What Lightning does to each batch on its way to the model (uint8 images to float).
        batch = data.on_after_batch_transfer(data.on_before_batch_transfer(batch, 0), 0)
        keep = [i for i, k in enumerate(batch["key"]) if k not in seen]
        seen.update(batch["key"])
        for model, out in zip(models, pairs):
            out.append(model.embed(batch["image"][keep], [batch["caption"][j] for j in keep]))
    results = []
    for out in pairs:
        image, text = torch.cat([p[0] for p in out]), torch.cat([p[1] for p in out])
        result: dict[str, float] = {"heldout/pairs": float(len(image))}
        if "zero_shot" in metrics:
            result |= zero_shot(image, text)
        if "retrieval" in metrics:
            result |= retrieval_among_candidates(image, text, candidates, draws)
        results.append(result)
    return results


@torch.no_grad()
def evaluate_generative(models: list[Family], data: L.LightningDataModule, metrics: list[str],
                        extractor: str = "efficientnet-lite0", extractor_weights: str | None = None,
                        judge: str | None = None, num_samples: int = 1000, seed: int = 0, batch_size: int = 100,
                        use_ema: bool | None = None) -> list[dict[str, float]]:
    """Generated samples of each model against up to `num_samples` held-out real images: FID/KID
    and precision/recall on `extractor`'s features, judge accuracy and inception score on the
    judge's logits, each for every stage of a cascade (`<stage>/fid`, ...), and for an upsampler
    the L1 of its output and of bicubic upsampling to the real images (`l1`, `l1_baseline`).
    Sample i depends on (seed, i) only, as in the training-time GenerativeEval."""
    from kiln.modules.eval.extractors import build_extractor
    from kiln.modules.eval.judge import get_judge
    from kiln.modules.eval.metrics import FidKid, class_spread, inception_score, precision_recall
    from kiln.trainers.callbacks.judging import resize_like

    net = build_extractor(extractor, extractor_weights)
    judge_net = get_judge(judge) if judge else None
    if judge_net is None and {"judge", "is"} & set(metrics):
        raise ValueError("judge accuracy and inception score need a judge: --judge DATA_SET (e.g. fashion-mnist)")
    real_images, captions = [], []
    for batch in data.val_dataloader():
        batch = data.on_after_batch_transfer(data.on_before_batch_transfer(batch, 0), 0)
        real_images.append(batch["image"])
        captions += list(batch.get("caption", [""] * len(batch["image"])))
        if sum(len(r) for r in real_images) >= num_samples:
            break
    real_images, captions = torch.cat(real_images)[:num_samples], captions[:num_samples]
    real_features: dict[tuple, torch.Tensor] = {}  # per stage shape

    def real(shape: tuple) -> torch.Tensor:
        if shape not in real_features:
            real_features[shape] = torch.cat([net(resize_like(real_images[i:i + batch_size], shape))
                                              for i in range(0, len(real_images), batch_size)])
        return real_features[shape]

    @functools.cache
    def real_spread() -> float:
        """The judge's per-class feature spread of the real held-out images, each class being
        what the judge reads (it is right `judge_net.accuracy` of the time): the reference for
        `judge/diversity`."""
        parts = [judge_net.features_and_logits(real_images[i:i + batch_size])
                 for i in range(0, len(real_images), batch_size)]
        return class_spread(torch.cat([f for f, _ in parts]), torch.cat([lg for _, lg in parts]).argmax(1))

    results = []
    for index, model in enumerate(models):
        spec = model.spec()
        if "l1" in metrics and not spec.upsamples:
            raise ValueError(f"l1 is for upsamplers: this '{spec.name}' model does not upsample")
        model.eval()
        fake: dict[str, list] = {}
        # An upsampler without the stages before it has nothing to generate from: it is judged on real inputs.
        cascade = not spec.upsamples or len(spec.stages) > 1
        generated = cascade and set(metrics) & {"fid", "kid", "precision_recall", "judge", "is"}
        for i in track(range(0, num_samples if generated else 0, batch_size),
                       f"kiln eval: generating (model {index + 1} of {len(models)})"):
            out = model.generate_for_eval(list(range(i, min(i + batch_size, num_samples))), seed, use_ema=use_ema)
            for stage, (images, y) in out.items():
                judged = judge_net.features_and_logits(images) if judge_net is not None else None
                fake.setdefault(stage, []).append((images.shape[1:], net(images), judged, y))
        result: dict[str, float] = {"heldout/images": float(len(real_images))}
        for stage, parts in fake.items():
            prefix = f"{stage}/" if stage else ""
            features = torch.cat([p[1] for p in parts])
            result[f"{prefix}samples"] = float(len(features))
            reference = real(tuple(parts[0][0]))
            if {"fid", "kid"} & set(metrics):
                scores = FidKid(net)
                scores.update_features(reference, real=True)
                scores.update_features(features, real=False)
                result |= {f"{prefix}{k}": v for k, v in scores.compute().items() if k in metrics}
            if "precision_recall" in metrics:
                result |= {f"{prefix}{k}": v for k, v in precision_recall(reference, features).items()}
            if judge_net is not None:
                logits = torch.cat([p[2][1] for p in parts])
                if "judge" in metrics and parts[0][3] is not None:
                    labels = torch.cat([p[3] for p in parts])
                    result[f"{prefix}judge/accuracy"] = (logits.argmax(1) == labels).double().mean().item()
                    # Diversity within each class asked for, relative to real images (1: as varied).
                    spread = class_spread(torch.cat([p[2][0] for p in parts]), labels)
                    result[f"{prefix}judge/diversity"] = spread / real_spread()
                if "is" in metrics:
                    result[f"{prefix}is"], result[f"{prefix}is_std"] = inception_score(logits)
                result[f"{prefix}judge/real_accuracy"] = float(judge_net.accuracy)
        if spec.upsamples and ("l1" in metrics or not generated):
            result |= super_resolution_scores(model, real_images, captions, metrics, net, seed, batch_size, use_ema)
        results.append(result)
    return results


@torch.no_grad()
def super_resolution_scores(model: Family, real_images: torch.Tensor, captions: list[str], metrics: list[str], net,
                            seed: int, batch_size: int, use_ema: bool | None = None) -> dict[str, float]:
    """An upsampler on the held-out images brought down to its input size: mean L1 to the real
    images of its output (`l1`) and of bicubic upsampling (`l1_baseline`); with "fid"/"kid" in
    `metrics`, the same pair of distribution scores (`fid`, `fid_baseline`, ...)."""
    from kiln.modules.eval.metrics import FidKid

    l1 = torch.zeros(2, dtype=torch.float64)
    scores = {"": FidKid(net), "_baseline": FidKid(net)}
    for i in track(range(0, len(real_images), batch_size), "kiln eval: upsampling the held-out images"):
        real, out, bicubic = model.super_resolution(real_images[i:i + batch_size], captions[i:i + batch_size], seed + i,
                                                    use_ema=use_ema)
        l1 += torch.tensor([(out - real).abs().mean(dim=(1, 2, 3)).sum().item(),
                            (bicubic - real).abs().mean(dim=(1, 2, 3)).sum().item()], dtype=torch.float64)
        if {"fid", "kid"} & set(metrics):
            for suffix, images in (("", out), ("_baseline", bicubic)):
                scores[suffix].update(real, real=True)
                scores[suffix].update(images, real=False)
    result = {"l1": l1[0].item() / len(real_images), "l1_baseline": l1[1].item() / len(real_images)}
    if {"fid", "kid"} & set(metrics):
        for suffix, metric in scores.items():
            result |= {f"{k}{suffix}": v for k, v in metric.compute().items() if k in metrics}
    return result


GENERATIVE = ("fid", "kid", "precision_recall", "judge", "is", "l1")
RETRIEVAL = ("zero_shot", "retrieval")


def main(argv: list[str]) -> None:
    parser = CommandParser(prog="kiln eval", description=__doc__)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--metrics", default=None, help="comma-separated; default: the family's judge metrics")
    parser.add_argument("--out", required=True, help="metrics JSON path or URL")
    parser.add_argument("--no-untrained", action="store_true", help="skip the untrained baseline")
    parser.add_argument("--extractor", default="efficientnet-lite0",
                        help="feature network for FID/KID/precision-recall (generative families)")
    parser.add_argument("--extractor-weights", help="a weights file for the feature network")
    parser.add_argument("--judge", help="data set whose judge scores class accuracy and inception score")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--no-ema", action="store_true", help="sample with the live weights, not the EMA")
    parser.add_argument("--guidance-scale", type=float, help="sampling override (families with guidance)")
    parser.add_argument("--sampler", help="sampling override, e.g. ddim, ddpm, dpmpp_2m")
    parser.add_argument("--steps", type=int, help="sampling override: sampler steps")
    parser.add_argument("--truncation", type=float, help="sampling override: GAN truncation threshold")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("guidance_scale", args.guidance_scale), ("sampler", args.sampler),
                                   ("steps", args.steps), ("truncation", args.truncation)) if v is not None}

    ckpt = load_checkpoint(args.ckpt)
    family = family_of(ckpt)
    try:
        model, data = build_from_checkpoint(ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"cannot judge this '{family}' checkpoint: {e}") from None
    spec = model.spec()
    if spec.evaluation == "retrieval":
        available, default, evaluator = RETRIEVAL, RETRIEVAL, evaluate_clip
    else:
        from functools import partial

        evaluator = partial(evaluate_generative, extractor=args.extractor, extractor_weights=args.extractor_weights,
                            judge=args.judge, num_samples=args.num_samples, use_ema=not args.no_ema)
        available = GENERATIVE
        default = ("fid", "kid", "precision_recall") + (("judge", "is") if args.judge else ()) \
            + (("l1",) if spec.upsamples else ())
        if spec.upsamples and len(spec.stages) == 1:  # no cascade: judged on real inputs
            default = ("l1", "fid", "kid")
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else list(default)
    unknown = [m for m in metrics if m not in available]
    if unknown:
        raise ValueError(f"metric(s) {', '.join(unknown)} not available for a '{family}' checkpoint "
                         f"(available: {', '.join(available)})")
    if data is None:
        raise CheckpointError(f"{args.ckpt} names no data: its run's config has no held-out set to judge on")
    data.prepare_data()
    models = [model]
    if not args.no_untrained:
        torch.manual_seed(0)
        models.append(build_from_checkpoint(ckpt, load_weights=False)[0])
    for option, value in overrides.items():
        if option not in spec.options:
            raise ValueError(f"a '{family}' checkpoint has no --{option.replace('_', '-')} to override")
        for m in models:
            m.hparams[spec.options[option]] = value
    results, *baseline = evaluator(models, data, metrics)
    for untrained in baseline:
        results |= {f"{k}_untrained": v for k, v in untrained.items() if not k.startswith("heldout/")}
    results["extractor"] = args.extractor if available is GENERATIVE else f"{family} (the checkpoint's own towers)"
    results["step"] = ckpt.get("global_step", -1)
    results |= {f"sampling/{spec.options[k]}": v for k, v in overrides.items()}
    with fsspec.open(args.out, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    print(json.dumps({k: v for k, v in results.items() if "untrained" not in k}, sort_keys=True))
