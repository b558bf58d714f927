"""StyleGAN2 benchmark: training throughput (kimg/s) of kiln's `StyleGAN2Module` against the
`stylegan2-pytorch` package (lucidrains) on CPU, at matched generator size.

    python3 bench/stylegan.py [--steps 32] [--rounds 3] [--warmup 2] [--batch 8] [--threads 2] [--write]
    python3 bench/stylegan.py --profile     # top ops by self CPU time of both sides' iterations, instead

A benchmark, not a test: it asserts nothing. What is timed is a training iteration as each side
defines it, on one fixed batch of 32x32 RGB "real" images (the same seed on both sides, a fresh
copy handed over at every iteration as a data loader would):

- kiln: `StyleGAN2Module` under a Lightning `Trainer` (CPU, no logger, checkpointing, progress bar
  or sample grids, which run periodically, not per iteration): one `training_step`, i.e. the
  Dmain, Dreg, Gmain and Greg phases that are due, plus whatever Lightning does between batches.
- stylegan2-pytorch: one call of its `Trainer.train()` (its whole training iteration: a D step and
  a G step, with the gradient penalty and path length when due), with the trainer's step counter
  started past 5000, where its path-length penalty is on and its periodic evaluation (below 2500)
  and its EMA (above 20000) are not.

Both sides: hinge losses (the package's only built-in pair besides its dual contrastive loss), style mixing with probability 0.9, a gradient penalty on D every 4 iterations,
path-length regularisation every 32 (the package's intervals, hard-coded in `Trainer.train`;
kiln's `d_reg_interval` and `g_reg_interval` are set to match), no augmentation (the package's
`aug_prob=0`, kiln's `augment=None`), no EMA update in the timed window. The timed window is
`--steps` consecutive iterations after `--warmup` ones; with 32 steps it holds 8 penalty
iterations and 1 path-length iteration on each side (the report counts them per run). What the
regularisers compute still differs, as each side implements them (see DIFFERENCES below).

The package needs CUDA at import (`assert torch.cuda.is_available()`) and moves tensors with
`.cuda()`; its process runs it on CPU by answering that assert with True during the import and
making `Tensor.cuda` / `Module.cuda` return their argument. It imports torchvision at module
level, for its data set and image saving only: the torchvision wheel that matches this torch is a
CUDA build that does not load against the CPU torch, so a stub module stands in for it (nothing in
the timed path calls torchvision). Its `StyleGAN2` builds the EMA copy of G without `fmap_max`, so
G's weights do not load into it at the capped widths used here: the copy gets G's `fmap_max`. No
file of the package is changed; these are patches in the benchmark's process (SHIMS).

The package never enters kiln's environment: its side runs under the python of
bench/.venv-stylegan2, which this script creates when missing (with the torch version of the
calling interpreter, so both sides run the same kernels). Every run is a fresh process, so each
side's peak memory is its own; the sides alternate (kiln, peer, kiln, peer, ...) and each round's
ratio compares the two runs of that round. Both sides get the same `torch.set_num_threads`,
OMP_NUM_THREADS and the process settings `kiln` makes for itself (launch/host.py: OMP_WAIT_POLICY=PASSIVE,
glibc malloc thresholds).

--write replaces the "StyleGAN2" section of BENCHMARKS.md (or appends it) with the table, the
configurations, the command, machine, date and versions, and a short profile of each side.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

from common import (REPO, add_write_and_profile, alternate, load1, meta_lines, parse_args, peak_rss_mib, print_top_ops,
                    rss_mib, run_child, run_meta, save, spread, top_ops, top_ops_table, venv_python)

VENV = os.path.join(REPO, "bench", ".venv-stylegan2")
SECTION = "## StyleGAN2"
PEER_PACKAGE, PEER_VERSION = "stylegan2-pytorch", "1.9.0"
SIZE = 32
SIDES = ("kiln", "stylegan2-pytorch")
PEER_START = 5024  # the package's step counter at the first iteration: past 5000 (path length on), a multiple of 32
R1_INTERVAL, PL_INTERVAL = 4, 32  # the package's: `steps % 4 == 0` and `steps % 32 == 0`
# FLOPs are counted on one iteration of each kind, not a whole window: iteration numbers (kiln's
# global_step; the package's counter is PEER_START plus these) for penalty + path length, plain,
# penalty alone, and penalty + path length again (the package's first path-length iteration only
# sets its running mean: the second is the one that backpropagates).
INFO_ITERATIONS = (0, 1, R1_INTERVAL, PL_INTERVAL)

# Both: z = w = 512 with an 8-layer mapping network (each side's default), a learned 4x4 constant,
# modulated/demodulated 3x3 convs, skip toRGB outputs, a residual D; 32 px. The package at its
# default capacity (16) with its widths capped at 128: G 128, 128, 64, 32 channels at 4, 8, 16, 32 px.
# Its G has a plain 3x3 conv on the constant and two modulated 3x3 convs at 4x4 where kiln's (the
# paper's layout) has one, so kiln takes 192 channels at 4x4 and the package's widths above: G
# parameters and G forward FLOPs then match within 0.1% and 4% (searched over both sides' width
# knobs: capacity and fmap_max, channel_base and channel_max). D: the package's 64, 128, 128, 128,
# 128 (32 px down to 2x2) against kiln's 64, 128, 192, 192 (32 px down to 4x4), level in FLOPs.
CONFIGS = {
    "kiln": dict(image_size=SIZE, channels=3, z_dim=512, w_dim=512, mapping_layers=8, channel_base=1024,
                 channel_max=192, d_channel_base=2048, d_channel_max=192, mbstd_group=4, loss="hinge",
                 r1_gamma=10.0, d_reg_interval=R1_INTERVAL, pl_weight=2.0, g_reg_interval=PL_INTERVAL,
                 style_mixing=0.9, augment=None),
    "stylegan2-pytorch": dict(network_capacity=16, fmap_max=128, latent_dim=512, style_depth=8, mixed_prob=0.9,
                              aug_prob=0.0, no_pl_reg=False),
}
CLASSES = {"kiln": "StyleGAN2Module", "stylegan2-pytorch": "Trainer"}
SHIMS = ("`torch.cuda.is_available()` answers True while the package is imported (it asserts CUDA), "
         "`Tensor.cuda`/`Module.cuda` return their argument, a stub stands in for torchvision (used only by "
         "its data set and image saving; the torchvision wheel for this torch is a CUDA build that does not "
         "load against the CPU torch), and its EMA generator is built with the same `fmap_max` as G (the "
         "package omits it there, and loading G's weights into the EMA copy fails with `fmap_max=128`; "
         "the EMA copy takes no part in an iteration before step 20000)")
DIFFERENCES = [
    "Gradient penalty: kiln's R1 (gamma 10 / 2 * ||grad D(x)||^2) on the real images, in its own Dreg "
    "phase (a second D pass over the reals, lazy: loss x 4, Adam's lr and betas rescaled); the package's "
    "`gradient_penalty` (weight 10 * ||grad||^2) on both the real and the generated images, inside the D "
    "step's own pass (no extra forward), not rescaled.",
    "Path length: kiln's Greg phase generates a half batch of its own (the paper's `pl_batch_shrink=2`) "
    "and backpropagates pl_weight 2 x 32 x (a - mean)^2; the package reuses the G step's full batch and "
    "adds (a - mean)^2 to the G loss.",
    "Noise and D: the package's noise is one uniform map per image through a learned 1 -> C linear "
    "per layer, kiln's a fresh N(0, 1) map per layer times learned strengths; kiln's D has the "
    "minibatch-stddev channel and a 4x4 epilogue (conv, two FC), the package's D ends at 2x2 (conv, one "
    "FC) and down-samples with a blur and a stride-2 conv where kiln average-pools.",
    "Optimisers: Adam on both, kiln's (lr 0.002, betas (0, 0.99), `foreach=True`), the package's "
    "(lr 2e-4 for G and 4e-4 for D, betas (0.5, 0.9), torch's default implementation). kiln updates "
    "`w_avg` at every G forward; the package keeps an EMA copy of its mapping and synthesis networks "
    "in memory (updated only past 20000 iterations).",
]


# -- one side, in its own process -----------------------------------------------------------------

def _real_images(batch: int):
    """The fixed batch in [0, 1] (the package's range; kiln gets 2x - 1) and its checksum."""
    import torch

    images = torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return images, float(images.double().sum())


def _import_peer():
    """The package's module, imported on a CPU-only torch (see the module docstring)."""
    import functools
    import types

    import torch
    from torch import nn

    stub = types.ModuleType("torchvision")
    stub.transforms, stub.utils = types.ModuleType("torchvision.transforms"), types.ModuleType("torchvision.utils")
    sys.modules.update({"torchvision": stub, "torchvision.transforms": stub.transforms,
                        "torchvision.utils": stub.utils})
    available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        import stylegan2_pytorch.stylegan2_pytorch as peer
    finally:
        torch.cuda.is_available = available
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    nn.Module.cuda = lambda self, *args, **kwargs: self
    # `StyleGAN2.__init__` builds its EMA generator (GE) without `fmap_max`, then loads G's weights
    # into it, which fails for any fmap_max below the uncapped widths: GE gets G's fmap_max here.
    # GE takes no part in an iteration before step 20000; only its memory is G's again.
    peer.Generator = functools.partial(peer.Generator, fmap_max=CONFIGS["stylegan2-pytorch"]["fmap_max"])
    return peer


def flop_counter():
    """A dispatch mode that sums `torch.utils.flop_counter`'s formulas over every op it sees.
    `FlopCounterMode` itself also tracks modules, with hooks that fail on a module called under
    no_grad with an input that requires grad (kiln's Dmain generates its fakes so); the formulas
    and what they count are the same."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class FlopCount(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.total += formula(*args, **kwargs, out_val=out)
            return out

    return FlopCount()


KINDS = {(False, False): "plain", (True, False): "penalty", (True, True): "penalty+pl", (False, True): "pl"}


class Recorder:
    """Per-iteration hooks: wall and CPU time at each iteration's start, what it regularised, and
    (by mode) FLOPs per iteration or a profile of the timed window."""

    def __init__(self, spec: dict):
        self.spec, self.first = spec, spec["warmup"]
        self.last = spec["warmup"] + spec["steps"]  # exclusive; that iteration only closes the window
        if spec["mode"] == "info":  # one iteration of each kind (see INFO_ITERATIONS)
            self.first, self.last = 0, len(INFO_ITERATIONS) - 1
        self.wall, self.cpu, self.flags, self.flops = [], [], [], []
        self.counter = self.profiler = None

    def start(self, i: int, r1: bool, pl: bool) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        self.flags.append((r1, pl))
        if self.spec["mode"] == "info":
            self.counter = flop_counter()
            self.counter.__enter__()
        if self.spec["mode"] == "profile":
            if i == self.first:
                from torch.profiler import ProfilerActivity, profile

                self.profiler = profile(activities=[ProfilerActivity.CPU])
                self.profiler.__enter__()
            elif i == self.last:
                self.profiler.__exit__(None, None, None)

    def end(self, i: int) -> None:
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.flops.append(self.counter.total)
            self.counter = None

    def window(self) -> slice:
        return slice(self.first, self.last)


def run_kiln(spec: dict, rec: Recorder, images) -> dict:
    import warnings

    import lightning as L
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from kiln.modules.stylegan.lit_module import StyleGAN2Module

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        import logging

        logging.getLogger(name).setLevel(logging.ERROR)
    torch.manual_seed(0)
    model = StyleGAN2Module(**CONFIGS["kiln"])
    reals = images * 2 - 1

    class SameBatch(IterableDataset):
        def __iter__(self):
            while True:
                yield {"image": reals.clone()}

    class Hooks(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step = trainer.global_step  # the iteration number AdversarialModule's phases read
            rec.start(batch_idx, step % R1_INTERVAL == 0, step % PL_INTERVAL == 0)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rec.end(batch_idx)

    out = {"rss_before_step_mib": rss_mib()}
    if spec["mode"] == "info":
        out |= size_info(model.generator, model.discriminator, lambda z: model.generator(z), reals, spec["batch"])
    # kiln's path length costs the same at every Greg iteration, so in info mode iteration 0 stands for 32.
    steps = R1_INTERVAL + 1 if spec["mode"] == "info" else rec.last + 1
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[Hooks()])
    trainer.fit(model, DataLoader(SameBatch(), batch_size=None))
    return out


def run_peer(spec: dict, rec: Recorder, images) -> dict:
    import itertools
    import random
    import shutil
    import tempfile

    import torch

    peer = _import_peer()
    random.seed(0)
    torch.manual_seed(0)
    base = tempfile.mkdtemp(prefix="bench-stylegan2-")
    try:
        trainer = peer.Trainer(name="bench", base_dir=base, image_size=SIZE, batch_size=spec["batch"],
                               save_every=10**9, evaluate_every=10**9, **CONFIGS["stylegan2-pytorch"])
        trainer.init_GAN()
        trainer.loader = (images.clone() for _ in itertools.count())
        trainer.steps = PEER_START
        gan = trainer.GAN
        out = {"rss_before_step_mib": rss_mib()}
        if spec["mode"] == "info":
            def generate(z):
                styles = gan.S(z)[:, None].expand(-1, gan.G.num_layers, -1)
                return gan.G(styles, peer.image_noise(len(z), SIZE, device=0))

            out |= size_info(torch.nn.ModuleList([gan.S, gan.G]), gan.D, generate, images, spec["batch"])
        iterations = INFO_ITERATIONS if spec["mode"] == "info" else range(rec.last + 1)
        for i, n in enumerate(iterations):
            trainer.steps = PEER_START + n  # in info mode, jumps to the next kind of iteration
            s = trainer.steps
            rec.start(i, s % R1_INTERVAL == 0, s > 5000 and s % PL_INTERVAL == 0)
            trainer.train()
            rec.end(i)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return out


def size_info(generator, discriminator, generate, reals, batch: int) -> dict:
    """Parameters of G (mapping included) and D; FLOPs of a G forward and a D forward of the batch."""
    import torch

    z = torch.randn(batch, 512, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), flop_counter() as g:
        generate(z)
    with torch.no_grad(), flop_counter() as d:
        discriminator(reals)
    return {"g_params": sum(p.numel() for p in generator.parameters()),
            "d_params": sum(p.numel() for p in discriminator.parameters()),
            "g_forward_flops": g.total, "d_forward_flops": d.total}


def run_side(spec: dict) -> dict:
    """Info (parameters, FLOPs, versions), a timed run, or a profile of one side, in this process."""
    import torch

    torch.set_num_threads(spec["threads"])
    images, checksum = _real_images(spec["batch"])
    rec = Recorder(spec)
    run = run_kiln if spec["side"] == "kiln" else run_peer
    out = run(spec, rec, images)
    out |= {"side": spec["side"], "threads": torch.get_num_threads(), "batch_checksum": checksum}
    window = rec.window()
    flags = rec.flags[window]
    out |= {"iterations": {kind: sum(KINDS[f] == kind for f in flags) for kind in KINDS.values()}}
    if spec["mode"] == "info":
        versions = {"python": platform.python_version(), "torch": torch.__version__}
        if spec["side"] == "kiln":
            import lightning

            versions["lightning"] = lightning.__version__
        else:
            from importlib import metadata

            versions[PEER_PACKAGE] = metadata.version(PEER_PACKAGE)
        kinds = {}  # the last iteration of each kind wins (the package's second path-length one)
        for f, (r1, pl) in zip(rec.flops, rec.flags):
            kinds[KINDS[(r1, pl)]] = f
        return out | {"versions": versions, "iteration_flops": kinds}
    if spec["mode"] == "profile":
        return out | top_ops(rec.profiler, spec["steps"], spec["top"])
    wall = [b - a for a, b in zip(rec.wall[window], rec.wall[window.start + 1:window.stop + 1])]
    cpu = [b - a for a, b in zip(rec.cpu[window], rec.cpu[window.start + 1:window.stop + 1])]
    return out | {"wall_s": wall, "cpu_s": cpu, "kimg_per_s": spec["batch"] * len(wall) / sum(wall) / 1000,
                  "peak_rss_mib": peak_rss_mib()}


# -- the driver -----------------------------------------------------------------------------------

def peer_python(torch_version: str) -> str:
    """bench/.venv-stylegan2's python, with the package and this interpreter's torch version."""
    # Pinning torch keeps pip from pulling another release in with the package.
    probe = f"import importlib.metadata as m, torch; print(torch.__version__, m.version({PEER_PACKAGE!r}))"
    return venv_python(VENV, probe, f"{torch_version} {PEER_VERSION}",
                       [f"torch=={torch_version.split('+')[0]}", f"{PEER_PACKAGE}=={PEER_VERSION}"])


KILN_PATHS = ("modules/stylegan", "modules/gan/lit_module.py", "modules/blocks/adversarial.py", "modules/blocks/ada.py")


def call(side: str) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in CONFIGS[side].items())
    return f"{CLASSES[side]}({args})"


def window_flops(info: dict, counts: dict, steps: int) -> float:
    """Mean FLOPs per iteration of a timed window: each kind of iteration's FLOPs times its count."""
    return sum(info["iteration_flops"][kind] * n for kind, n in counts.items() if n) / steps


def report(args, info: dict, runs: dict, profiles: dict, meta: dict) -> str:
    """The markdown section: everything in it comes from this run."""
    kiln, peer = (info[s] for s in SIDES)
    name = SIDES[1]
    ratios = [k["kimg_per_s"] / p["kimg_per_s"] for k, p in zip(*(runs[s] for s in SIDES))]
    cpu_ratios = [statistics.fmean(p["cpu_s"]) / statistics.fmean(k["cpu_s"]) for k, p in zip(*(runs[s] for s in SIDES))]
    counts = {side: runs[side][0]["iterations"] for side in SIDES}
    mean_flops = {side: window_flops(info[side], counts[side], args.steps) for side in SIDES}
    lines = [
        SECTION, "",
        "Training throughput of kiln's `StyleGAN2Module` (modules/stylegan/) against the "
        f"`{PEER_PACKAGE}` package (lucidrains, {peer['versions'][PEER_PACKAGE]}) on CPU with {args.threads} threads "
        f"each, {SIZE}x{SIZE} RGB, batch {args.batch}. An iteration is what each side runs per batch: kiln's "
        "`training_step` under a Lightning `Trainer` (Dmain, Dreg, Gmain, Greg as due; no logger, checkpoints, "
        "progress bar or sample grids), the package's `Trainer.train()` (its D step and G step, penalties as "
        f"due, with its step counter started at {PEER_START}: path length on, no periodic evaluation, no EMA). "
        "Both: hinge losses, style mixing 0.9, a gradient penalty every 4 iterations and path length every 32 "
        "(the package's hard-coded intervals; kiln's `d_reg_interval`/`g_reg_interval` set to match), no "
        "augmentation (kiln's ADA off, the package's `aug_prob=0`). Each run is a fresh process (the package's "
        "under bench/.venv-stylegan2, same torch); "
        f"the sides alternate, {args.rounds} rounds of {args.warmup} warm-up and {args.steps} timed "
        "iterations; kimg/s is the window's images over its wall time.", "",
        f"- **kiln**: `{call('kiln')}`",
        f"- **{name}**: `{call(name)}` (`Trainer` defaults otherwise: lr 2e-4, `ttur_mult=2`, `lr_mlp=0.1`)", "",
        "| side | G parameters (mapping incl.) | D parameters | GFLOP: G fwd / D fwd of the batch | GFLOP per "
        "iteration: plain / penalty / penalty + path length / window mean | kimg/s, median of runs (per run) "
        "| GFLOP/s | iteration time, median (IQR; min-max) | CPU time per iteration | peak RSS (RSS before "
        "the first iteration) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for side in SIDES:
        i, f = info[side], info[side]["iteration_flops"]
        kimg = [r["kimg_per_s"] for r in runs[side]]
        wall = spread([w for r in runs[side] for w in r["wall_s"]])
        cpu = statistics.fmean(c for r in runs[side] for c in r["cpu_s"])
        peak = statistics.median(r["peak_rss_mib"] for r in runs[side])
        built = statistics.median(r["rss_before_step_mib"] for r in runs[side])
        rate = mean_flops[side] * statistics.median(kimg) * 1000 / args.batch / 1e9
        lines.append(
            f"| {side} | {i['g_params']:,} | {i['d_params']:,} | {i['g_forward_flops'] / 1e9:.2f} / "
            f"{i['d_forward_flops'] / 1e9:.2f} | {f['plain'] / 1e9:.1f} / {f['penalty'] / 1e9:.1f} / "
            f"{f['penalty+pl'] / 1e9:.1f} / {mean_flops[side] / 1e9:.1f} | {statistics.median(kimg):.4f} ("
            + ", ".join(f"{k:.4f}" for k in kimg) + f") | {rate:.1f} | {wall['median'] * 1e3:.0f} ms "
            f"({wall['q1'] * 1e3:.0f}-{wall['q3'] * 1e3:.0f}; {wall['min'] * 1e3:.0f}-{wall['max'] * 1e3:.0f}) "
            f"| {cpu:.2f} s (mean) | {peak:.0f} MiB ({built:.0f} MiB) |")
    lines += [
        "",
        f"**kiln / {name} throughput: {statistics.median(ratios):.2f}** (median of the rounds' kimg/s ratios; per "
        f"round: {', '.join(f'{r:.2f}' for r in ratios)}); CPU time per iteration, {name} / kiln: "
        f"{statistics.median(cpu_ratios):.2f} (per round: {', '.join(f'{r:.2f}' for r in cpu_ratios)}). "
        f"kiln / {name}: G parameters {kiln['g_params'] / peer['g_params']:.3f}, G forward FLOPs "
        f"{kiln['g_forward_flops'] / peer['g_forward_flops']:.3f}, D parameters {kiln['d_params'] / peer['d_params']:.3f}, "
        f"D forward FLOPs {kiln['d_forward_flops'] / peer['d_forward_flops']:.3f}, FLOPs per iteration (window mean) "
        f"{mean_flops['kiln'] / mean_flops[name]:.3f}. Iterations of each kind in a timed window: "
        + "; ".join(f"{s} " + ", ".join(f"{n} {kind}" for kind, n in counts[s].items() if n) for s in SIDES)
        + ". 1-minute load average as each run started: "
        + ", ".join(f"{r['load1_before']:.2f}" for pair in zip(*(runs[s] for s in SIDES)) for r in pair)
        + f" (kiln, {name}, kiln, ...).", "",
        *meta_lines(meta, f"Python {kiln['versions']['python']}, torch {kiln['versions']['torch']}, Lightning "
                          f"{kiln['versions']['lightning']} (kiln side); torch {peer['versions']['torch']} with "
                          f"{PEER_PACKAGE} {peer['versions'][PEER_PACKAGE]} (Python {peer['versions']['python']})",
                    f" (the benchmark itself keeps {args.threads} threads busy)"),
        "- FLOPs: the formulas of `torch.utils.flop_counter` (its `flop_registry`, what `FlopCounterMode` "
        "sums), over a no-grad G forward of the batch (mapping included, z of 512), a D forward of the real "
        "batch, and one untimed iteration of each kind (forward, backward, and the penalties' double "
        "backward), weighted by the window's count of each for its mean. GFLOP/s: the window mean times "
        "iterations per second. Peak RSS is `getrusage` max RSS of the side's process (imports included: "
        "Lightning on kiln's side, aim and kornia on the package's); the RSS before the first iteration has "
        "the networks, optimisers without state and the batch. CPU time counts every thread.",
        f"- The package on CPU, in the benchmark's process only: {SHIMS}.",
        "- What still differs between the sides' iterations:",
    ]
    lines += [f"  - {d}" for d in DIFFERENCES]
    if profiles:
        lines += ["", "### Where the time goes", "",
                  f"`torch.profiler` over {args.profile_steps} iterations after {args.warmup} warm-up ones (a "
                  f"penalty every {R1_INTERVAL}, no path length), one fresh process per side; ops by self CPU "
                  "time, ms per iteration (share of the iterations' self time, calls per iteration).", "",
                  *top_ops_table(profiles, args.top, unit="iteration")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=32, help="timed iterations per run (32: one path-length cycle)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (a run of each side per round)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed iterations before the timed ones (the first has both regularisers)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on both sides")
    add_write_and_profile(parser, SECTION, 8, "iterations")
    args = parse_args(parser, run_side)

    import torch

    t0, load_before = time.time(), load1()
    pythons = {"kiln": sys.executable, SIDES[1]: peer_python(torch.__version__)}
    base = {"batch": args.batch, "threads": args.threads, "warmup": args.warmup, "steps": args.steps}

    def child(spec: dict) -> dict:
        return run_child(__file__, spec, f"{spec['side']} {spec['mode']}", pythons[spec["side"]])

    def profile_both() -> dict:
        spec = base | {"mode": "profile", "top": args.top, "steps": args.profile_steps}
        return {side: child(spec | {"side": side}) for side in SIDES}

    if args.profile:
        print_top_ops(profile_both(), unit="iteration")
        return

    info = {side: child(base | {"mode": "info", "side": side}) for side in SIDES}
    if len({info[side]["batch_checksum"] for side in SIDES}) != 1:
        sys.exit("the two sides drew different batches")
    for side in SIDES:
        i = info[side]
        print(f"{side}: {call(side)}\n  G {i['g_params']:,} parameters, D {i['d_params']:,}; GFLOP: G forward "
              f"{i['g_forward_flops'] / 1e9:.2f}, D forward {i['d_forward_flops'] / 1e9:.2f}, iteration "
              + ", ".join(f"{kind} {f / 1e9:.1f}" for kind, f in i["iteration_flops"].items()), file=sys.stderr)
    k, p = info["kiln"], info[SIDES[1]]
    print(f"kiln / {SIDES[1]}: G parameters {k['g_params'] / p['g_params']:.4f}, G forward FLOPs "
          f"{k['g_forward_flops'] / p['g_forward_flops']:.4f}, D parameters {k['d_params'] / p['d_params']:.4f}, "
          f"D forward FLOPs {k['d_forward_flops'] / p['d_forward_flops']:.4f}", file=sys.stderr)

    runs = alternate(args.rounds, SIDES, lambda side, _: child(base | {"mode": "time", "side": side}),
                     lambda r: f"{r['kimg_per_s']:.4f} kimg/s, median iteration "
                               f"{statistics.median(r['wall_s']) * 1e3:.0f} ms, CPU "
                               f"{statistics.fmean(r['cpu_s']):.2f} s per iteration, "
                               f"peak RSS {r['peak_rss_mib']:.0f} MiB")
    profiles = profile_both() if args.write else {}

    meta = run_meta(__file__, t0, load_before, KILN_PATHS)
    section = report(args, info, runs, profiles, meta)
    print(section)
    ratios = [k["kimg_per_s"] / p["kimg_per_s"] for k, p in zip(runs["kiln"], runs[SIDES[1]])]
    save("stylegan", {
        "ratio": statistics.median(ratios),
        "compared": f"kiln StyleGAN2Module / {PEER_PACKAGE} Trainer.train() iteration, kimg/s, matched G size",
        "detail": f"rounds {min(ratios):.2f}-{max(ratios):.2f}; batch {args.batch}, {SIZE} px", "ratios": ratios,
        "kimg_per_s": {side: [r["kimg_per_s"] for r in runs[side]] for side in SIDES},
        "cpu_s_per_iteration": {side: [statistics.fmean(r["cpu_s"]) for r in runs[side]] for side in SIDES},
        "peak_rss_mib": {side: [r["peak_rss_mib"] for r in runs[side]] for side in SIDES},
        "info": info}, SECTION, section, meta, args.write)


if __name__ == "__main__":
    main()
