"""Diffusion U-Net benchmark: a training step of kiln's `UNet` against diffusers' `UNet2DConditionModel` on CPU.

    python3 bench/unet.py [--steps 20] [--rounds 3] [--warmup 3] [--batch 16] [--threads 2] [--write]
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
round. Both sides get the same `torch.set_num_threads` (and OMP_NUM_THREADS), and
OMP_WAIT_POLICY=PASSIVE (what `kiln` sets).

--write replaces the "Diffusion U-Net" section of BENCHMARKS.md (or appends it) with the table,
the configurations, the command, machine, date and versions, and a short profile of each side.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(REPO, "bench", ".venv-diffusers")
BENCHMARKS = os.path.join(REPO, "BENCHMARKS.md")
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

def _rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def build(side: str, batch: int):
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


def count_flops(forward, noise) -> int:
    """FLOPs of one forward + backward."""
    import torch
    import torch.nn.functional as F
    from torch.utils import flop_counter

    def sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    def sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    # Unmasked float32 attention on CPU runs this kernel, which FlopCounterMode would count as 0.
    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: sdpa,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward}
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        F.mse_loss(forward(), noise).backward()
    return counter.get_total_flops()


def run_side(spec: dict) -> dict:
    """Info (parameters, FLOPs, versions), a timed run, or a profile of one side, in this process."""
    import torch

    torch.set_num_threads(spec["threads"])
    model, forward, noise, step, checksum = build(spec["side"], spec["batch"])
    out = {"side": spec["side"], "threads": torch.get_num_threads(), "batch_checksum": checksum}
    if spec["mode"] == "info":
        versions = {"python": platform.python_version(), "torch": torch.__version__}
        if spec["side"] == "diffusers":
            import diffusers

            versions["diffusers"] = diffusers.__version__
        return out | {"params": sum(p.numel() for p in model.parameters()),
                      "param_tensors": sum(1 for _ in model.parameters()),
                      "flops": count_flops(forward, noise), "versions": versions}

    rss_built = _rss_mib()  # model, optimizer without its state, batch: before the first step
    for _ in range(spec["warmup"]):
        step()
    if spec["mode"] == "profile":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(spec["steps"]):
                step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:spec["top"]]
        return out | {"self_cpu_ms_per_step": total / 1e3 / spec["steps"],
                      "top": [{"op": e.key, "ms": e.self_cpu_time_total / 1e3 / spec["steps"],
                               "share": e.self_cpu_time_total / total, "calls": e.count / spec["steps"]}
                              for e in top]}

    wall, cpu = [], []
    for _ in range(spec["steps"]):
        w, c = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return out | {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": peak, "rss_before_step_mib": rss_built}


# -- the driver -----------------------------------------------------------------------------------

def venv_python(torch_version: str) -> str:
    """bench/.venv-diffusers' python, with diffusers and this interpreter's torch version; created
    or repaired when it lacks either."""
    python = os.path.join(VENV, "bin", "python")

    def installed() -> str:
        probe = subprocess.run([python, "-c", "import torch, diffusers; print(torch.__version__)"],
                               capture_output=True, text=True)
        return probe.stdout.strip() if probe.returncode == 0 else ""

    if not os.path.exists(python):
        print(f"creating {os.path.relpath(VENV, REPO)}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    if installed() != torch_version:
        # Pinning torch keeps pip from pulling another release in with diffusers.
        subprocess.run([python, "-m", "pip", "install", "-q", f"torch=={torch_version.split('+')[0]}", "diffusers"],
                       check=True)
        if installed() != torch_version:
            sys.exit(f"{VENV} has torch {installed() or '(none)'}, kiln's side runs {torch_version}")
    return python


def run_child(python: str, spec: dict) -> dict:
    # Passive OpenMP waits, as `kiln` sets them: spinning threads on busy cores starve everything else.
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1")
    out = subprocess.run([python, os.path.abspath(__file__), "--_run", json.dumps(spec)], env=env, cwd=REPO,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{spec['side']} {spec['mode']} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> dict:
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "min": min(values), "max": max(values)}


def machine() -> str:
    model = "unknown CPU"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="ascii") as f:
        mem = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1)) / 2**20
    return f"{os.cpu_count()} cores (`{model}`), {mem:.0f} GiB RAM, {platform.platform()}"


def git_state() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("log", "-1", "--format=%h %s")
    dirty = git("status", "--porcelain", "--", "modules/blocks/unet.py")
    return f"commit `{head[:60]}`" + (", with uncommitted changes to modules/blocks/unet.py" if dirty else "")


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
        "fresh process (diffusers' under bench/.venv-diffusers, same torch), with OMP_WAIT_POLICY=PASSIVE "
        "(what `kiln` sets); the sides alternate, "
        f"{args.rounds} rounds of {args.warmup} warm-up and {args.steps} timed steps each.", "",
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
        f"- Command: `{meta['command']}`; {meta['elapsed_s'] / 60:.1f} minutes.",
        f"- Machine: {meta['machine']}. Date: {meta['date']}, at {meta['git']}.",
        f"- Versions: Python {kiln['versions']['python']}, torch {kiln['versions']['torch']} (kiln side) and "
        f"{peer['versions']['torch']} with diffusers {peer['versions']['diffusers']} (Python "
        f"{peer['versions']['python']}).",
        f"- Load average (1 min): {meta['load_before']:.2f} before, {meta['load_after']:.2f} after "
        f"(the benchmark itself keeps {args.threads} threads busy).",
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
                  "time, calls per step).", ""]
        lines += ["| rank | " + " | ".join(f"{s} (self CPU {profiles[s]['self_cpu_ms_per_step']:.0f} ms/step)"
                                        for s in SIDES) + " |", "|---|---|---|"]
        for i in range(args.top):
            cells = []
            for side in SIDES:
                top = profiles[side]["top"]
                cells.append(f"`{top[i]['op']}` {top[i]['ms']:.0f} ({top[i]['share']:.0%}, {top[i]['calls']:.0f})"
                             if i < len(top) else "")
            lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_section(section: str) -> None:
    """Replace the section (its heading up to the next level-2 heading) in BENCHMARKS.md, or append it."""
    with open(BENCHMARKS, encoding="utf-8") as f:
        text = f.read()
    start = text.find(f"\n{SECTION}\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        after = re.search(r"^## ", text[start + len(SECTION) + 2:], flags=re.M)
        end = start + len(SECTION) + 2 + after.start() if after else len(text)
        text = text[:start + 1] + section + ("\n" + text[end:] if after else "")
    tmp = BENCHMARKS + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, BENCHMARKS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (a run of each side per round)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on both sides")
    parser.add_argument("--write", action="store_true", help=f"replace the '{SECTION[3:]}' section of BENCHMARKS.md")
    parser.add_argument("--profile", action="store_true", help="only profile both sides and print the top ops")
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps (with --profile or --write)")
    parser.add_argument("--top", type=int, default=12, help="ops listed per side in the profile")
    parser.add_argument("--_run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._run:
        print(json.dumps(run_side(json.loads(args._run))))
        return

    import torch

    t0, load_before = time.time(), os.getloadavg()[0]
    pythons = {"kiln": sys.executable, "diffusers": venv_python(torch.__version__)}
    base = {"batch": args.batch, "threads": args.threads, "warmup": args.warmup}

    def profile_both() -> dict:
        spec = base | {"mode": "profile", "steps": args.profile_steps, "top": args.top}
        return {side: run_child(pythons[side], spec | {"side": side}) for side in SIDES}

    if args.profile:
        for side, result in profile_both().items():
            print(f"\n== {side}: self CPU {result['self_cpu_ms_per_step']:.0f} ms per step, top ops")
            for row in result["top"]:
                print(f"{row['ms']:9.1f} ms {row['share']:6.1%} {row['calls']:6.0f} calls  {row['op']}")
        return

    info = {side: run_child(pythons[side], base | {"mode": "info", "side": side}) for side in SIDES}
    if info["kiln"]["batch_checksum"] != info["diffusers"]["batch_checksum"]:
        sys.exit("the two sides drew different batches")
    for side in SIDES:
        print(f"{side}: {call(side)}\n  {info[side]['params']:,} parameters, "
              f"{info[side]['flops'] / 1e9:.2f} GFLOP per forward + backward", file=sys.stderr)
    print(f"kiln / diffusers: parameters {info['kiln']['params'] / info['diffusers']['params']:.4f}, "
          f"FLOPs {info['kiln']['flops'] / info['diffusers']['flops']:.4f}", file=sys.stderr)

    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    ratios = []
    for round_ in range(args.rounds):
        for side in SIDES:
            load = os.getloadavg()[0]
            result = run_child(pythons[side], base | {"mode": "time", "side": side, "steps": args.steps})
            result["load1_before"] = load
            runs[side].append(result)
            print(f"round {round_ + 1} {side}: median step {statistics.median(result['wall_s']) * 1e3:.0f} ms, "
                  f"peak RSS {result['peak_rss_mib']:.0f} MiB, load {os.getloadavg()[0]:.2f}", file=sys.stderr)
        kiln, peer = (statistics.median(runs[side][-1]["wall_s"]) for side in SIDES)
        ratios.append(peer / kiln)  # step times: the inverse of the throughput ratio
    profiles = profile_both() if args.write else {}

    meta = {"command": shlex.join(["python3", os.path.relpath(os.path.abspath(__file__), REPO), *sys.argv[1:]]),
            "machine": machine(), "git": git_state(), "load_before": load_before, "load_after": os.getloadavg()[0],
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "elapsed_s": time.time() - t0}
    section = report(args, info, runs, ratios, profiles, meta)
    print(section)
    if args.write:
        write_section(section)
        print(f"wrote the '{SECTION[3:]}' section of {os.path.relpath(BENCHMARKS)}", file=sys.stderr)
    from common import write_result  # bench/results/unet.json for bench/run.py (bench/README.md)

    write_result("unet", {"section": SECTION[3:], "ratio": statistics.median(ratios),
                          "compared": "kiln UNet / diffusers UNet2DConditionModel train step, matched params and FLOPs",
                          "detail": f"rounds {min(ratios):.2f}-{max(ratios):.2f}", "command": meta["command"],
                          "date": meta["date"], "load1": [meta["load_before"], meta["load_after"]],
                          "written": args.write})


if __name__ == "__main__":
    main()
