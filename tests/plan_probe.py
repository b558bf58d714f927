"""What a training run really holds per rank, for checking `kiln plan` against: a few real
training steps of a config on the ranks torchrun started, each rank's peak of live bytes
written as JSON.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/plan_probe.py OUT CASES_JSON

CASES_JSON is a list of {"name", "configs", "micro_batch", "steps"}; each case builds the family
and the strategy from its configs (as `kiln plan` reads them), runs `steps` optimizer steps on
synthetic batches of the family's inputs at the micro-batch, and rank r writes OUT/<r>.json:
{name: {"peak": bytes, "device": ...}, ...}. A case that fails to run writes {"error": one line}.

How the peak is measured: on CUDA, `torch.cuda.max_memory_allocated` over the case (less what was
allocated before it). On the CPU, torch.profiler with `profile_memory=True` is on from before the
module is built to after the fit: the CPU allocator reports every allocation and free made while
it is on as an Allocation event (`alloc_size` > 0 or < 0, with its pointer) in the profiler's event
tree (`kineto_results.experimental_event_tree()`); their running sum in time order is the live
bytes, and its maximum the peak. Frees of blocks allocated before the case (a block of an earlier
case) are left out, as the allocator itself leaves out blocks it never saw. (torch 2.13's
`MemoryProfile` / `export_memory_timeline` builds the same curve and adds categories, but it
also needs `with_stack` and `record_shapes`, which make a whole fit several times slower; the
plain sum is what its timeline totals to.) Synthetic data keeps each case to seconds: the
family's own `training_step`, optimizers, EMA callback and strategy run unchanged.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import lightning as L
import torch


def synthetic_batch(module, n: int, step: int) -> dict:
    """A batch as the family's data module hands it over (images in [-1, 1]); captions long enough
    to fill the text context, as `kiln plan` assumes."""
    hp = module.hparams
    g = torch.Generator().manual_seed(step)
    if module.spec().name == "clip":
        size, channels = hp.vision["image_size"], 3
    else:
        size, channels = hp.image_size, hp.channels
    batch = {"image": torch.rand(n, channels, size, size, generator=g) * 2 - 1}
    if module.spec().name in ("clip", "glide"):
        batch["caption"] = [f"caption {step} {i} " + "long words " * 40 for i in range(n)]
    else:
        batch["label"] = torch.randint(0, getattr(hp, "num_classes", 10), (n,), generator=g)
    return batch


class _Batches(torch.utils.data.IterableDataset):
    def __init__(self, module, n: int, steps: int):
        self.module, self.n, self.steps = module, n, steps

    def __iter__(self):
        for step in range(self.steps):
            yield synthetic_batch(self.module, self.n, step)


class _SetupGarbage(L.Callback):
    """Collects what setting up left for Python's collector (DDP's flattened copy of the weights
    sat in a reference cycle until a collection at a moment of the collector's choosing, so a
    rank's peak swung by one copy of the weights from run to run): the peak is training's."""

    def on_train_start(self, trainer, pl_module) -> None:
        gc.collect()


def run_case(case: dict) -> None:
    """One case's training steps (module, EMA and strategy as `kiln fit` builds them)."""
    from lightning.pytorch.strategies import Strategy

    from kiln.trainers.checkpoints.checkpoint import _instantiate
    from kiln.trainers.commands.plan import load_config
    from kiln.trainers.strategies import for_module

    config = load_config(case["configs"])
    L.seed_everything(0, verbose=False)
    module = _instantiate(config["model"], L.LightningModule)
    trainer_cfg = config.get("trainer", {})
    callbacks = [_SetupGarbage(), *(_instantiate(c, L.Callback) for c in trainer_cfg.get("callbacks") or []
                                    if c["class_path"].endswith("ema.EMA"))]
    strategy = trainer_cfg.get("strategy", "ddp")
    strategy = _instantiate(strategy, Strategy) if isinstance(strategy, dict) else strategy
    ranks = int(os.environ["LOCAL_WORLD_SIZE"])
    trainer = L.Trainer(
        accelerator=_accelerator(), devices=ranks, strategy=for_module(strategy, module, _accelerator(), ranks),
        max_steps=case["steps"], callbacks=callbacks,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
    )
    loader = torch.utils.data.DataLoader(_Batches(module, case["micro_batch"], case["steps"]), batch_size=None)
    trainer.fit(module, loader)


def _accelerator() -> str:
    """CUDA where every rank has a GPU of its own, else the CPU."""
    return "cuda" if torch.cuda.device_count() >= int(os.environ["LOCAL_WORLD_SIZE"]) else "cpu"


def cpu_peak(prof) -> int:
    """The peak of live bytes from the profiler's CPU Allocation events (see the module docstring)."""
    from torch._C._profiler import _EventType

    allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.typed[0] == _EventType.Allocation and event.typed[1].device.type == "cpu":
            allocations.append((event.start_time_ns, event.typed[1].ptr, event.typed[1].alloc_size))
    live, peak, sizes = 0, 0, {}
    for _, ptr, size in sorted(allocations, key=lambda a: a[0]):
        if size > 0:
            sizes[ptr] = size
        elif sizes.pop(ptr, None) is None:
            continue  # allocated before this case
        live += size
        peak = max(peak, live)
    return peak


def measure(case: dict) -> dict:
    gc.collect()
    start = time.perf_counter()
    if _accelerator() == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_case(case)
        peak, device = torch.cuda.max_memory_allocated() - before, torch.cuda.get_device_name()
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run_case(case)
        peak, device = cpu_peak(prof), "cpu"
    return {"peak": peak, "device": device, "seconds": round(time.perf_counter() - start, 1)}


def main(out: str, cases: str) -> None:
    rank = int(os.environ["RANK"])
    results = {}
    for case in json.loads(cases):
        try:
            results[case["name"]] = measure(case)
        except Exception as e:  # reported per case: the others still run
            traceback.print_exc()
            results[case["name"]] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, f"{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:3])
