"""Image-to-image GANs: a training iteration under `kiln fit` against a plain PyTorch loop of the
same networks, losses and optimisers (issue #27: framework overhead, >= 0.95x).

    python3 bench/translation.py [--models pix2pix,cyclegan,ugatit] [--steps 20] [--warmup 3] [--rounds 3] [--write]

A benchmark, not a test: it asserts nothing. For each family, its learning-check config
(`configs/<family>/learn.yaml`: the papers' networks at 32 px, the batch it trains with):

* kiln: `kiln fit` as `bench/overhead.py` runs it (kiln's entry point, its default callbacks and
  loggers), on one real batch of the config's data handed over at every step; the config's
  in-training evaluation is left out (it runs a few times a run, outside the iterations timed).
* bare: the same module's networks and optimisers (`configure_optimizers`, schedules included),
  driven by hand as the papers' code does: G's outputs once; D's step on real and (pooled,
  detached) generated images with G untouched; G's step with D's weights frozen
  (`requires_grad_(False)`, as the authors' `set_requires_grad`), the family's losses written out
  here in plain PyTorch; U-GAT-IT's rho clipped after G's step.

Each side runs in a fresh process, the sides alternating; the ratio is bare / kiln of the median
iteration time, per round, and the headline the median over rounds. --write replaces the
"Image-to-image GANs" section of BENCHMARKS.md and leaves bench/results/translation.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import overhead
from common import alternate, load1, meta_lines, parse_args, peak_rss_mib, run_child, run_meta, save, spread, versions

SECTION = "## Image-to-image GANs"
CONFIGS = {f: f"configs/{f}/learn.yaml" for f in ("pix2pix", "cyclegan", "ugatit")}
SIDES = ("kiln", "bare")
overhead.CONFIGS.update(CONFIGS)  # its `kiln fit` side reads the config from there
_read_config = overhead._config


def _config(model: str) -> dict:
    """The learn config without its in-training evaluation (`GenerativeEval` runs every quarter of
    a run, not in a timed iteration, and the bare loop has none)."""
    config = _read_config(model)
    trainer = config.get("trainer", {})
    trainer["callbacks"] = [c for c in trainer.get("callbacks") or [] if not c["class_path"].endswith(".GenerativeEval")]
    return config


overhead._config = _config


def prepare(spec: dict) -> dict:
    """One real batch of the config's data as the module receives it (float images), saved."""
    import torch

    config = overhead._config(spec["model"])
    data = config["data"]
    init = dict(data.get("init_args", {}), num_workers=0)
    init["mapper"] = _build(init["mapper"])
    dm = _build({"class_path": data["class_path"], "init_args": init})
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    batch = dm.on_after_batch_transfer(dm.on_before_batch_transfer(batch, 0), 0)
    batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    torch.save(batch, spec["batch"])
    return {k: list(v.shape) for k, v in batch.items()}


