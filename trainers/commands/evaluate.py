"""`kiln eval --ckpt CKPT [--metrics a,b] --out metrics.json`: judge a checkpoint on the
held-out data named in its run's config. The JSON is flat (metric name -> number), with the
same metrics of an untrained model of the same config under `<name>_untrained`.
"""
from __future__ import annotations

import json

import fsspec
import lightning as L
import torch

from kiln.modules.family import Family
from kiln.trainers.commands.args import CommandParser
from kiln.trainers.checkpoints.checkpoint import CheckpointError, build_from_checkpoint, family_of, open_run
from kiln.trainers.callbacks.progress import track


@torch.no_grad()
def evaluate_retrieval(models: list, data: L.LightningDataModule, metrics: list[str], candidates: int = 100,
                       draws: int = 100) -> list[dict[str, float]]:
    """Judge each model on the held-out set, each item once, reading the data a single time."""
    from kiln.modules.blocks.retrieval import retrieval_among_candidates, zero_shot

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
    """Each model through kiln's evaluator (`kiln.modules.eval.evaluator`, the one the training
    callback runs): its samples against up to `num_samples` held-out real images, read once.
    Sample i depends on (seed, i) only, as in training."""
    from kiln.datamodules.datasets import training_pairs
    from kiln.modules.eval.evaluator import Evaluator
    from kiln.modules.eval.extractors import build_extractor
    from kiln.modules.eval.judge import get_judge

    evaluator = Evaluator(build_extractor(extractor, extractor_weights), get_judge(judge) if judge else None, metrics,
                          num_samples, seed, batch_size, progress=lambda items, what: track(items, f"kiln eval: {what}"))
    evaluator.read_real(data.on_after_batch_transfer(data.on_before_batch_transfer(batch, 0), 0)
                        for batch in data.val_dataloader())
    if "translation" in metrics and (pairs := training_pairs(data)) is not None:
        evaluator.read_bank(pairs)
    return [evaluator(model, use_ema, f"generating (model {index + 1} of {len(models)})")
            for index, model in enumerate(models)]


GENERATIVE = ("fid", "kid", "precision_recall", "judge", "is", "l1")
TRANSLATION = ("translation", "fid", "kid")


def judge_for(data: L.LightningDataModule) -> str | None:
    """The judge of the data set a run's held-out shards come from (`kiln data <builder>`'s
    manifest), if kiln has one for it."""
    from kiln.datamodules.shards import builder_of
    from kiln.datamodules.webdataset import WebDataModule
    from kiln.modules.eval.judge import DATASETS

    name = builder_of(data.val_urls) if isinstance(data, WebDataModule) else None
    return name if name in DATASETS else None
RETRIEVAL = ("zero_shot", "retrieval")


