"""Diffusion U-Net benchmark: a training step of kiln's `UNet` against diffusers' `UNet2DConditionModel` on CPU.

    python3 bench/unet.py [--steps 20] [--rounds 3] [--warmup 3] [--batch 16] [--threads 2] [--peer-layout channels_last|nchw] [--write]
    python3 bench/unet.py --profile     # top ops by self CPU time of both sides' steps, instead

A benchmark, not a test: it asserts nothing. A step is the optimizer's zero_grad, the forward
pass, the MSE against a fixed noise target, backward and an AdamW step, on one fixed batch (B
32x32 RGB images, an integer timestep per sample, 16 text tokens of 128 dims, no padding mask)
drawn from the same seed on both sides. The two networks are sized to match within 2% in
parameters and in FLOPs of one forward + backward (CONFIGS below); `FlopCounterMode` counts
both, with its formulas for the GPU attention kernels lent to the CPU one it has none for.

diffusers never enters kiln's environment: its side runs under the python of
bench/.venv-diffusers, which this script creates when missing (with the torch version of the
calling interpreter, so both sides run the same kernels); kiln's side runs under the calling
python. Every run is a fresh process, so each side's peak memory is its own; the sides alternate
(kiln, diffusers, kiln, diffusers, ...) and each round's ratio compares the two runs of that
round. Both sides get the same `torch.set_num_threads` (and OMP_NUM_THREADS), and the
process settings `kiln` makes for itself (launch/host.py: OMP_WAIT_POLICY=PASSIVE and glibc
malloc thresholds that keep freed activations in the process).

--write replaces the "Diffusion U-Net" section of BENCHMARKS.md (or appends it) with the table,
the configurations, the command, machine, date and versions, and a short profile of each side.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

from common import (REPO, add_write_and_profile, alternate, count_flops, load1, meta_lines, parse_args, print_top_ops,
                    run_child, run_meta, save, spread, timed_steps, top_ops_table, venv_python)

VENV = os.path.join(REPO, "bench", ".venv-diffusers")
SECTION = "## Diffusion U-Net"
SIZE, TOKENS, CONTEXT_DIM = 32, 16, 128
SIDES = ("kiln", "diffusers")

# Both: resolutions 32, 16, 8 px at widths 32, 64, 128; two res blocks per level down, three up;
# 32 channels per head; stride-2 conv down, nearest + conv up; the timestep embedding as GroupNorm
# scale and shift; a transformer block (self-attention, cross-attention, GEGLU feed-forward) after
# every res block at 16 and 8 px and in the middle, so the two correspond layer for layer but for
# one difference: diffusers' transformer block also has linear projections in and out (2 C^2 per
# token, parameters and FLOPs), which kiln's block lacks. kiln spends that budget on a wider
# feed-forward (5x where diffusers has 4x: 3 C^2 more per token, matmuls for matmuls) and gives a
# little back with a narrower timestep embedding (3 x 32 against 4 x 32, parameters only). With a
# 4x feed-forward kiln would have 0.972 of diffusers' FLOPs.
CONFIGS = {
    "kiln": dict(in_channels=3, out_channels=3, channels=32, channel_mult=(1, 2, 4), num_res_blocks=2,
                 time_embed_mult=3, attention_levels=(1, 2), head_channels=32, context_dim=CONTEXT_DIM,
                 context_mode="cross", ff_mult=5, resblock_updown=False, scale_shift_norm=True),
    "diffusers": dict(sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(32, 64, 128),
                      layers_per_block=2,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      # diffusers' legacy name: head counts per level, i.e. 32 channels per head
                      attention_head_dim=(1, 2, 4), cross_attention_dim=CONTEXT_DIM,
                      use_linear_projection=True, resnet_time_scale_shift="scale_shift"),
}
CLASSES = {"kiln": "kiln.modules.blocks.unet.UNet", "diffusers": "diffusers.UNet2DConditionModel"}


# -- one side, in its own process -----------------------------------------------------------------

def build(side: str, batch: int, channels_last: bool = False):
    """The model, its forward on the fixed batch, the target, one training step, and a checksum
    of the batch (equal on both sides: same seed, same torch)."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, SIZE, SIZE, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    context = torch.randn(batch, TOKENS, CONTEXT_DIM, generator=generator)
    noise = torch.randn(batch, 3, SIZE, SIZE, generator=generator)
    torch.manual_seed(0)
    if side == "kiln":
        from kiln.modules.blocks.unet import UNet

        model = UNet(**CONFIGS["kiln"])

        def forward():
            return model(x, t, context)
    else:
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel(**CONFIGS["diffusers"])
        if channels_last:  # diffusers' documented speed-up, which its users opt into
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)

        def forward():
            return model(x, t, encoder_hidden_states=context).sample
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.mse_loss(forward(), noise).backward()
        optimizer.step()

    checksum = float(x.double().sum() + t.double().sum() + context.double().sum() + noise.double().sum())
    return model, forward, noise, step, checksum


