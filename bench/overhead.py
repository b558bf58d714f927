"""Framework overhead: a training step under `kiln fit` against a bare PyTorch loop on the same
model, batch and optimizer.

    python3 bench/overhead.py [--models clip,glide] [--steps 40] [--warmup 5] [--rounds 3] [--threads 2] [--write]
    python3 bench/overhead.py --profile          # where kiln's step spends its time (cProfile, torch.profiler)
    python3 bench/overhead.py --device cuda --precision bf16-mixed   # on a GPU (bench/gpu.sh)

A benchmark, not a test: it asserts nothing. For each model (a family's tiny config, as is):

* kiln: `kiln fit -c configs/<family>/tiny.yaml` through kiln's own entry point
  (`kiln.trainers.cli.main`), so the Trainer, strategy, loggers (metrics.jsonl, offline W&B),
  callbacks (run directory, last-checkpoint, data metrics, preemption, RNG state, sample grid,
  rich progress bar, and the config's own, e.g. EMA) are those of a default run. Only the data
  differs: `InMemoryData` below hands Lightning the same in-memory batch at every step, and the
  config's sample-grid prompts are emptied so that the end of the run draws no grid (outside the
  timed steps anyway).
* bare: the same LightningModule class built from the same config and seed, driven by hand:
  zero_grad, the family's loss (the arithmetic of its `training_step`, without `self.log`),
  backward, the module's own optimizer and LR schedule (`configure_optimizers`), and its
  `on_train_batch_end` (CLIP clamps its temperature there). No EMA: a bare loop does forward,
  loss, backward and step; the EMA update kiln's run does is timed on its own and reported.

The batch is one real batch of the config's data (built once, images already float), saved to a
temporary file that both sides load. A step's time is the time between consecutive step ends
(kiln: `on_train_batch_end`; bare: the loop), so on kiln's side it holds everything Lightning does
per step. Every run is a fresh process; the sides alternate (kiln, bare, kiln, ...) and each round's
ratio compares that round's two runs, from median step times on CPU. Both sides: the same
`torch.set_num_threads`, OMP_NUM_THREADS and the process settings `kiln` makes for itself (launch/host.py:
OMP_WAIT_POLICY=PASSIVE, glibc malloc thresholds). On CUDA
only the timed window's two ends wait for the GPU (`torch.cuda.synchronize`), so the host runs
ahead as in training, a step's own time is not the GPU's, and the ratio is from mean step times
(the window's length); a side that waits for the GPU inside a step (reading a loss for a progress
bar, say) pays for it there.

--write replaces the "Framework overhead" section of BENCHMARKS.md and leaves
bench/results/overhead.json (bench/README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import lightning as L

from common import (REPO, alternate, load1, meta_lines, parse_args, peak_rss_mib, rss_mib, run_child, run_meta, save,
                    spread, sync, versions)
from instruments import PHASES, Marks, rusage_counters, thread_cpu, thread_split

SECTION = "## Framework overhead"
CONFIGS = {"clip": "configs/clip/tiny.yaml", "glide": "configs/glide/tiny.yaml"}
SIDES = ("kiln", "bare")
HEADLINE = {True: "median", False: "mean"}  # on CPU (True) the ratio of median step times; on a GPU, of means


# -- the bare loop --------------------------------------------------------------------------------

def _loss_clip(module, batch):
    from kiln.modules.clip.loss import clip_loss

    image, text, scale = module.model(batch["image"], module.tokenize(batch["caption"]))
    return clip_loss(image, text, scale, None, 0)


def _loss_glide(module, batch):
    from kiln.modules.blocks.diffusion import drop_condition

    x0 = module._images(batch["image"])
    drop = drop_condition(len(x0), module.hparams.caption_dropout).tolist()
    tokens = module.tokenize(["" if d else c for c, d in zip(batch["caption"], drop)])
    low = module.upsampled(module.low_res(x0)) if module.hparams.stage == "upsampler" else None
    return module.diffusion.training_losses(lambda x, t: module.model(x, t, tokens, low), x0)["loss"]


LOSSES = {"clip": _loss_clip, "glide": _loss_glide}


def _config(model: str) -> dict:
    import yaml

    with open(os.path.join(REPO, CONFIGS[model]), encoding="utf-8") as f:
        return yaml.safe_load(f)


def _module_from_config(config: dict):
    import importlib

    path = config["model"]["class_path"]
    cls = getattr(importlib.import_module(path.rsplit(".", 1)[0]), path.rsplit(".", 1)[1])
    return cls(**config["model"].get("init_args", {}))


def _ema_callbacks(config: dict) -> list[dict]:
    return [c for c in config.get("trainer", {}).get("callbacks", []) or []
            if c.get("class_path", "").endswith(".EMA")]


def run_bare(spec: dict) -> dict:
    import copy
    from types import SimpleNamespace

    import torch

    config = _config(spec["model"])
    L.seed_everything(0, verbose=False)  # as `kiln fit` (seed_everything_default=0) before building
    module = _module_from_config(config)
    L.seed_everything(0, verbose=False)  # kiln's RandomState (trainers/callbacks/rng.py) re-seeds at setup, after the build
    device = torch.device(spec["device"])
    module.to(device).train()
    batch = torch.load(spec["batch"], weights_only=True)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    total = spec["warmup"] + spec["steps"] + 1
    module.trainer = SimpleNamespace(max_steps=total, world_size=1)  # what configure_optimizers reads
    opt_config = module.configure_optimizers()
    module.trainer = None
    optimizer, scheduler = opt_config["optimizer"], opt_config["lr_scheduler"]["scheduler"]
    loss_fn = LOSSES[spec["model"]]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if spec["precision"] == "bf16-mixed"
                else torch.autocast(device.type, enabled=False))
    rss_before = rss_mib()
    wall, cpu, loss0, marks = [], [], None, Marks()
    for i in range(total):
        marks.mark("start")
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(module, batch)
        marks.mark("backward")
        loss.backward()
        marks.mark("update")
        optimizer.step()
        scheduler.step()
        module.on_train_batch_end(loss, batch, i)
        if i in (spec["warmup"], spec["warmup"] + spec["steps"]):
            sync(spec["device"])
        marks.mark("end")
        wall.append(time.perf_counter())
        cpu.append(time.process_time())
        if loss0 is None:
            loss0 = float(loss)
        if i == spec["warmup"]:
            threads_before, rusage_before = thread_cpu(), rusage_counters()
    split = thread_split(threads_before, thread_cpu())
    rusage = [(a - b) / spec["steps"] for a, b in zip(rusage_counters(), rusage_before)]
    out = {"stamps_wall": wall, "stamps_cpu": cpu, "loss0": loss0, "rss_before_step_mib": rss_before,
           "thread_cpu_s": split, "phases": marks.phases(spec["warmup"]), "rusage_per_step": rusage,
           "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads()}
    if _ema_callbacks(config):  # what kiln's EMA callback adds per step, timed alone
        from kiln.trainers.callbacks.ema import _local

        network = getattr(module, getattr(module, "ema_target", "model"))
        ema = copy.deepcopy(network).requires_grad_(False)
        averages = [_local(p) for p in ema.parameters()]
        weights = [_local(p) for p in network.parameters()]
        times = []
        for _ in range(20):
            start = time.perf_counter()
            torch._foreach_lerp_(averages, weights, 0.01)
            for a, b in zip(ema.buffers(), network.buffers()):
                _local(a).copy_(_local(b))
            sync(spec["device"])
            times.append(time.perf_counter() - start)
        out["ema_update_s"] = statistics.median(times)
    out["params"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return out


def run_kiln(spec: dict) -> dict:
    import yaml

    config = _config(spec["model"])
    total = spec["warmup"] + spec["steps"] + 1
    clock = os.path.join(spec["tmp"], f"clock-{spec['model']}-{os.getpid()}.json")
    config["data"] = {"class_path": "instruments.InMemoryData", "init_args": {"path": spec["batch"], "steps": total}}
    trainer = config.setdefault("trainer", {})
    trainer["max_steps"] = total
    trainer.pop("max_time", None)  # a time limit must not end the timed steps early
    callbacks = list(trainer.get("callbacks") or [])
    trainer["callbacks"] = callbacks + [{"class_path": "instruments.StepClock",
                                         "init_args": {"out": clock, "warmup": spec["warmup"],
                                                                       "steps": spec["steps"], "device": spec["device"]}}]
    if spec["device"] != "cpu":
        trainer.update(accelerator="gpu", devices=1)
    if spec["precision"] != "32":
        trainer["precision"] = spec["precision"]
    if "grid_prompts" in config["model"].get("init_args", {}):
        config["model"]["init_args"]["grid_prompts"] = []
    path = os.path.join(spec["tmp"], f"{spec['model']}-{os.getpid()}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f)
    from kiln.trainers.cli import main as kiln

    argv = ["fit", "-c", path, "--run_dir", os.path.join(spec["tmp"], f"run-{spec['model']}-{os.getpid()}")]
    if spec.get("wandb"):
        argv += ["--wandb.mode", spec["wandb"]]
    kiln(argv)
    with open(clock, encoding="utf-8") as f:
        out = json.load(f)
    out["ema_callbacks"] = [c["class_path"].rsplit(".", 1)[1] + str(c.get("init_args", {})) for c in callbacks]
    return out


def run_side(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["mode"] == "prepare":
        return prepare(spec)
    if spec["mode"] == "profile":
        return profile_side(spec)
    out = run_kiln(spec) if spec["side"] == "kiln" else run_bare(spec)
    wall, cpu = out.pop("stamps_wall"), out.pop("stamps_cpu")
    skip = spec["warmup"]
    out["wall_s"] = [b - a for a, b in zip(wall[skip:], wall[skip + 1:])]
    out["cpu_s"] = [b - a for a, b in zip(cpu[skip:], cpu[skip + 1:])]
    return out | {"side": spec["side"], "model": spec["model"]}


def prepare(spec: dict) -> dict:
    """One real batch of the config's data, images as float (what the module receives), saved;
    with `synthetic`, random images and captions of the same shapes (where the data is not at hand)."""
    import importlib

    import torch

    config = _config(spec["model"])
    data = config["data"]
    if spec.get("synthetic"):
        module = _module_from_config(config)
        hp = module.hparams
        size = hp["vision"]["image_size"] if "vision" in hp else hp["image_size"]
        n = data["init_args"]["batch_size"]
        g = torch.Generator().manual_seed(1)
        batch = {"image": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
                 "caption": [f"emoji number {i}: a small picture" for i in range(n)]}
        torch.save(batch, spec["batch"])
        return {"keys": sorted(batch), "image": list(batch["image"].shape), "captions": n, "synthetic": True}
    init = dict(data.get("init_args", {}), num_workers=0)
    mapper = init.get("mapper")
    if isinstance(mapper, dict):
        mod, name = mapper["class_path"].rsplit(".", 1)
        init["mapper"] = getattr(importlib.import_module(mod), name)(**mapper.get("init_args", {}))
    mod, name = data["class_path"].rsplit(".", 1)
    dm = getattr(importlib.import_module(mod), name)(**init)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    batch = dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0)
    batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) or k == "caption"}
    torch.save(batch, spec["batch"])
    return {"keys": sorted(batch), "image": list(batch["image"].shape), "captions": len(batch["caption"])}


# -- profile --------------------------------------------------------------------------------------

def profile_side(spec: dict) -> dict:
    """kiln: cProfile over `kiln fit` (Python time by function) and the per-step decomposition
    below. With `torch_ops`, both sides also get torch.profiler's self CPU time by op, to show
    they run the same kernels."""
    import contextlib
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    ops = profile(activities=[ProfilerActivity.CPU]) if spec.get("torch_ops") else contextlib.nullcontext()
    total = spec["steps"] + spec["warmup"] + 1
    if spec["side"] == "bare":
        with ops as prof:
            run_bare(spec)
        return {"ops": _top_ops(prof, total) if prof else []}
    import time as _time

    # CPU time of the whole process (every thread) as the clock: the other jobs on the cores slow the
    # wall clock of multi-threaded kernels and of single-threaded Python differently, CPU time hardly.
    profiler = cProfile.Profile(_time.process_time)
    with ops as prof:
        profiler.enable()
        run_kiln(spec)
        profiler.disable()
    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer)
    stats.sort_stats("cumulative").print_stats(r"(lightning|kiln|trainers|modules|torch/optim|rich|wandb)", 45)
    stats.sort_stats("tottime").print_stats(25)
    return {"ops": _top_ops(prof, total) if prof else [], "cprofile": buffer.getvalue(),
            "decomposition": _decompose(stats)}


def _decompose(stats) -> dict[str, float]:
    """CPU seconds per training step (cumulative times from cProfile with a process-CPU clock,
    over every step it saw) of what a `kiln fit` step is made of."""
    def cum(path: str, name: str) -> tuple[float, int]:
        hits = [(v[3], v[1]) for (f, _, n), v in stats.stats.items() if f.endswith(path) and n == name]
        return sum(h[0] for h in hits), sum(h[1] for h in hits)

    step, steps = cum("loops/training_epoch_loop.py", "advance")
    if not steps:
        return {}
    optimizer_step = cum("loops/optimization/automatic.py", "_optimizer_step")[0]
    closure = cum("loops/optimization/automatic.py", "closure")[0]
    training_step = sum(v[3] for (f, _, n), v in stats.stats.items()
                        if n == "training_step" and f.endswith("lit_module.py"))
    log = cum("pytorch/core/module.py", "log")[0]
    backward = sum(v[3] for (f, _, n), v in stats.stats.items() if n.startswith("<method 'run_backward'"))
    adam = sum(v[3] for (f, _, n), v in stats.stats.items()
               if n == "step" and "torch/optim/" in f and "lr_scheduler" not in f)
    ema = cum("trainers/callbacks/ema.py", "on_train_batch_end")[0]
    bar = cum("progress/rich_progress.py", "on_train_batch_end")[0]
    parts = {
        "step": step,
        "forward + loss (training_step without self.log)": training_step - log,
        "backward": backward,
        "AdamW update": adam - closure,
        "self.log calls": log,
        "Lightning inside the optimizer step (closure, hooks, zero_grad, LR scheduler)":
            optimizer_step - adam + closure - training_step - backward,
        "after the optimizer step: EMA update": ema,
        "after the optimizer step: progress bar": bar,
        "after the optimizer step: the rest (batch hand-over, other callbacks, loggers)":
            step - optimizer_step - ema - bar,
    }
    return {k: v / steps for k, v in parts.items()}


def _top_ops(prof, steps: int, top: int = 15) -> list[dict]:
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]
    return [{"op": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / steps, "calls_per_step": e.count / steps}
            for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]]


# -- the driver -----------------------------------------------------------------------------------

def child(spec: dict) -> dict:
    """A side, a batch's preparation or a profile in a fresh process, in the run's temporary folder
    (where `kiln fit` leaves its run), with bench/ on PYTHONPATH for jsonargparse (`instruments.StepClock`)."""
    path = os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH")]))
    return run_child(__file__, spec, f"{spec['model']} {spec.get('side', '')} {spec['mode']}", cwd=spec["tmp"],
                     WANDB_SILENT="true", PYTHONPATH=path)


def report(args, models: list[str], runs: dict, ratios: dict, info: dict, meta: dict) -> str:
    lines = [
        f"## {args.section}", "",
        "A training step under `kiln fit` against a bare PyTorch loop on the same LightningModule, batch and "
        f"optimizer, on {args.device.upper() if args.device != 'cpu' else 'CPU'} with {args.threads} threads on "
        f"both sides, precision {args.precision}. kiln's side is `kiln fit -c configs/<family>/tiny.yaml` through "
        "kiln's entry point, with a default run's Trainer, loggers and callbacks; only the data module is "
        "swapped for one that hands over the same in-memory batch at every step. The bare side builds the "
        "same module from the same config and seed and runs zero_grad, the family's loss (its "
        "`training_step` arithmetic without `self.log`), backward, the module's own AdamW and LR schedule and "
        "its `on_train_batch_end`. A step is the time between consecutive step ends, so kiln's includes "
        "everything Lightning and the callbacks do per step. Fresh process per run, sides alternating, "
        f"{args.rounds} rounds of {args.warmup} warm-up and {args.steps} timed steps each. The batch: "
        + ("random images and captions of the config's batch shape." if args.synthetic else
           "one real batch of the config's data (built once, images already float)."), "",
        "| model | side | step time, median (IQR; min-max) | mean | CPU time per step | peak RSS (before the first step) "
        "| first-step loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in models:
        for side in SIDES:
            wall = spread([w for r in runs[model][side] for w in r["wall_s"]])
            mean = statistics.mean(w for r in runs[model][side] for w in r["wall_s"])
            cpu = statistics.median(c for r in runs[model][side] for c in r["cpu_s"])
            peak = statistics.median(r["peak_rss_mib"] for r in runs[model][side])
            built = statistics.median(r["rss_before_step_mib"] for r in runs[model][side])
            loss = runs[model][side][0]["loss0"]
            lines.append(
                f"| {model} tiny ({info[model]['params']:,} params, batch {info[model]['batch']}) | {side} "
                f"| {wall['median'] * 1e3:.1f} ms ({wall['q1'] * 1e3:.1f}-{wall['q3'] * 1e3:.1f}; "
                f"{wall['min'] * 1e3:.1f}-{wall['max'] * 1e3:.1f}) | {mean * 1e3:.1f} ms | {cpu * 1e3:.1f} ms "
                f"| {peak:.0f} MiB ({built:.0f} MiB) | {loss:.6f} |")
    lines.append("")
    for model in models:
        basis = HEADLINE[args.device == "cpu"]
        other = HEADLINE[args.device != "cpu"]
        med, mean = ratios[model][basis], ratios[model][other]
        kiln0 = runs[model]["kiln"][0]
        ema = runs[model]["bare"][0].get("ema_update_s")
        cpu_ratio = statistics.median(statistics.median(b["cpu_s"]) / statistics.median(k["cpu_s"])
                                      for k, b in zip(runs[model]["kiln"], runs[model]["bare"]))
        threads = {side: _per_step_threads(runs[model][side], args.steps) for side in SIDES}
        lines += [
            f"**{model}: kiln / bare throughput {statistics.median(med):.3f}** (median over rounds of the ratio of "
            f"{basis} step times; per round: {', '.join(f'{r:.3f}' for r in med)}); from {other} step times "
            f"{statistics.median(mean):.3f} ({', '.join(f'{r:.3f}' for r in mean)}). kiln's run had callbacks "
            f"{', '.join(f'`{c}`' for c in kiln0['callbacks'])}, loggers {', '.join(kiln0['loggers'])}, precision "
            f"{kiln0['precision']}, {kiln0['threads']} threads"
            + (f"; its config adds {', '.join(f'`{c}`' for c in kiln0['ema_callbacks'])}" if kiln0["ema_callbacks"] else "")
            + (f". The EMA update alone takes {ema * 1e3:.2f} ms per step (timed in the bare process), "
               f"{ema / statistics.median(w for r in runs[model]['bare'] for w in r['wall_s']):.1%} of a bare step"
               if ema else "") + ".",
            "",
            f"CPU time per step (every thread of the process), kiln / bare: {cpu_ratio:.3f} (bare over kiln, "
            "median of the rounds). Per timed step, by thread: " + "; ".join(
                f"{side}: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in threads[side].items())
                for side in SIDES) + ". Per step, minor page faults / voluntary / involuntary context switches: "
            + "; ".join(f"{side} " + " / ".join(f"{statistics.median(r['rusage_per_step'][i] for r in runs[model][side]):.0f}"
                                                for i in range(3)) for side in SIDES) + ".", ""]
    lines += [
        "1-minute load average as each run started: " + "; ".join(
            f"{model}: " + ", ".join(f"{r['load1_before']:.2f}" for pair in zip(runs[model]["kiln"], runs[model]["bare"])
                                     for r in pair) for model in models) + " (kiln, bare, kiln, ...).", "",
        *meta_lines(meta, meta["versions"]),
    ]
    lines += ["", "### Where the step time goes", "",
              "Each step split at the hooks Lightning calls (`on_train_batch_start`, `on_before_backward`, "
              "`on_after_backward`, `on_train_batch_end`) and, in the bare loop, at the same points; `self.log` and "
              "the EMA callback timed by thin wrappers. No profiler: these are the timed runs above. Mean wall ms "
              "per timed step (CPU ms of the whole process in brackets), median over the rounds. \"between steps\" "
              "is everything from one step's end to the next one's start: the callbacks after the step clock "
              "(checkpoint and sample-grid checks, progress bar, data metrics, preemption), the loggers, the "
              "loop's bookkeeping and the next batch; \"update\" is the AdamW step, the LR schedule and the "
              "`on_train_batch_end` hooks before the clock (the module's, the EMA's).", "",
              "| phase | " + " | ".join(f"{m} {side}" for m in models for side in SIDES) + " |",
              "|---|" + "---|" * (2 * len(models))]
    names = [*PHASES, "of which self.log", "of which EMA"]
    for name in names:
        cells = []
        for m in models:
            for side in SIDES:
                values = [r["phases"][name] for r in runs[m][side] if name in r.get("phases", {})]
                cells.append(f"{statistics.median(v[0] for v in values) * 1e3:.1f} "
                             f"({statistics.median(v[1] for v in values) * 1e3:.1f})" if values else "—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    def cpu(model: str, side: str, name: str) -> float:
        return statistics.median(r["phases"][name][1] for r in runs[model][side])

    own = []
    for m in models:
        work = cpu(m, "kiln", "between steps") + cpu(m, "kiln", "of which self.log") - cpu(m, "bare", "between steps")
        step = statistics.median(c for r in runs[m]["kiln"] for c in r["cpu_s"])
        ema = cpu(m, "kiln", "of which EMA")
        own.append(f"{m} {work * 1e3:.1f} ms ({work / step:.1%} of its step's CPU)"
                   + (f", plus the EMA update {ema * 1e3:.1f} ms ({ema / step:.1%})" if ema else ""))
    lines += ["", "Lightning's and kiln's own work per step, in CPU time (between steps and `self.log`, less the bare "
              "loop's between steps): " + "; ".join(own) + ". The rest of any gap is in forward, backward and "
              "update, the same kernels on both sides: contention from the other jobs. (kiln's progress is "
              "printed lines from the training thread, `ProgressLines`; Rich's bar had a render thread of its "
              "own, 1-2 ms of CPU a step, named \"Thread\" in the per-thread CPU of earlier runs.)"]
    return "\n".join(lines) + "\n"


def _decomposition_table(decomposition: dict[str, dict[str, float]]) -> str:
    models = [m for m, d in decomposition.items() if d]
    if not models:
        return "(no training steps in the profile)"
    lines = ["| part of a `kiln fit` step | " + " | ".join(f"{m}: CPU ms per step (share)" for m in models) + " |",
             "|---|" + "---|" * len(models)]
    for part in decomposition[models[0]]:
        cells = []
        for m in models:
            d = decomposition[m]
            cells.append(f"{d[part] * 1e3:.1f}" + ("" if part == "step" else f" ({d[part] / d['step']:.1%})"))
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _per_step_threads(runs: list[dict], steps: int) -> dict[str, float]:
    """Median over runs of each thread group's CPU ms per timed step, largest first."""
    names = {name for r in runs for name in r.get("thread_cpu_s", {})}
    per = {name: statistics.median(r.get("thread_cpu_s", {}).get(name, 0.0) * 1e3 / steps for r in runs)
           for name in names}
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="clip,glide", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32", help="32 or bf16-mixed (kiln: trainer.precision; bare: autocast)")
    parser.add_argument("--synthetic", action="store_true",
                        help="random images and captions instead of a batch of the config's data")
    parser.add_argument("--section", default=SECTION[3:], help="the BENCHMARKS.md heading to write")
    parser.add_argument("--wandb", choices=("offline", "disabled"), help="override the default W&B mode (offline)")
    parser.add_argument("--write", action="store_true", help=f"replace the '{SECTION[3:]}' section of BENCHMARKS.md")
    parser.add_argument("--profile", action="store_true", help="profile kiln's side and print where the time goes")
    parser.add_argument("--result", default="overhead", help="the result file's name under bench/results/")
    args = parse_args(parser, run_side)

    models = [m for m in args.models.split(",") if m]
    t0, load_before = time.time(), load1()
    with tempfile.TemporaryDirectory(prefix="kiln-overhead-") as tmp:
        base = {"threads": args.threads, "warmup": args.warmup, "steps": args.steps, "device": args.device,
                "precision": args.precision, "tmp": tmp, "wandb": args.wandb, "synthetic": args.synthetic}
        info = {}
        for model in models:
            batch = os.path.join(tmp, f"batch-{model}.pt")
            prepared = child(base | {"mode": "prepare", "model": model, "batch": batch})
            info[model] = {"batch": prepared["captions"], "path": batch}
            print(f"{model}: batch {prepared['image']} ({', '.join(prepared['keys'])})", file=sys.stderr)
        if args.profile:
            for model in models:
                for side in SIDES:
                    out = child(base | {"mode": "profile", "side": side, "model": model, "torch_ops": True,
                                            "batch": info[model]["path"]})
                    print(f"\n== {model} {side}: top ops by self CPU time, ms per step")
                    for row in out["ops"]:
                        print(f"{row['ms_per_step']:9.2f} ms {row['calls_per_step']:7.1f} calls  {row['op']}")
                    if "cprofile" in out:
                        print(out["cprofile"])
                        print(_decomposition_table({model: out["decomposition"]}))
            return

        runs = alternate(args.rounds, [(m, s) for m in models for s in SIDES],
                         lambda key, _: child(base | {"mode": "time", "model": key[0], "side": key[1],
                                                      "batch": info[key[0]]["path"]}),
                         lambda r: f"median step {statistics.median(r['wall_s']) * 1e3:.1f} ms, mean "
                                   f"{statistics.mean(r['wall_s']) * 1e3:.1f} ms, loss0 {r['loss0']:.6f}",
                         label=" ".join)
        runs = {m: {s: runs[m, s] for s in SIDES} for m in models}
        pairs = {m: list(zip(runs[m]["kiln"], runs[m]["bare"])) for m in models}
        ratios = {m: {"median": [statistics.median(b["wall_s"]) / statistics.median(k["wall_s"]) for k, b in pairs[m]],
                      "mean": [statistics.mean(b["wall_s"]) / statistics.mean(k["wall_s"]) for k, b in pairs[m]]}
                  for m in models}
        for model in models:
            info[model]["params"] = runs[model]["bare"][0]["params"]

    meta = run_meta(__file__, t0, load_before, ("trainers", "modules", "configs", "bench/overhead.py"),
                    versions=versions("torch", "lightning"))
    section = report(args, models, runs, ratios, info, meta)
    print(section)
    basis = HEADLINE[args.device == "cpu"]
    headline = {m: statistics.median(ratios[m][basis]) for m in models}
    result = {
        "compared": "`kiln fit` step / bare PyTorch loop, same module, batch, optimizer",
        "ratio": min(headline.values()),
        "detail": "; ".join(f"{m} tiny {headline[m]:.2f} (rounds {min(ratios[m][basis]):.2f}-"
                            f"{max(ratios[m][basis]):.2f})" for m in models) + f", from {basis} step times",
        "ratios": ratios, "cpu_ratios": {m: [statistics.median(b["cpu_s"]) / statistics.median(k["cpu_s"])
                                             for k, b in zip(runs[m]["kiln"], runs[m]["bare"])] for m in models},
        "device": args.device, "precision": args.precision,
        "steps": {m: {s: spread([w for r in runs[m][s] for w in r["wall_s"]]) for s in SIDES} for m in models},
    }
    save(args.result, result, f"## {args.section}", section, meta, args.write)


if __name__ == "__main__":
    main()