def read_labelled_prompts(url: str) -> list[tuple[int, str]]:
    """`kiln eval --prompts FILE`: one `class index<TAB>prompt` per line (blank lines and lines
    starting with # skipped) -> [(class, prompt)]; a bad line is one error naming it."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.isfile(path):
        raise FileNotFoundError(f"prompts file not found: {url}")
    pairs = []
    with fs.open(path, "r") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            label, sep, prompt = line.partition("\t")
            if not sep or not label.strip().isdigit() or not prompt.strip():
                raise ValueError(f"{url}:{number}: expected `class index<TAB>prompt`, got {line!r}")
            pairs.append((int(label), prompt.strip()))
    if not pairs:
        raise ValueError(f"{url} holds no prompts")
    return pairs


def main(argv: list[str]) -> None:
    parser = CommandParser(prog="kiln eval", description=__doc__)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--metrics", default=None, help="comma-separated; default: the family's judge metrics")
    parser.add_argument("--out", required=True, help="metrics JSON path or URL")
    parser.add_argument("--no-untrained", action="store_true", help="skip the untrained baseline")
    parser.add_argument("--extractor", default="efficientnet-lite0",
                        help="feature network for FID/KID/precision-recall (generative families)")
    parser.add_argument("--extractor-weights", help="a weights file for the feature network")
    parser.add_argument("--judge", help="data set whose judge scores class accuracy and inception score "
                                        "(default: the data set the run was judged on, when it has a judge)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--heldout", help="score on these held-out shards (URL, brace pattern or glob) instead of "
                                          "the run's, e.g. another split of the same data")
    parser.add_argument("--no-ema", action="store_true", help="sample with the live weights, not the EMA")
    parser.add_argument("--guidance-scale", type=float, help="sampling override (families with guidance)")
    parser.add_argument("--sampler", help="sampling override, e.g. ddim, ddpm, dpmpp_2m")
    parser.add_argument("--steps", type=int, help="sampling override: sampler steps")
    parser.add_argument("--truncation", type=float, help="sampling override: GAN truncation threshold")
    parser.add_argument("--augmentation-level", type=float,
                        help="sampling override: a super-resolution stage's input noise level in [0, 1]")
    parser.add_argument("--prompts", help="judge on these prompts: a file (path or URL) of `class index<TAB>prompt` "
                                          "lines; judge/accuracy is then over them (text-to-image families)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("guidance_scale", args.guidance_scale), ("sampler", args.sampler),
                                   ("steps", args.steps), ("truncation", args.truncation),
                                   ("augmentation_level", args.augmentation_level)) if v is not None}

    ckpt, model, data = open_run(args.ckpt, "judge")
    family = family_of(ckpt)
    spec = model.spec()
    if data is None:
        raise CheckpointError(f"{args.ckpt} names no data: its run's config has no held-out set to judge on")
    data.prepare_data()  # the held-out shards, built if missing
    if args.heldout:
        from kiln.datamodules.webdataset import expand_urls

        expand_urls(args.heldout)  # a clear error, naming the URL, if it matches no shard
        data.val_urls = args.heldout
    judge = args.judge or judge_for(data)
    if spec.evaluation == "retrieval":
        available, default, evaluator = RETRIEVAL, RETRIEVAL, evaluate_retrieval
    else:
        from functools import partial

        evaluator = partial(evaluate_generative, extractor=args.extractor, extractor_weights=args.extractor_weights,
                            judge=judge, num_samples=args.num_samples, use_ema=False if args.no_ema else None)
        available = TRANSLATION if spec.evaluation == "translation" else GENERATIVE
        default = ("fid", "kid", "precision_recall") + (("judge", "is") if judge else ()) \
            + (("l1",) if spec.upsamples else ())
        if spec.upsamples and len(spec.stages) == 1:  # no cascade: judged on real inputs
            default = ("l1", "fid", "kid")
        if spec.evaluation == "translation":
            default = TRANSLATION
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else list(default)
    unknown = [m for m in metrics if m not in available]
    if unknown:
        raise ValueError(f"metric(s) {', '.join(unknown)} not available for a '{family}' checkpoint "
                         f"(available: {', '.join(available)})")
    models = [model]
    if not args.no_untrained:
        torch.manual_seed(0)
        models.append(build_from_checkpoint(ckpt, load_weights=False)[0])
    if args.prompts:
        if "prompts" not in spec.conditions:
            raise ValueError(f"--prompts is for text-to-image families; a '{family}' checkpoint takes no prompts")
        pairs = read_labelled_prompts(args.prompts)
        for m in models:
            m.use_labelled_prompts(pairs)
    for option, value in overrides.items():
        if option not in spec.options:
            raise ValueError(f"a '{family}' checkpoint has no --{option.replace('_', '-')} to override")
        for m in models:
            m.hparams[spec.options[option]] = value
    results, *baseline = evaluator(models, data, metrics)
    for untrained in baseline:
        results |= {f"{k}_untrained": v for k, v in untrained.items() if not k.startswith("heldout/")}
    results["extractor"] = args.extractor if available is not RETRIEVAL else f"{family} (the checkpoint's own towers)"
    if available is GENERATIVE:
        results["judge"] = judge
    results["step"] = ckpt.get("global_step", -1)
    if args.prompts:
        results["prompts"] = args.prompts
    results |= {f"sampling/{spec.options[k]}": v for k, v in overrides.items()}
    with fsspec.open(args.out, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    print(json.dumps({k: v for k, v in results.items() if "untrained" not in k}, sort_keys=True))