def run_side(spec: dict) -> dict:
    """Info (parameters, FLOPs, versions), a timed run, or a profile of one side, in this process."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(spec["threads"])
    model, forward, noise, step, checksum = build(spec["side"], spec["batch"], spec["peer_channels_last"])
    out = {"side": spec["side"], "threads": torch.get_num_threads(), "batch_checksum": checksum}
    if spec["mode"] == "info":
        versions = {"python": platform.python_version(), "torch": torch.__version__}
        if spec["side"] == "diffusers":
            import diffusers

            versions["diffusers"] = diffusers.__version__
        return out | {"params": sum(p.numel() for p in model.parameters()),
                      "param_tensors": sum(1 for _ in model.parameters()),
                      "flops": count_flops(lambda: F.mse_loss(forward(), noise).backward()), "versions": versions}
    return out | timed_steps(step, spec)


# -- the driver -----------------------------------------------------------------------------------

def peer_python(torch_version: str) -> str:
    """bench/.venv-diffusers' python, with diffusers and this interpreter's torch version."""
    # Pinning torch keeps pip from pulling another release in with diffusers.
    return venv_python(VENV, "import torch, diffusers; print(torch.__version__)", torch_version,
                       [f"torch=={torch_version.split('+')[0]}", "diffusers"])


def call(side: str) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in CONFIGS[side].items())
    return f"{CLASSES[side].rsplit('.', 1)[1]}({args})"


def report(args, info: dict, runs: dict, ratios: list[float], profiles: dict, meta: dict) -> str:
    """The markdown section: everything in it comes from this run."""
    kiln, peer = info["kiln"], info["diffusers"]
    batch = args.batch
    lines = [
        SECTION, "",
        "One training step of kiln's `UNet` (modules/blocks/unet.py) against diffusers' `UNet2DConditionModel`, "
        f"on CPU with {args.threads} threads each: zero_grad, forward, MSE against a fixed noise target, "
        "backward, AdamW step (lr 1e-4, torch defaults). One fixed batch, the same on both sides: "
        f"{batch} images of 3x{SIZE}x{SIZE}, a timestep per sample, a text context of {TOKENS} tokens x "
        f"{CONTEXT_DIM} dims without padding mask. The networks are sized to match in parameters and FLOPs: "
        "same resolutions, widths and res blocks per level, the same transformer block after each res "
        "block at 16 and 8 px and in the middle (self-attention, cross-attention, GEGLU feed-forward; "
        "kiln's `context_mode=\"cross\"`, `ff_mult`), 32 channels per head. diffusers' transformer "
        "block also has linear projections in and out, which kiln's lacks; kiln's feed-forward is wider "
        "instead (5x against 4x) and its timestep embedding narrower. Each run is a "
        "fresh process (diffusers' under bench/.venv-diffusers, same torch), with the process "
        "settings `kiln` makes for itself on both sides (launch/host.py: OMP_WAIT_POLICY=PASSIVE, glibc malloc "
        "thresholds that keep freed activations instead of faulting them in again each step); the sides alternate, "
        f"{args.rounds} rounds of {args.warmup} warm-up and {args.steps} timed steps each. Memory format: "
        "kiln's U-Net keeps its activations channels-last inside the module; diffusers' model and input are "
        + ("converted to channels-last (`model.to(memory_format=torch.channels_last)`, diffusers' documented "
           "speed-up; `--peer-layout nchw` measures it as constructed)." if args.peer_layout == "channels_last"
           else "as constructed, NCHW (`--peer-layout nchw`; by default they are converted to channels-last)."),
        "",
        f"- **kiln**: `{call('kiln')}`",
        f"- **diffusers**: `{call('diffusers')}`", "",
        "| side | parameters | GFLOP per step (fwd + bwd) | step time, median (IQR; min-max) | samples/s "
        "| CPU time per step | peak RSS (RSS before the first step) |",
        "|---|---|---|---|---|---|---|",
    ]
    for side in SIDES:
        wall = spread([w for r in runs[side] for w in r["wall_s"]])
        cpu = statistics.median(c for r in runs[side] for c in r["cpu_s"])
        peak = statistics.median(r["peak_rss_mib"] for r in runs[side])
        built = statistics.median(r["rss_before_step_mib"] for r in runs[side])
        lines.append(
            f"| {side} | {info[side]['params']:,} ({info[side]['param_tensors']} tensors) "
            f"| {info[side]['flops'] / 1e9:.1f} | {wall['median'] * 1e3:.0f} ms ({wall['q1'] * 1e3:.0f}-"
            f"{wall['q3'] * 1e3:.0f}; {wall['min'] * 1e3:.0f}-{wall['max'] * 1e3:.0f}) "
            f"| {batch / wall['median']:.1f} | {cpu:.2f} s | {peak:.0f} MiB ({built:.0f} MiB) |")
    per_round = ", ".join(f"{r:.2f}" for r in ratios)
    lines += [
        "",
        f"**kiln / diffusers throughput: {statistics.median(ratios):.2f}** (median of the rounds; per round: "
        f"{per_round}). Parameters kiln / diffusers {kiln['params'] / peer['params']:.3f}, FLOPs "
        f"{kiln['flops'] / peer['flops']:.3f}; per-round median step times, kiln: "
        + ", ".join(f"{statistics.median(r['wall_s']) * 1e3:.0f}" for r in runs["kiln"])
        + " ms; diffusers: " + ", ".join(f"{statistics.median(r['wall_s']) * 1e3:.0f}" for r in runs["diffusers"])
        + " ms; 1-minute load average as each run started: "
        + ", ".join(f"{r['load1_before']:.2f}" for pair in zip(runs["kiln"], runs["diffusers"]) for r in pair)
        + " (kiln, diffusers, kiln, ...).", "",
        *meta_lines(meta, f"Python {kiln['versions']['python']}, torch {kiln['versions']['torch']} (kiln side) and "
                          f"{peer['versions']['torch']} with diffusers {peer['versions']['diffusers']} (Python "
                          f"{peer['versions']['python']})",
                    f" (the benchmark itself keeps {args.threads} threads busy)"),
        "- FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one forward + backward of the batch; the "
        "CPU attention kernel (`_scaled_dot_product_flash_attention_for_cpu` and its backward) is counted "
        "with torch's formulas for the GPU attention kernels. Peak RSS is `getrusage` max RSS of the "
        "side's process (imports included); the RSS before the first step has the model, the batch and the "
        "optimizer without its state, so the difference is what training adds (gradients, AdamW's "
        "moments, activations, and whatever the allocator keeps). CPU time counts every thread of the process.",
    ]
    if profiles:
        lines += ["", "### Where the time goes", "",
                  f"`torch.profiler` over the steps after the warm-up ({args.profile_steps} and {args.warmup}), "
                  "one fresh process per side; ops by self CPU time, ms per step (share of the step's self "
                  "time, calls per step).", "", *top_ops_table(profiles, args.top)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (a run of each side per round)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on both sides")
    parser.add_argument("--peer-layout", choices=("channels_last", "nchw"), default="channels_last",
                        help="diffusers' memory format: channels-last (its documented CPU/GPU speed-up, the "
                             "stronger peer; kiln's U-Net is always channels-last inside) or as constructed")
    add_write_and_profile(parser, SECTION, 3)
    args = parse_args(parser, run_side)

    import torch

    t0, load_before = time.time(), load1()
    pythons = {"kiln": sys.executable, "diffusers": peer_python(torch.__version__)}
    base = {"batch": args.batch, "threads": args.threads, "warmup": args.warmup,
            "peer_channels_last": args.peer_layout == "channels_last"}

    def child(spec: dict) -> dict:
        return run_child(__file__, spec, f"{spec['side']} {spec['mode']}", pythons[spec["side"]],
                         HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")

    def profile_both() -> dict:
        spec = base | {"mode": "profile", "steps": args.profile_steps, "top": args.top}
        return {side: child(spec | {"side": side}) for side in SIDES}

    if args.profile:
        print_top_ops(profile_both())
        return

    info = {side: child(base | {"mode": "info", "side": side}) for side in SIDES}
    if info["kiln"]["batch_checksum"] != info["diffusers"]["batch_checksum"]:
        sys.exit("the two sides drew different batches")
    for side in SIDES:
        print(f"{side}: {call(side)}\n  {info[side]['params']:,} parameters, "
              f"{info[side]['flops'] / 1e9:.2f} GFLOP per forward + backward", file=sys.stderr)
    print(f"kiln / diffusers: parameters {info['kiln']['params'] / info['diffusers']['params']:.4f}, "
          f"FLOPs {info['kiln']['flops'] / info['diffusers']['flops']:.4f}", file=sys.stderr)

    timed = base | {"mode": "time", "steps": args.steps}
    runs = alternate(args.rounds, SIDES, lambda side, _: child(timed | {"side": side}),
                     lambda r: f"median step {statistics.median(r['wall_s']) * 1e3:.0f} ms, "
                               f"peak RSS {r['peak_rss_mib']:.0f} MiB")
    # step times: the inverse of the throughput ratio
    ratios = [statistics.median(p["wall_s"]) / statistics.median(k["wall_s"]) for k, p in zip(*runs.values())]
    profiles = profile_both() if args.write else {}

    meta = run_meta(__file__, t0, load_before, ("modules/blocks/unet.py",))
    section = report(args, info, runs, ratios, profiles, meta)
    print(section)
    save("unet", {"ratio": statistics.median(ratios),
                  "compared": "kiln UNet / diffusers UNet2DConditionModel train step, matched params and FLOPs",
                  "detail": f"rounds {min(ratios):.2f}-{max(ratios):.2f}"}, SECTION, section, meta, args.write)


if __name__ == "__main__":
    main()
