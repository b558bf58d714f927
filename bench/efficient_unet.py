"""Imagen's Efficient U-Net against kiln's ADM U-Net at matched parameters (issue #26): a training
step of each, throughput and peak memory side by side.

    python3 bench/efficient_unet.py [--steps 10] [--rounds 3] [--warmup 2] [--batch 8] [--size 64] [--threads 2] [--write]

A benchmark, not a test: it asserts nothing. Both networks are a 64 px super-resolution stage as
Imagen runs one: 6 input channels (the noisy image and the upsampled low-resolution one), 3 out,
16 text tokens of 384 dims (MiniLM's width) by cross-attention plus a pooled vector, attention at
the lowest (8 px) level only. Their parameters match within 2% (CONFIGS; checked before timing):
the Efficient U-Net spends them at low resolution (res blocks 2/4/6/8 from 64 px down, 32 base
channels), the ADM U-Net evenly (2 per level, 40 base channels). A step is zero_grad, forward,
MSE against a fixed target, backward and an AdamW step on one fixed batch. Each run is a fresh
process with the process settings `kiln` makes for itself; the sides alternate, and each round's
ratio compares that round's two runs. --write replaces the "Efficient U-Net vs ADM U-Net"
section of BENCHMARKS.md and leaves bench/results/efficient_unet.json.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

from common import (alternate, count_flops, load1, meta_lines, parse_args, run_child, run_meta, save, spread,
                    timed_steps)

SECTION = "## Efficient U-Net vs ADM U-Net"
TOKENS, TEXT_DIM = 16, 384
SIDES = ("efficient", "adm")
TEXT = dict(context_dim=TEXT_DIM, pooled_dim=TEXT_DIM)
CONFIGS = {
    "efficient": dict(in_channels=6, out_channels=3, channels=32, channel_mult=(1, 2, 4, 8), num_res_blocks=(2, 4, 6, 8),
                      attention_levels=(3,), cross_attention_levels=(), head_channels=32, augmentation_level=True,
                      **TEXT),
    "adm": dict(in_channels=6, out_channels=3, channels=40, channel_mult=(1, 2, 4, 8), num_res_blocks=2,
                attention_levels=(3,), head_channels=40, context_mode="cross", resblock_updown=False, **TEXT),
}
CLASSES = {"efficient": "kiln.modules.blocks.efficient_unet.EfficientUNet", "adm": "kiln.modules.blocks.unet.UNet"}


def build(side: str, batch: int, size: int):
    import torch
    import torch.nn.functional as F

    from kiln.modules.blocks.efficient_unet import EfficientUNet
    from kiln.modules.blocks.unet import UNet

    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 6, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context, pooled = torch.randn(batch, TOKENS, TEXT_DIM, generator=g), torch.randn(batch, TEXT_DIM, generator=g)
    target = torch.randn(batch, 3, size, size, generator=g)
    torch.manual_seed(0)
    model = (EfficientUNet if side == "efficient" else UNet)(**CONFIGS[side])
    extra = {"augmentation_t": torch.randint(0, 1000, (batch,), generator=g)} if side == "efficient" else {}

    def forward():
        return model(x, t, context=context, pooled=pooled, **extra)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(forward(), target).backward()
        optimizer.step()

    return model, forward, target, step


def run_side(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(spec["threads"])
    model, forward, target, step = build(spec["side"], spec["batch"], spec["size"])
    out = {"side": spec["side"], "threads": torch.get_num_threads()}
    if spec["mode"] == "info":
        return out | {"params": sum(p.numel() for p in model.parameters()),
                      "flops": count_flops(lambda: F.mse_loss(forward(), target).backward()),
                      "versions": {"python": platform.python_version(), "torch": torch.__version__}}
    return out | timed_steps(step, spec)


def call(side: str) -> str:
    return f"{CLASSES[side].rsplit('.', 1)[1]}({', '.join(f'{k}={v!r}' for k, v in CONFIGS[side].items())})"


def report(args, info: dict, runs: dict, ratios: list[float], meta: dict) -> str:
    lines = [
        SECTION, "",
        "One training step of Imagen's Efficient U-Net (modules/blocks/efficient_unet.py) against kiln's ADM U-Net "
        "(modules/blocks/unet.py) at matched parameters, as a super-resolution stage at "
        f"{args.size} px: {args.batch} inputs of 6x{args.size}x{args.size}, a timestep each, {TOKENS} text tokens of "
        f"{TEXT_DIM} dims (cross-attention) and a pooled text vector; the Efficient U-Net also embeds the "
        "noise-augmentation level. Attention at the lowest level only on both. On CPU with "
        f"{args.threads} threads; fresh process per run, sides alternating, {args.rounds} rounds of {args.warmup} "
        f"warm-up and {args.steps} timed steps.", "",
        f"- **efficient**: `{call('efficient')}`",
        f"- **adm**: `{call('adm')}`", "",
        "| side | parameters | GFLOP per step (fwd + bwd) | step time, median (IQR) | samples/s | peak RSS "
        "(RSS before the first step) |",
        "|---|---|---|---|---|---|",
    ]
    for side in SIDES:
        wall = spread([w for r in runs[side] for w in r["wall_s"]])
        peak = statistics.median(r["peak_rss_mib"] for r in runs[side])
        built = statistics.median(r["rss_before_step_mib"] for r in runs[side])
        lines.append(f"| {side} | {info[side]['params']:,} | {info[side]['flops'] / 1e9:.1f} "
                     f"| {wall['median'] * 1e3:.0f} ms ({wall['q1'] * 1e3:.0f}-{wall['q3'] * 1e3:.0f}) "
                     f"| {args.batch / wall['median']:.1f} | {peak:.0f} MiB ({built:.0f} MiB) |")
    e, a = info["efficient"], info["adm"]
    peak = {s: statistics.median(r["peak_rss_mib"] - r["rss_before_step_mib"] for r in runs[s]) for s in SIDES}
    lines += [
        "",
        f"**Efficient / ADM throughput: {statistics.median(ratios):.2f}** (median of the rounds; per round: "
        + ", ".join(f"{r:.2f}" for r in ratios) + f"). Parameters {e['params'] / a['params']:.3f}, FLOPs "
        f"{e['flops'] / a['flops']:.3f}; memory a step adds (peak RSS minus RSS before the first step): "
        f"{peak['efficient']:.0f} MiB against {peak['adm']:.0f} MiB. The Efficient U-Net's res blocks of a level "
        "run at the level's lower resolution (it downsamples before them and upsamples after), so its "
        "parameters at 8 px cost few FLOPs and little activation memory.", "",
        *meta_lines(meta, f"Python {e['versions']['python']}, torch {e['versions']['torch']}",
                    f" (the benchmark itself keeps {args.threads} threads busy)"),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help=f"replace the '{SECTION[3:]}' section of BENCHMARKS.md")
    args = parse_args(parser, run_side)

    t0, load_before = time.time(), load1()
    base = {"batch": args.batch, "size": args.size, "threads": args.threads, "warmup": args.warmup}

    def child(spec: dict) -> dict:
        return run_child(__file__, spec, f"{spec['side']} {spec['mode']}")

    info = {side: child(base | {"mode": "info", "side": side}) for side in SIDES}
    match = info["efficient"]["params"] / info["adm"]["params"]
    if abs(match - 1) > 0.02:
        sys.exit(f"the two networks' parameters differ by {abs(match - 1):.1%} (> 2%): fix CONFIGS")
    runs = alternate(args.rounds, SIDES, lambda side, _: child(base | {"mode": "time", "steps": args.steps, "side": side}),
                     lambda r: f"median step {statistics.median(r['wall_s']) * 1e3:.0f} ms, "
                               f"peak RSS {r['peak_rss_mib']:.0f} MiB")
    ratios = [statistics.median(a["wall_s"]) / statistics.median(e["wall_s"]) for e, a in zip(*runs.values())]
    meta = run_meta(__file__, t0, load_before, ("modules/blocks/efficient_unet.py", "modules/blocks/unet.py"))
    section = report(args, info, runs, ratios, meta)
    print(section)
    save("efficient_unet", {"ratio": statistics.median(ratios),
                            "compared": "Efficient U-Net / ADM U-Net train step throughput, matched parameters",
                            "detail": f"rounds {min(ratios):.2f}-{max(ratios):.2f}"}, SECTION, section, meta, args.write)


if __name__ == "__main__":
    main()
