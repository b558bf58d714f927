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


# family -> (judge metrics available, default list, evaluator)
EVALUATORS = {"clip": (("zero_shot", "retrieval"), ("zero_shot", "retrieval"), evaluate_clip)}


def main(argv: list[str]) -> None:
    parser = CommandParser(prog="kiln eval", description=__doc__)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--metrics", default=None, help="comma-separated; default: the family's judge metrics")
    parser.add_argument("--out", required=True, help="metrics JSON path or URL")
    parser.add_argument("--no-untrained", action="store_true", help="skip the untrained baseline")
    args = parser.parse_args(argv)

    ckpt = load_checkpoint(args.ckpt)
    family = family_of(ckpt)
    if family not in EVALUATORS:
        raise CheckpointError(f"kiln eval has no judge for '{family}' checkpoints yet")
    available, default, evaluator = EVALUATORS[family]
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else list(default)
    unknown = [m for m in metrics if m not in available]
    if unknown:
        raise ValueError(f"metric(s) {', '.join(unknown)} not available for a '{family}' checkpoint "
                         f"(available: {', '.join(available)})")
    model, data = build_from_checkpoint(ckpt)
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
    results["extractor"] = f"{family} (the checkpoint's own towers)"
    results["step"] = ckpt.get("global_step", -1)
    with fsspec.open(args.out, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    print(json.dumps({k: v for k, v in results.items() if "untrained" not in k}, sort_keys=True))
