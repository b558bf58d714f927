"""`kiln eval --ckpt CKPT [--metrics a,b] --out metrics.json`: judge a checkpoint on the
held-out data named in its run's config. The JSON is flat (metric name -> number), with the
same metrics of an untrained model of the same config under `<name>_untrained`.
"""
from __future__ import annotations

import json

import fsspec
import lightning as L
import torch

from kiln.trainers.args import CommandParser
from kiln.trainers.checkpoint import CheckpointError, build_from_checkpoint, family_of, load_checkpoint


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
def evaluate_generative(models: list, data: L.LightningDataModule, metrics: list[str], extractor: str = "efficientnet-lite0",
                        extractor_weights: str | None = None, judge: str | None = None, num_samples: int = 1000,
                        seed: int = 0, batch_size: int = 100) -> list[dict[str, float]]:
    """Generated samples of each model against up to `num_samples` held-out real images: FID/KID
    and precision/recall on `extractor`'s features, judge accuracy and inception score on the
    judge's logits. Sample i depends on (seed, i) only, as in the training-time GenerativeEval."""
    from kiln.modules.eval.extractors import build_extractor
    from kiln.modules.eval.judge import get_judge
    from kiln.modules.eval.metrics import FidKid, inception_score, precision_recall

    net = build_extractor(extractor, extractor_weights)
    judge_net = get_judge(judge) if judge else None
    if judge_net is None and {"judge", "is"} & set(metrics):
        raise ValueError("judge accuracy and inception score need a judge: --judge DATA_SET (e.g. fashion-mnist)")
    real = []
    for batch in data.val_dataloader():
        batch = data.on_after_batch_transfer(data.on_before_batch_transfer(batch, 0), 0)
        real.append(net(batch["image"]))
        if sum(len(r) for r in real) >= num_samples:
            break
    real = torch.cat(real)[:num_samples]
    results = []
    for model in models:
        model.eval()
        fake, logits, labels = [], [], []
        for i in range(0, num_samples, batch_size):
            images, y = model.generate_for_eval(list(range(i, min(i + batch_size, num_samples))), seed)
            fake.append(net(images))
            if judge_net is not None:
                logits.append(judge_net.logits(images))
                labels.append(y)
        fake = torch.cat(fake)
        result: dict[str, float] = {"heldout/images": float(len(real)), "samples": float(len(fake))}
        if {"fid", "kid"} & set(metrics):
            scores = FidKid(net)
            scores.update_features(real, real=True)
            scores.update_features(fake, real=False)
            result |= {k: v for k, v in scores.compute().items() if k in metrics}
        if "precision_recall" in metrics:
            result |= precision_recall(real, fake)
        if judge_net is not None:
            logits = torch.cat(logits)
            if "judge" in metrics and labels[0] is not None:
                result["judge/accuracy"] = (logits.argmax(1) == torch.cat(labels)).double().mean().item()
            if "is" in metrics:
                result["is"], result["is_std"] = inception_score(logits)
            result["judge/real_accuracy"] = float(judge_net.accuracy)
        results.append(result)
    return results


GENERATIVE = ("fid", "kid", "precision_recall", "judge", "is")
# family -> (judge metrics available, default list, evaluator)
EVALUATORS = {"clip": (("zero_shot", "retrieval"), ("zero_shot", "retrieval"), evaluate_clip)}


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
    args = parser.parse_args(argv)

    ckpt = load_checkpoint(args.ckpt)
    family = family_of(ckpt)
    try:
        model, data = build_from_checkpoint(ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"cannot judge this '{family}' checkpoint: {e}") from None
    if hasattr(model, "generate_for_eval"):
        from functools import partial

        model.sample_with_ema = not args.no_ema  # families sample through kiln.trainers.ema.weights_for_sampling
        evaluator = partial(evaluate_generative, extractor=args.extractor, extractor_weights=args.extractor_weights,
                            judge=args.judge, num_samples=args.num_samples)
        available = GENERATIVE
        default = ("fid", "kid", "precision_recall") + (("judge", "is") if args.judge else ())
    elif family in EVALUATORS:
        available, default, evaluator = EVALUATORS[family]
    else:
        raise CheckpointError(f"kiln eval has no judge for '{family}' checkpoints yet")
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
    results, *baseline = evaluator(models, data, metrics)
    for untrained in baseline:
        results |= {f"{k}_untrained": v for k, v in untrained.items() if not k.startswith("heldout/")}
    results["extractor"] = args.extractor if available is GENERATIVE else f"{family} (the checkpoint's own towers)"
    results["step"] = ckpt.get("global_step", -1)
    with fsspec.open(args.out, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    print(json.dumps({k: v for k, v in results.items() if "untrained" not in k}, sort_keys=True))
