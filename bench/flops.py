"""Achieved FLOP/s: kiln's CLIP and U-Net training steps as a fraction of the machine's measured
matrix-product peak (on a GPU: of the card's bf16 dense peak, i.e. MFU).

    python3 bench/flops.py [--steps 20] [--warmup 3] [--rounds 3] [--threads 2] [--gemm 2048] [--write]
    python3 bench/flops.py --device cuda --precision bf16 --models unet,clip-b16 [--batch-unet 256]   # bench/gpu.sh

A benchmark, not a test: it asserts nothing. Per round, each in a fresh process:

* peak: the best of 10 float32 `torch.mm` of two N x N matrices (N = --gemm) after 2 warm-ups,
  2 N^3 FLOPs each, with the same thread count (on a GPU: bf16, N = 8192).
* clip: the CLIP tiny config's module (configs/clip/tiny.yaml) on one real batch of its data
  (128 captioned 16 px emoji, as row 1 uses): zero_grad, forward, the contrastive loss, backward,
  the module's AdamW step. On a GPU, `clip-b16` is the ViT-B/16 config (configs/clip/vit-b-16.yaml)
  on random 224 px images and captions.
* unet: the U-Net of the U-Net row (bench/unet.py's `CONFIGS["kiln"]`, batch 16 of 32 px, 16 text
  tokens): zero_grad, forward, MSE, backward, AdamW.

FLOPs per step are counted once by `torch.utils.flop_counter.FlopCounterMode` over forward +
backward (matrix products, convolutions and attention; element-wise work and the optimizer are
not counted, as MFU conventions do; causal attention is counted as full). Achieved FLOP/s is
that count over the median step time; the fraction divides it by the round's peak.

--write replaces the "Achieved FLOP/s" section of BENCHMARKS.md and leaves bench/results/flops.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from common import (REPO, alternate, count_flops, load1, meta_lines, parse_args, peak_rss_mib, run_child, run_meta,
                    save, spread, sync, versions)

SECTION = "## Achieved FLOP/s"
# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets; matched
# against torch.cuda.get_device_name() in this order.
GPU_BF16_PEAK = [("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0),
                 ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0)]


def card_peak(name: str) -> float | None:
    for key, tflops in GPU_BF16_PEAK:
        if key in name:
            return tflops * 1e12
    return None


def gemm(spec: dict) -> dict:
    import torch

    n = spec["gemm"]
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    g = torch.Generator(device=spec["device"]).manual_seed(0)
    a = torch.randn(n, n, device=spec["device"], dtype=dtype, generator=g)
    b = torch.randn(n, n, device=spec["device"], dtype=dtype, generator=g)
    times = []
    for i in range(12):
        sync(spec["device"])
        start = time.perf_counter()
        torch.mm(a, b)
        sync(spec["device"])
        if i >= 2:
            times.append(time.perf_counter() - start)
    flops = 2 * n ** 3
    return {"n": n, "dtype": str(dtype), "best_flops": flops / min(times), "median_flops": flops / statistics.median(times)}


def build(spec: dict):
    """(parameters, step, loss_fn) for the model of `spec`, on its device."""
    import torch

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    if spec["model"] == "unet":
        import torch.nn.functional as F

        import unet  # bench/unet.py: the U-Net row's configuration
        from kiln.modules.blocks.unet import UNet

        config = unet.CONFIGS["kiln"]
        b = spec["batch"] or 16
        g = torch.Generator().manual_seed(1)
        x = torch.randn(b, 3, unet.SIZE, unet.SIZE, generator=g).to(device)
        t = torch.randint(0, 1000, (b,), generator=g).to(device)
        context = torch.randn(b, unet.TOKENS, unet.CONTEXT_DIM, generator=g).to(device)
        noise = torch.randn(b, 3, unet.SIZE, unet.SIZE, generator=g).to(device)
        model = UNet(**config).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def loss_fn():
            return F.mse_loss(model(x, t, context), noise)

        described = f"UNet({', '.join(f'{k}={v!r}' for k, v in config.items())}), batch {b}"
    else:
        from types import SimpleNamespace

        from overhead import _config, _loss_clip, _module_from_config

        config = _config("clip") if spec["model"] == "clip" else _load(spec["model"])
        module = _module_from_config(config).to(device).train()
        if spec["batch_path"]:
            batch = torch.load(spec["batch_path"], weights_only=True)
        else:  # random images and captions at the config's size
            size, b = module.hparams.vision["image_size"], spec["batch"] or 128
            g = torch.Generator().manual_seed(1)
            batch = {"image": torch.rand(b, 3, size, size, generator=g) * 2 - 1,
                     "caption": [f"emoji number {i} of {b}: a small picture" for i in range(b)]}
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        module.trainer = SimpleNamespace(max_steps=10_000, world_size=1)
        optimizer = module.configure_optimizers()["optimizer"]
        module.trainer = None
        model = module

        def loss_fn():
            return _loss_clip(module, batch)

        v, tx = module.hparams.vision, module.hparams.text
        described = (f"CLIP vision {v['image_size']} px / patch {v['patch_size']}, width {v['width']}, {v['layers']} "
                     f"layers; text {tx['context_length']} tokens, width {tx['width']}, {tx['layers']} layers; "
                     f"batch {len(batch['caption'])}")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["precision"] == "bf16")

    def forward_backward():
        with autocast:
            loss = loss_fn()
        loss.backward()

    def step():
        optimizer.zero_grad(set_to_none=True)
        forward_backward()
        optimizer.step()

    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return params, step, forward_backward, described


def _load(model: str) -> dict:
    import yaml

    path = {"clip-b16": "configs/clip/vit-b-16.yaml"}[model]
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return yaml.safe_load(f)


def run_side(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["model"] == "peak":
        return gemm(spec)
    params, step, forward_backward, described = build(spec)
    flops = count_flops(forward_backward)
    for _ in range(spec["warmup"]):
        step()
    sync(spec["device"])
    wall = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        step()
        sync(spec["device"])
        wall.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if spec["device"].startswith("cuda") else peak_rss_mib()
    return {"params": params, "flops": flops, "wall_s": wall, "described": described, "peak_mib": peak,
            "achieved_flops": flops / statistics.median(wall)}


def report(args, models: list[str], runs: dict, fractions: dict, meta: dict) -> str:
    gpu = args.device != "cpu"
    peaks = [r["best_flops"] for r in runs["peak"]]
    against = (f"the card's bf16 dense peak from its data sheet, {meta['card_peak'] / 1e12:.0f} TFLOP/s "
               f"({meta['card']})" if gpu else "the best float32 GEMM of the same round")
    lines = [
        f"## {args.section}", "",
        f"Achieved FLOP/s of kiln's training steps on {meta['card'] if gpu else 'CPU'} as a fraction of {against}. "
        f"FLOPs per step by `torch.utils.flop_counter.FlopCounterMode` over forward + backward (matrix products, "
        "convolutions, attention; the element-wise work and the optimizer step are not counted; causal "
        f"attention counted as full); the step time (zero_grad, forward, loss, backward, AdamW) is the median of "
        f"{args.steps} timed steps after {args.warmup} warm-up. Peak, CLIP and U-Net each run in a fresh process, in "
        f"that order, {args.rounds} round(s); {args.threads} threads everywhere"
        + (f"; precision {args.precision} (autocast)" if gpu else "") + ".", "",
        f"- **peak**: best of 10 `torch.mm` of {runs['peak'][0]['n']}x{runs['peak'][0]['n']} "
        f"{runs['peak'][0]['dtype']} matrices: "
        + ", ".join(f"{p / 1e9:.1f}" for p in peaks) + " GFLOP/s per round (medians of the 10: "
        + ", ".join(f"{r['median_flops'] / 1e9:.1f}" for r in runs["peak"]) + ").",
    ]
    for model in models:
        lines.append(f"- **{model}**: {runs[model][0]['described']}; {runs[model][0]['params']:,} parameters.")
    lines += ["", "| step | GFLOP per step | step time, median (IQR; min-max) | achieved GFLOP/s | fraction of peak, "
              "median (per round) | peak memory |", "|---|---|---|---|---|---|"]
    for model in models:
        wall = spread([w for r in runs[model] for w in r["wall_s"]])
        achieved = statistics.median(r["achieved_flops"] for r in runs[model])
        mem = statistics.median(r["peak_mib"] for r in runs[model])
        lines.append(f"| {model} | {runs[model][0]['flops'] / 1e9:.2f} | {wall['median'] * 1e3:.1f} ms "
                     f"({wall['q1'] * 1e3:.1f}-{wall['q3'] * 1e3:.1f}; {wall['min'] * 1e3:.1f}-{wall['max'] * 1e3:.1f}) "
                     f"| {achieved / 1e9:.1f} | **{statistics.median(fractions[model]):.1%}** "
                     f"({', '.join(f'{f:.1%}' for f in fractions[model])}) "
                     f"| {mem:.0f} MiB {'(CUDA max allocated)' if gpu else '(peak RSS)'} |")
    lines += [
        "",
        "1-minute load average as each run started: " + ", ".join(
            f"{r['load1_before']:.2f}" for i in range(args.rounds) for r in [runs[k][i] for k in ["peak", *models]])
        + f" (peak, {', '.join(models)}, per round).", "",
        *meta_lines(meta, meta["versions"]),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="clip,unet", help="comma-separated: clip, unet, clip-b16")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gemm", type=int, help="GEMM side for the peak (default 2048 on CPU, 8192 on a GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32", choices=("32", "bf16"))
    parser.add_argument("--batch-unet", type=int, default=0, help="U-Net batch (default 16)")
    parser.add_argument("--batch-clip", type=int, default=0, help="clip-b16 batch (default 128); clip uses its data's")
    parser.add_argument("--section", default=SECTION[3:], help="the BENCHMARKS.md heading to write")
    parser.add_argument("--write", action="store_true", help=f"replace the '{SECTION[3:]}' section of BENCHMARKS.md")
    parser.add_argument("--result", default="flops", help="the result file's name under bench/results/")
    args = parse_args(parser, run_side)

    gpu = args.device != "cpu"
    models = [m for m in args.models.split(",") if m]
    t0, load_before = time.time(), load1()
    base = {"threads": args.threads, "warmup": args.warmup, "steps": args.steps, "device": args.device,
            "precision": args.precision, "gemm": args.gemm or (8192 if gpu else 2048), "batch_path": None}
    card, peak_card = None, None
    if gpu:
        import torch

        card = torch.cuda.get_device_name()
        peak_card = card_peak(card)
        if peak_card is None:
            print(f"no known bf16 peak for '{card}': fractions are of the measured GEMM", file=sys.stderr)
    import tempfile

    peaks = []  # each round's GEMM peak, FLOP/s

    def run(model: str, _) -> dict:
        spec = base | {"model": model, "batch": {"unet": args.batch_unet, "clip-b16": args.batch_clip}.get(model, 0)}
        if model != "clip":
            spec["batch_path"] = None
        result = run_child(__file__, spec, model)
        if model == "peak":
            peaks.append(result["best_flops"])
        else:
            result["fraction"] = result["achieved_flops"] / (peak_card or peaks[-1])
        return result

    def describe(result: dict) -> str:
        if "best_flops" in result:
            return f"{result['best_flops'] / 1e9:.1f} GFLOP/s"
        return (f"{result['flops'] / 1e9:.2f} GFLOP/step, median {statistics.median(result['wall_s']) * 1e3:.1f} ms, "
                f"{result['achieved_flops'] / 1e9:.1f} GFLOP/s, {result['fraction']:.1%} of peak")

    with tempfile.TemporaryDirectory(prefix="kiln-flops-") as tmp:
        if "clip" in models:  # one real batch of the CLIP tiny config's data, as row 1 uses
            from overhead import child as overhead_child

            path = os.path.join(tmp, "batch-clip.pt")
            overhead_child({"mode": "prepare", "model": "clip", "batch": path, "threads": args.threads, "tmp": tmp})
            base["batch_path"] = path
        runs = alternate(args.rounds, ["peak", *models], run, describe)
    fractions = {m: [r["fraction"] for r in runs[m]] for m in models}

    meta = run_meta(__file__, t0, load_before, ("modules", "configs/clip", "bench/flops.py", "bench/unet.py"),
                    versions=versions("torch"), card=card, card_peak=peak_card or 0.0)
    section = report(args, models, runs, fractions, meta)
    print(section)
    headline = {m: statistics.median(fractions[m]) for m in models}
    result = {
        "compared": ("MFU vs the card's bf16 dense peak" if gpu else
                                             "achieved FLOP/s / measured fp32 GEMM peak"),
        "ratio": None, "fractions": fractions, "device": args.device, "card": card,
        "detail": ", ".join(f"{m} {headline[m]:.0%}" for m in models) + " of "
                  + (f"{card} bf16 peak" if gpu else f"the GEMM peak ({statistics.median(r['best_flops'] for r in runs['peak']) / 1e9:.0f} GFLOP/s)"),
        "achieved_flops": {m: statistics.median(r["achieved_flops"] for r in runs[m]) for m in models},
        "flops_per_step": {m: runs[m][0]["flops"] for m in models},
        "peak_flops": [r["best_flops"] for r in runs["peak"]],
    }
    save(args.result, result, f"## {args.section}", section, meta, args.write)


if __name__ == "__main__":
    main()
