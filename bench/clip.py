"""CLIP benchmark: a training step of kiln's CLIP against open_clip's (open-clip-torch) at kiln's tiny config, on CPU.

    python3 bench/clip.py [--steps 20] [--rounds 3] [--warmup 3] [--batch 128] [--threads 2] [--write]
    python3 bench/clip.py --profile     # top ops by self CPU time of each side's step, instead

A benchmark, not a test: it asserts nothing. A step is the optimizer's zero_grad, the forward pass of
both towers, the symmetric contrastive loss with the learnable logit scale, backward, an AdamW step
and the clamp of the logit scale to 100 (both frameworks clamp after each step). One fixed batch,
drawn from the same seed on both sides: B random 3 x S x S images and B captions of random byte
tokens, each SOT, 1 to context - 2 bytes (uniform), EOT, then padding, as kiln's ByteTokenizer lays
them out.

Three sides, at the model sizes of configs/clip/tiny.yaml (read from it):

* kiln: `kiln.modules.clip.networks.CLIP` with the config as written (`length_buckets: 4`: captions
  run in 4 groups of similar length, each cut after its longest EOT; exact, since padding after
  EOT cannot reach it under the causal mask), and `kiln.modules.clip.loss.clip_loss`.
* kiln, full context: the same with `length_buckets=1`, so the text tower runs every caption at the
  full context length, as open_clip does: the same FLOPs as open_clip.
* open_clip: `open_clip.model.CLIP` built from the config dict open_clip's model JSONs hold
  (`embed_dim`, `vision_cfg`, `text_cfg`), at the same widths, depths, heads, patch size, context
  length and vocabulary (kiln's 259 byte tokens); the text tower pools at the EOT id, as kiln does
  (`pool_type="eos"`), and `open_clip.loss.ClipLoss`.

The parameter counts are equal by construction (both are the paper's layout); `FlopCounterMode` counts
each side's forward + backward. All sides use the same AdamW (decay on matrices only, lr, weight decay
and betas as kiln's tiny config; `foreach=True`, as kiln's optimizer recipe; open_clip's training script
leaves torch's CPU default, a per-tensor loop) and float32.

open_clip needs torchvision, which has no build for the CPU torch that kiln tests with: every side runs
under the python of bench/.venv-openclip (torch, torchvision and open-clip-torch; created when missing),
kiln's sides with `kiln.*` mapped onto this checkout, so all sides run the same torch and kernels. Every
run is a fresh process, so each side's peak memory is its own; the sides alternate, the order rotating
each round, and each round's ratios compare that round's runs. All sides get the same
`torch.set_num_threads`, OMP_NUM_THREADS and the process settings `kiln` makes for itself (launch/host.py: OMP_WAIT_POLICY=PASSIVE,
glibc malloc thresholds).

Every measuring run leaves bench/results/clip.json (bench/README.md, "Result files"); --write also
replaces the "CLIP" section of BENCHMARKS.md (or appends it) with the table, the configurations, the
command, machine, date, versions, load averages and a short profile of each side.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

from common import (REPO, add_write_and_profile, alternate, count_flops, load1, meta_lines, parse_args, print_top_ops,
                    run_child, run_meta, save, spread, timed_steps, top_ops_table, venv_python)

VENV = os.path.join(REPO, "bench", ".venv-openclip")
# torchvision 0.29.1 is the build for torch 2.14.1 that the machines carry (bench/README.md).
PEER_PINS = ("torch==2.14.1", "torchvision==0.29.1", "open-clip-torch")
CONFIG = os.path.join(REPO, "configs", "clip", "tiny.yaml")
SECTION = "## CLIP"
SIDES = ("kiln", "kiln_full", "open_clip")
LABELS = {"kiln": "kiln", "kiln_full": "kiln, full context", "open_clip": "open_clip"}


# -- one side, in its own process -----------------------------------------------------------------

def _import_kiln() -> None:
    """kiln.* importable: installed (the main environment), or else mapped onto this checkout, whose
    top-level folders are kiln's subpackages (pyproject's package-dir)."""
    try:
        import kiln.modules  # noqa: F401
    except ImportError:
        import types

        kiln = types.ModuleType("kiln")
        kiln.__path__ = [REPO]
        sys.modules["kiln"] = kiln


def batch(spec: dict):
    """Images and token ids, the same on every side (same seed, same torch)."""
    import torch

    b, size, ctx = spec["batch"], spec["image_size"], spec["context_length"]
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(b, 3, size, size, generator=generator)
    n = torch.randint(1, ctx - 1, (b,), generator=generator)  # caption bytes: 1 .. ctx - 2
    body = torch.randint(spec["first_byte"], spec["vocab_size"], (b, ctx), generator=generator)
    pos = torch.arange(ctx)
    tokens = torch.where(pos <= n[:, None], body, spec["pad"])
    tokens[:, 0] = spec["sot"]
    tokens[torch.arange(b), n + 1] = spec["eot"]
    return images, tokens


def adamw(model, opt: dict):
    import torch

    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": opt["weight_decay"]},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"], foreach=True)


def build(spec: dict):
    """The model, the loss of one forward on the fixed batch, one training step, and a checksum of the batch."""
    import torch

    images, tokens = batch(spec)
    torch.manual_seed(0)
    if spec["side"] == "open_clip":
        from open_clip.loss import ClipLoss
        from open_clip.model import CLIP

        model = CLIP(**spec["open_clip"])
        criterion = ClipLoss()

        def loss():
            return criterion(*model(images, tokens))
    else:
        _import_kiln()
        from kiln.modules.clip.loss import clip_loss
        from kiln.modules.clip.networks import CLIP, CLIPConfig

        model = CLIP(CLIPConfig.from_dict(spec[spec["side"]]))

        def loss():
            return clip_loss(*model(images, tokens))
    model.train()
    optimizer = adamw(model, spec["optimizer"])
    max_log_scale = math.log(100)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_log_scale)

    checksum = float(images.double().sum() + tokens.double().sum())
    return model, loss, step, checksum


def run_side(spec: dict) -> dict:
    """Info (parameters, FLOPs, versions), a timed run, or a profile of one side, in this process."""
    import torch

    torch.set_num_threads(spec["threads"])
    model, loss, step, checksum = build(spec)
    out = {"side": spec["side"], "threads": torch.get_num_threads(), "batch_checksum": checksum}
    if spec["mode"] == "info":
        versions = {"python": platform.python_version(), "torch": torch.__version__}
        if spec["side"] == "open_clip":
            import open_clip
            import torchvision

            versions |= {"open_clip": open_clip.__version__, "torchvision": torchvision.__version__}
        return out | {"params": sum(p.numel() for p in model.parameters()),
                      "param_tensors": sum(1 for _ in model.parameters()),
                      "flops": count_flops(lambda: loss().backward()), "loss0": float(loss()), "versions": versions}
    return out | timed_steps(step, spec)


# -- the driver -----------------------------------------------------------------------------------

def configs(batch_size: int) -> dict:
    """The three sides' model configurations, the batch layout and the optimizer, from configs/clip/tiny.yaml."""
    import yaml

    from kiln.modules.blocks import tokenizer
    from kiln.modules.clip.networks import CLIPConfig

    with open(CONFIG, encoding="utf-8") as f:
        model = yaml.safe_load(f)["model"]["init_args"]
    kiln = CLIPConfig.from_dict({"embed_dim": model["embed_dim"], "vision": model["vision"],
                                 "text": model["text"]}).to_dict()
    full = json.loads(json.dumps(kiln))
    full["text"]["length_buckets"] = 1
    v, t = kiln["vision"], kiln["text"]
    if v["width"] % v["heads"]:
        sys.exit(f"vision width {v['width']} is not a multiple of its {v['heads']} heads")
    peer = {"embed_dim": kiln["embed_dim"],
            "vision_cfg": {"image_size": v["image_size"], "patch_size": v["patch_size"], "width": v["width"],
                           "layers": v["layers"], "head_width": v["width"] // v["heads"], "mlp_ratio": v["mlp_ratio"]},
            "text_cfg": {"context_length": t["context_length"], "vocab_size": t["vocab_size"], "width": t["width"],
                         "heads": t["heads"], "layers": t["layers"], "mlp_ratio": t["mlp_ratio"],
                         "pool_type": "eos", "eos_id": tokenizer.EOT},
            "init_logit_scale": kiln["init_logit_scale"]}
    # CLIPModule's defaults for what the config leaves out.
    optimizer = {"lr": model.get("lr", 5e-4), "weight_decay": model.get("weight_decay", 0.2),
                 "betas": model.get("betas", [0.9, 0.98]), "eps": model.get("eps", 1e-6)}
    return {"kiln": kiln, "kiln_full": full, "open_clip": peer, "optimizer": optimizer, "batch": batch_size,
            "image_size": v["image_size"], "context_length": t["context_length"], "vocab_size": t["vocab_size"],
            "pad": tokenizer.PAD, "sot": tokenizer.SOT, "eot": tokenizer.EOT, "first_byte": tokenizer._OFFSET}


def peer_python() -> str:
    """bench/.venv-openclip's python with the pinned torch, torchvision and open_clip."""
    return venv_python(VENV, "import torch, torchvision, open_clip; print(torch.__version__.split('+')[0])",
                       PEER_PINS[0].split("==")[1], list(PEER_PINS))


def summarize(runs: dict, ratios: dict, cpu_ratios: dict) -> dict:
    return {"ratios": ratios,
            "ratio_median": {s: statistics.median(r) for s, r in ratios.items()},
            "cpu_ratios": cpu_ratios,
            "cpu_ratio_median": {s: statistics.median(r) for s, r in cpu_ratios.items()},
            "cpu_ms": {s: statistics.median(c * 1e3 for r in runs[s] for c in r["cpu_s"]) for s in SIDES},
            "steps": {s: spread([w for r in runs[s] for w in r["wall_s"]]) for s in SIDES},
            "round_medians_ms": {s: [statistics.median(r["wall_s"]) * 1e3 for r in runs[s]] for s in SIDES},
            "peak_rss_mib": {s: statistics.median(r["peak_rss_mib"] for r in runs[s]) for s in SIDES},
            "rss_before_step_mib": {s: statistics.median(r["rss_before_step_mib"] for r in runs[s]) for s in SIDES}}


def _call(cfg: dict) -> str:
    return json.dumps(cfg, separators=(", ", ": "))


def report(args, cfg: dict, info: dict, runs: dict, summary: dict, profiles: dict, meta: dict) -> str:
    """The markdown section: everything in it comes from this run."""
    peer = info["open_clip"]
    v, t = cfg["kiln"]["vision"], cfg["kiln"]["text"]
    lines = [
        f"## {args.section}", "",
        "One training step of kiln's CLIP (modules/clip/) against open_clip's `CLIP` (open-clip-torch), on CPU "
        f"with {args.threads} threads each, float32: zero_grad, forward of both towers, the symmetric contrastive "
        "loss with the learnable logit scale (kiln's `clip_loss`, open_clip's `ClipLoss`), backward, AdamW step, "
        "clamp of the logit scale. The same AdamW on all sides (decay on matrices, lr "
        f"{cfg['optimizer']['lr']:g}, weight decay {cfg['optimizer']['weight_decay']:g}, betas "
        f"{tuple(cfg['optimizer']['betas'])}, eps {cfg['optimizer']['eps']:g}, `foreach=True`). "
        f"Model sizes from configs/clip/tiny.yaml: embedding {cfg['kiln']['embed_dim']}; vision ViT "
        f"{v['image_size']} px, patch {v['patch_size']}, width {v['width']}, {v['layers']} layers, {v['heads']} heads; "
        f"text transformer context {t['context_length']}, vocabulary {t['vocab_size']} (kiln's bytes), width "
        f"{t['width']}, {t['layers']} layers, {t['heads']} heads, causal, pooled at EOT. One fixed batch, the same "
        f"on all sides: {args.batch} random images and {args.batch} captions of random bytes, each 1 to "
        f"{t['context_length'] - 2} bytes long (uniform) between SOT and EOT, then padding. Each run is a fresh "
        "process under bench/.venv-openclip's python (all sides: same torch); the sides alternate, the order "
        f"rotating each round, {args.rounds} rounds of {args.warmup} warm-up and {args.steps} timed steps each.", "",
        f"- **kiln**: `CLIP(CLIPConfig.from_dict({_call(cfg['kiln'])}))` - configs/clip/tiny.yaml as written: "
        f"`length_buckets: {t['length_buckets']}` runs the captions in groups of similar length, each cut after "
        "its longest EOT (exact: padding after EOT cannot reach it under the causal mask; tests/test_clip_units.py).",
        "- **kiln, full context**: the same with `length_buckets=1`: every caption at the full context length, "
        "as open_clip runs it (the same FLOPs).",
        f"- **open_clip**: `open_clip.model.CLIP(**{_call(cfg['open_clip'])})`.", "",
        "| side | parameters | GFLOP per step (fwd + bwd) | step time, median (IQR; min-max) | samples/s "
        "| throughput / open_clip, median (per round) | CPU time per step | CPU time: open_clip / side, median "
        "(per round) | peak RSS (RSS before the first step) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(side: str, kind: str) -> str:  # kind: "" (wall time) or "cpu_"
        if side not in summary[f"{kind}ratios"]:
            return "baseline"
        return (f"**{summary[f'{kind}ratio_median'][side]:.2f}** ("
                + ", ".join(f"{x:.2f}" for x in summary[f"{kind}ratios"][side]) + ")")

    for side in SIDES:
        wall = summary["steps"][side]
        lines.append(
            f"| {LABELS[side]} | {info[side]['params']:,} ({info[side]['param_tensors']} tensors) "
            f"| {info[side]['flops'] / 1e9:.2f} | {wall['median'] * 1e3:.1f} ms ({wall['q1'] * 1e3:.1f}-"
            f"{wall['q3'] * 1e3:.1f}; {wall['min'] * 1e3:.1f}-{wall['max'] * 1e3:.1f}) "
            f"| {args.batch / wall['median']:.0f} | {ratio(side, '')} | {summary['cpu_ms'][side]:.0f} ms "
            f"| {ratio(side, 'cpu_')} "
            f"| {summary['peak_rss_mib'][side]:.0f} MiB ({summary['rss_before_step_mib'][side]:.0f} MiB) |")
    order = [[SIDES[(r + i) % len(SIDES)] for i in range(len(SIDES))] for r in range(args.rounds)]
    loads = "; ".join(", ".join(f"{LABELS[s]} {runs[s][r]['load1_before']:.2f}" for s in order[r])
                      for r in range(args.rounds))
    lines += [
        "",
        f"**kiln / open_clip throughput: {summary['ratio_median']['kiln']:.2f}** as configured, "
        f"{summary['ratio_median']['kiln_full']:.2f} at full context (medians of the per-round ratios of the median "
        f"step times); in CPU time per step {summary['cpu_ratio_median']['kiln']:.2f} and "
        f"{summary['cpu_ratio_median']['kiln_full']:.2f}, which other jobs on the cores stretch far less than the "
        "wall time (they add waiting, not work). Parameters "
        f"kiln / open_clip {info['kiln']['params'] / peer['params']:.4f}; FLOPs "
        f"{info['kiln']['flops'] / peer['flops']:.3f} as configured, {info['kiln_full']['flops'] / peer['flops']:.3f} "
        "at full context. Per-round median step times: "
        + "; ".join(f"{LABELS[s]} " + ", ".join(f"{x:.1f}" for x in summary["round_medians_ms"][s]) + " ms"
                    for s in SIDES)
        + ". Loss at the first step (different initialisations): "
        + ", ".join(f"{LABELS[s]} {info[s]['loss0']:.4f}" for s in SIDES) + ".", "",
        *meta_lines(meta, f"Python {peer['versions']['python']}, torch {peer['versions']['torch']} (all sides), "
                          f"torchvision {peer['versions']['torchvision']}, open_clip {peer['versions']['open_clip']}. "
                          "kiln's tests run torch's CPU build of an earlier release, for which torchvision (which "
                          "open_clip imports) has no CPU build on these machines, so kiln runs here under the peer's "
                          "torch",
                    f"; as each run started, by round: {loads}. The benchmark itself keeps {args.threads} "
                    f"thread{'s' * (args.threads != 1)} busy; other jobs on the cores slow both sides, and the "
                    "per-round ratios show how much that moved the comparison"),
        "- FLOPs: `torch.utils.flop_counter.FlopCounterMode` over one forward + backward of the batch (matrix "
        "products, convolutions, attention; the CPU attention kernel counted with torch's formulas for the GPU "
        "ones, causal attention as full). Peak RSS is `getrusage` max RSS of the side's process, imports included "
        "(open_clip imports torchvision and timm); the RSS before the first step has the model, the batch and the "
        "optimizer without its state. CPU time counts every thread of the process.",
    ]
    if profiles:
        lines += ["", "### Where the time goes", "",
                  f"`torch.profiler` over {args.profile_steps} steps after {args.warmup} warm-up steps, one fresh "
                  "process per side; ops by self CPU time, ms per step (share of the step's self time, calls per step). "
                  "The profiler times each op by the clock, so other jobs on the cores stretch these times; the "
                  "shares and call counts hold better.",
                  "", *top_ops_table(profiles, args.top, digits=1, label=LABELS.get)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each a run of every side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    parser.add_argument("--batch", type=int, default=128, help="batch size (configs/clip/tiny.yaml's)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on every side")
    add_write_and_profile(parser, SECTION, 3)
    parser.add_argument("--section", default=SECTION[3:], help="the BENCHMARKS.md heading to write")
    parser.add_argument("--result", default="clip", help="the result file's name under bench/results/")
    args = parse_args(parser, run_side)

    t0, load_before = time.time(), load1()
    cfg = configs(args.batch)
    python = peer_python()
    base = cfg | {"threads": args.threads, "warmup": args.warmup}

    def child(spec: dict) -> dict:
        return run_child(__file__, spec, f"{spec['side']} {spec['mode']}", python,
                         HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")

    def profile_all() -> dict:
        spec = base | {"mode": "profile", "steps": args.profile_steps, "top": args.top}
        return {side: child(spec | {"side": side}) for side in SIDES}

    if args.profile:
        print_top_ops(profile_all(), digits=1, label=LABELS.get)
        return

    info = {side: child(base | {"mode": "info", "side": side}) for side in SIDES}
    if len({info[side]["batch_checksum"] for side in SIDES}) != 1:
        sys.exit("the sides drew different batches")
    for side in SIDES:
        print(f"{LABELS[side]}: {info[side]['params']:,} parameters, "
              f"{info[side]['flops'] / 1e9:.3f} GFLOP per forward + backward, loss {info[side]['loss0']:.4f}",
              file=sys.stderr)
    print(f"kiln / open_clip: parameters {info['kiln']['params'] / info['open_clip']['params']:.4f}, FLOPs "
          f"{info['kiln']['flops'] / info['open_clip']['flops']:.4f} (full context "
          f"{info['kiln_full']['flops'] / info['open_clip']['flops']:.4f})", file=sys.stderr)

    timed = base | {"mode": "time", "steps": args.steps}
    runs = alternate(args.rounds, SIDES, lambda side, _: child(timed | {"side": side}),
                     lambda r: f"median step {statistics.median(r['wall_s']) * 1e3:.1f} ms, "
                               f"peak RSS {r['peak_rss_mib']:.0f} MiB", label=LABELS.get, rotate=True)

    def per_round(side: str, key: str) -> list[float]:  # step times: the inverse of the throughput ratio
        return [statistics.median(p[key]) / statistics.median(r[key]) for r, p in zip(runs[side], runs["open_clip"])]

    ratios = {side: per_round(side, "wall_s") for side in ("kiln", "kiln_full")}
    cpu_ratios = {side: per_round(side, "cpu_s") for side in ("kiln", "kiln_full")}
    summary = summarize(runs, ratios, cpu_ratios)
    profiles = profile_all() if args.write else {}

    meta = run_meta(__file__, t0, load_before, ("modules/clip", "modules/blocks/transformer.py", "bench/clip.py"))
    section = report(args, cfg, info, runs, summary, profiles, meta)
    print(section)
    med = summary["ratio_median"]
    result = {
        "compared": "kiln CLIP / open_clip CLIP train step, tiny config, same params",
        "ratio": med["kiln"],
        "detail": f"as configured {med['kiln']:.2f} (rounds {min(ratios['kiln']):.2f}-{max(ratios['kiln']):.2f}); "
                  f"full context, same FLOPs {med['kiln_full']:.2f} (rounds {min(ratios['kiln_full']):.2f}-"
                  f"{max(ratios['kiln_full']):.2f}); CPU time {summary['cpu_ratio_median']['kiln']:.2f} and "
                  f"{summary['cpu_ratio_median']['kiln_full']:.2f}",
        **summary,
        "params": {s: info[s]["params"] for s in SIDES}, "flops": {s: info[s]["flops"] for s in SIDES},
        "versions": info["open_clip"]["versions"],
    }
    save(args.result, result, f"## {args.section}", section, meta, args.write)


if __name__ == "__main__":
    main()