def _build(section: dict):
    import importlib

    module, name = section["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**section.get("init_args", {}))


# -- the plain loops ------------------------------------------------------------------------------

def _ls(x, target: float):
    return (x - target).square().mean()


def _pix2pix(m, batch: dict, optimizers, pools) -> float:
    import torch.nn.functional as F

    G, D, (opt_g, opt_d) = m.generator, m.discriminator, optimizers
    x, y = batch["input"], batch["target"]
    fake = G(x)
    D.requires_grad_(True)
    opt_d.zero_grad(set_to_none=True)
    loss_d = 0.5 * (F.softplus(-D(y, x)).mean() + F.softplus(D(fake.detach(), x)).mean())
    loss_d.backward()
    opt_d.step()
    D.requires_grad_(False)
    opt_g.zero_grad(set_to_none=True)
    loss_g = F.softplus(-D(fake, x)).mean() + m.hparams.l1_weight * F.l1_loss(fake, y)
    loss_g.backward()
    opt_g.step()
    return loss_g.item()


def _cyclegan(m, batch: dict, optimizers, pools) -> float:
    import torch.nn.functional as F

    G, D, (opt_g, opt_d), hp = m.generator, m.discriminator, optimizers, m.hparams
    a, b = batch["a"], batch["b"]
    fake_b, fake_a = G.a2b(a), G.b2a(b)
    D.requires_grad_(True)
    opt_d.zero_grad(set_to_none=True)
    pooled_b, pooled_a = pools["b"].query(fake_b.detach()), pools["a"].query(fake_a.detach())
    loss_d = 0.5 * (_ls(D.b(b), 1) + _ls(D.b(pooled_b), 0)) + 0.5 * (_ls(D.a(a), 1) + _ls(D.a(pooled_a), 0))
    loss_d.backward()
    opt_d.step()
    D.requires_grad_(False)
    opt_g.zero_grad(set_to_none=True)
    loss_g = (_ls(D.b(fake_b), 1) + _ls(D.a(fake_a), 1)
              + hp.cycle_weight * (F.l1_loss(G.b2a(fake_b), a) + F.l1_loss(G.a2b(fake_a), b))
              + hp.identity_weight * hp.cycle_weight * (F.l1_loss(G.a2b(b), b) + F.l1_loss(G.b2a(a), a)))
    loss_g.backward()
    opt_g.step()
    return loss_g.item()


def _ugatit(m, batch: dict, optimizers, pools) -> float:
    import torch
    import torch.nn.functional as F

    from kiln.modules.ugatit.networks import clip_rho

    G, D, (opt_g, opt_d), hp = m.generator, m.discriminator, optimizers, m.hparams
    a, b = batch["a"], batch["b"]
    (fake_b, cam_ab, _), (fake_a, cam_ba, _) = G.a2b(a), G.b2a(b)

    def judged(domain, images):
        out = []
        for scale in ("global", "local"):
            logits, cam, _ = getattr(D, f"{scale}_{domain}")(images)
            out += [logits, cam]
        return out

    D.requires_grad_(True)
    opt_d.zero_grad(set_to_none=True)
    loss_d = sum(_ls(r, 1) + _ls(f, 0) for domain, real, fake in (("a", a, fake_a), ("b", b, fake_b))
                 for r, f in zip(judged(domain, real), judged(domain, fake.detach())))
    loss_d.backward()
    opt_d.step()
    D.requires_grad_(False)
    opt_g.zero_grad(set_to_none=True)
    same_a, cam_aa, _ = G.b2a(a)
    same_b, cam_bb, _ = G.a2b(b)
    bce = F.binary_cross_entropy_with_logits
    loss_g = (hp.adv_weight * sum(_ls(x, 1) for x in judged("b", fake_b) + judged("a", fake_a))
              + hp.cycle_weight * (F.l1_loss(G.b2a(fake_b)[0], a) + F.l1_loss(G.a2b(fake_a)[0], b))
              + hp.identity_weight * (F.l1_loss(same_a, a) + F.l1_loss(same_b, b))
              + hp.cam_weight * (bce(cam_ab, torch.ones_like(cam_ab)) + bce(cam_bb, torch.zeros_like(cam_bb))
                                 + bce(cam_ba, torch.ones_like(cam_ba)) + bce(cam_aa, torch.zeros_like(cam_aa))))
    loss_g.backward()
    opt_g.step()
    clip_rho(G)
    return loss_g.item()


STEPS = {"pix2pix": _pix2pix, "cyclegan": _cyclegan, "ugatit": _ugatit}


def run_bare(spec: dict) -> dict:
    import lightning as L
    import torch

    from kiln.modules.blocks.image_pool import ImagePool

    config = overhead._config(spec["model"])
    L.seed_everything(0, verbose=False)
    module = overhead._module_from_config(config)
    L.seed_everything(0, verbose=False)
    module.train()
    batch = torch.load(spec["batch"], weights_only=True)
    configured = module.configure_optimizers()
    # (G's, D's optimiser), or with schedules ([G's, D's], [their schedulers])
    optimizers, schedulers = (configured, []) if isinstance(configured[0], torch.optim.Optimizer) else configured
    pools = {d: ImagePool(module.hparams.get("pool_size", 0)) for d in ("a", "b")}
    step = STEPS[spec["model"]]
    wall, cpu, loss0 = [], [], None
    for _ in range(spec["warmup"] + spec["steps"] + 1):
        loss = step(module, batch, optimizers, pools)
        for scheduler in schedulers:
            scheduler.step()
        wall.append(time.perf_counter())
        cpu.append(time.process_time())
        loss0 = loss if loss0 is None else loss0
    return {"stamps_wall": wall, "stamps_cpu": cpu, "loss0": loss0, "peak_rss_mib": peak_rss_mib(),
            "params": sum(p.numel() for p in module.parameters() if p.requires_grad)}


def run_side(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["mode"] == "prepare":
        return prepare(spec)
    out = overhead.run_kiln(spec) if spec["side"] == "kiln" else run_bare(spec)
    wall, cpu, skip = out.pop("stamps_wall"), out.pop("stamps_cpu"), spec["warmup"]
    return {"wall_s": [b - a for a, b in zip(wall[skip:], wall[skip + 1:])],
            "cpu_s": [b - a for a, b in zip(cpu[skip:], cpu[skip + 1:])],
            "loss0": out["loss0"], "peak_rss_mib": out["peak_rss_mib"], "params": out.get("params")}


def report(models: list[str], runs: dict, ratios: dict, shapes: dict, meta: dict, args) -> str:
    lines = [SECTION, "", "`python3 bench/translation.py` " + f"(--steps {args.steps} --warmup {args.warmup} "
             f"--rounds {args.rounds} --threads {args.threads}). A training iteration (D's step and G's step on one "
             "batch) of each image-to-image family's learning-check config under `kiln fit`, against a plain "
             "PyTorch loop of the same networks, losses and optimisers (bench/translation.py's docstring says "
             "what each side does). Ratio: bare / kiln iteration time (median), per round; >= 0.95 is the bar.", "",
             "| family | batch | side | iteration, median (IQR; min-max) | CPU per iteration | peak RSS | first G loss |",
             "|---|---|---|---|---|---|---|"]
    for m in models:
        for side in SIDES:
            wall = spread([w for r in runs[m][side] for w in r["wall_s"]])
            cpu = statistics.median(c for r in runs[m][side] for c in r["cpu_s"])
            lines.append(f"| {m} | {', '.join(f'{k} {tuple(v)}' for k, v in shapes[m].items())} | {side} "
                         f"| {wall['median'] * 1e3:.1f} ms ({wall['q1'] * 1e3:.1f}-{wall['q3'] * 1e3:.1f}; "
                         f"{wall['min'] * 1e3:.1f}-{wall['max'] * 1e3:.1f}) | {cpu * 1e3:.1f} ms "
                         f"| {statistics.median(r['peak_rss_mib'] for r in runs[m][side]):.0f} MiB "
                         f"| {runs[m][side][0]['loss0']:.4f} |")
    lines += [""] + [f"**{m}: kiln / bare throughput {statistics.median(ratios[m]):.3f}** (rounds: "
                     f"{', '.join(f'{r:.3f}' for r in ratios[m])})." for m in models]
    lines += ["", *meta_lines(meta, meta["versions"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=20, help="timed iterations per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help=f"replace the '{SECTION[3:]}' section of BENCHMARKS.md")
    args = parse_args(parser, run_side)
    models = [m for m in args.models.split(",") if m]
    t0, load_before = time.time(), load1()

    def child(spec: dict) -> dict:
        return run_child(__file__, spec, f"{spec['mode']} {spec['model']} {spec.get('side', '')}")

    with tempfile.TemporaryDirectory(prefix="kiln-translation-") as tmp:
        base = {"threads": args.threads, "warmup": args.warmup, "steps": args.steps, "device": "cpu",
                "precision": "32", "tmp": tmp, "wandb": "disabled"}
        shapes = {}
        for m in models:
            shapes[m] = child(base | {"mode": "prepare", "model": m, "batch": os.path.join(tmp, f"{m}.pt")})
            print(f"{m}: batch {shapes[m]}", file=sys.stderr)
        runs = alternate(args.rounds, [(m, s) for m in models for s in SIDES],
                         lambda key, _: child(base | {"mode": "time", "model": key[0], "side": key[1],
                                                      "batch": os.path.join(tmp, f"{key[0]}.pt")}),
                         lambda r: f"median iteration {statistics.median(r['wall_s']) * 1e3:.1f} ms", label=" ".join)
    runs = {m: {s: runs[m, s] for s in SIDES} for m in models}
    ratios = {m: [statistics.median(b["wall_s"]) / statistics.median(k["wall_s"])
                  for k, b in zip(runs[m]["kiln"], runs[m]["bare"])] for m in models}
    meta = run_meta(__file__, t0, load_before, ("trainers", "modules", "configs", "bench/translation.py"),
                    versions=versions("torch", "lightning"))
    section = report(models, runs, ratios, shapes, meta, args)
    print(section)
    headline = {m: statistics.median(ratios[m]) for m in models}
    result = {"compared": "`kiln fit` iteration / plain PyTorch loop, same networks, losses, optimisers and batch",
              "ratio": min(headline.values()),
              "detail": "; ".join(f"{m} {headline[m]:.2f} (rounds {min(ratios[m]):.2f}-{max(ratios[m]):.2f})"
                                  for m in models) + ", learn configs at 32 px, median iteration times",
              "ratios": ratios}
    save("translation", result, SECTION, section, meta, args.write)


if __name__ == "__main__":
    main()
