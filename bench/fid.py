"""FID and KID: kiln's `FidKid` (modules/eval/metrics.py) against torchmetrics'
`FrechetInceptionDistance` and `KernelInceptionDistance` fed the same features.

    python3 bench/fid.py [--samples 2000] [--features 1280] [--batch 100] [--rounds 3] [--threads 2] [--write]

A benchmark, not a test: it asserts nothing. Both sides get the same precomputed features (N real
and N generated rows of D dims, float32, drawn from a fixed seed: ReLU of two slightly different
random linear maps of Gaussian codes, so the two sets differ as pool features of real and generated
images do), in batches of B, real then generated, then compute both scores:

* kiln: `FidKid(extractor)` with its defaults (KID over every sample once), `update_features`
  per batch, `compute()`.
* torchmetrics: `FrechetInceptionDistance(feature=F, reset_real_features=False)` and
  `KernelInceptionDistance(feature=F, subsets=1, subset_size=N, reset_real_features=False)`,
  where F is an `nn.Module` that returns its input and has `num_features = D` (torchmetrics'
  documented way to plug in a custom extractor), `update` of each per batch, `compute()` of each.

kiln's FidKid is built on these two torchmetrics classes (it adds one pass over the features for
both scores, float64 features for KID too, and KID's subset size from the sample count summed over
ranks), so the values must agree; a third column computes both scores independently in float64
NumPy (FID via the eigenvalues of the symmetric sqrt(S1) S2 sqrt(S1), as exact as scipy's sqrtm and
faster; KID as the unbiased MMD^2 with k(x, y) = (x.y / D + 1)^3) to check the agreed value.
torchmetrics' side gets the features as float64 (kiln converts them so); what torchmetrics gives
for the float32 tensors as they are is computed once, untimed, and shown beside.

Timed: each `update` call (2N/B per run) and the `compute`; each side runs in a fresh process, the
sides alternate, and each round's ratio is torchmetrics' total time / kiln's.

--write replaces the "FID and KID" section of BENCHMARKS.md and leaves bench/results/fid.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import (alternate, load1, meta_lines, parse_args, peak_rss_mib, run_child, run_meta, save, spread,
                    versions)

SECTION = "## FID and KID"
SIDES = ("kiln", "torchmetrics")


def features(n: int, d: int):
    """(real, fake): N x D float32 each, the same for a given (n, d) in every process."""
    import torch

    g = torch.Generator().manual_seed(7)
    codes = 64
    weight = torch.randn(codes, d, generator=g) / codes ** 0.5
    bias = torch.randn(d, generator=g) * 0.1
    shift = torch.randn(codes, d, generator=g) / codes ** 0.5
    real = torch.relu(torch.randn(n, codes, generator=g) @ weight + bias)
    fake = torch.relu(torch.randn(n, codes, generator=g) @ (weight + 0.3 * shift) + bias)
    return real, fake


def _identity(d: int):
    from torch import nn

    class Features(nn.Module):
        """Hands torchmetrics (and kiln) features that were extracted already."""

        name = "precomputed"
        num_features = d

        def forward(self, x):
            return x

    return Features()


def run_side(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    n, d, b = spec["samples"], spec["features"], spec["batch"]
    real, fake = features(n, d)
    if spec["side"] == "reference":
        return reference(real, fake)
    batches = [(x, True) for x in real.split(b)] + [(x, False) for x in fake.split(b)]
    if spec["side"] == "kiln":
        from kiln.modules.eval.metrics import FidKid

        metric = FidKid(_identity(d))

        def update(x, is_real):
            metric.update_features(x, real=is_real)

        def compute():
            out = metric.compute()
            return out["fid"], out["kid"]
    else:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        fid = FrechetInceptionDistance(feature=_identity(d), reset_real_features=False)
        kid = KernelInceptionDistance(feature=_identity(d), subsets=1, subset_size=n, reset_real_features=False)

        def update(x, is_real):
            # float64, as kiln's FidKid hands them on: torchmetrics' KID computes in its input's dtype
            # and its FID returns its value in the input's dtype (float32 input: see `as_given`).
            x = x.double()
            fid.update(x, real=is_real)
            kid.update(x, real=is_real)

        def compute():
            return float(fid.compute()), float(kid.compute()[0])

    torch.manual_seed(0)  # KID's subset draw (a permutation of every sample: the value does not depend on it)
    update_s = []
    for x, is_real in batches:
        start = time.perf_counter()
        update(x, is_real)
        update_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    fid_value, kid_value = compute()
    compute_s = time.perf_counter() - start
    out = {"side": spec["side"], "fid": fid_value, "kid": kid_value, "update_s": update_s, "compute_s": compute_s,
           "total_s": sum(update_s) + compute_s, "peak_rss_mib": peak_rss_mib()}
    if spec["side"] == "torchmetrics" and spec.get("as_given"):  # untimed: the float32 features as they are
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        fid = FrechetInceptionDistance(feature=_identity(d), reset_real_features=False)
        kid = KernelInceptionDistance(feature=_identity(d), subsets=1, subset_size=n, reset_real_features=False)
        for x, is_real in batches:
            fid.update(x, real=is_real)
            kid.update(x, real=is_real)
        out["as_given"] = {"fid": float(fid.compute()), "kid": float(kid.compute()[0])}
    return out


def reference(real, fake) -> dict:
    """Both scores in float64 NumPy, written from the papers' formulas."""
    import numpy as np

    x, y = real.double().numpy(), fake.double().numpy()
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    # Tr sqrt(S1 S2) = Tr sqrt(sqrt(S1) S2 sqrt(S1)): the latter is symmetric PSD.
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()
    fid = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)
    d, m = x.shape[1], x.shape[0]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    kid = float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                - 2 * kxy.mean())
    return {"side": "reference", "fid": fid, "kid": kid}


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def report(args, runs: dict, ref: dict, ratios: list[float], meta: dict) -> str:
    kiln, tm = runs["kiln"][0], runs["torchmetrics"][0]
    lines = [
        SECTION, "",
        "kiln's `FidKid` (modules/eval/metrics.py) against torchmetrics' `FrechetInceptionDistance` and "
        "`KernelInceptionDistance`, fed the same precomputed features through torchmetrics' custom-extractor "
        f"slot (`feature=` an `nn.Module` returning its input, `num_features={args.features}`): {args.samples} real "
        f"and {args.samples} generated rows of {args.features} float32 features (a fixed seed; ReLU of two slightly "
        f"different random maps of Gaussian codes), in batches of {args.batch}, then both scores. KID over every "
        "sample once on both sides (kiln's default; torchmetrics with `subsets=1, subset_size=N`). kiln's FidKid "
        "is built on these two torchmetrics classes, so this row checks that the wrapper adds neither error nor "
        "time; the reference column computes both scores independently in float64 NumPy. Fresh process per "
        f"run, sides alternating, {args.rounds} rounds.", "",
        "| | kiln | torchmetrics | reference (NumPy, float64) | kiln vs torchmetrics | kiln vs reference "
        "| torchmetrics fed float32 (vs reference) |",
        "|---|---|---|---|---|---|---|",
        *(f"| {k.upper()} | {kiln[k]:.12g} | {tm[k]:.12g} | {ref[k]:.12g} | {rel(kiln[k], tm[k]):.1e} "
          f"| {rel(kiln[k], ref[k]):.1e} | {tm['as_given'][k]:.12g} ({rel(tm['as_given'][k], ref[k]):.1e}) |"
          for k in ("fid", "kid")),
        "", "Relative differences are |a - b| / |b|. Both timed sides receive the features as float64 (kiln's "
        "FidKid converts them; torchmetrics' side gets `x.double()`, an exact copy of the float32 values). Fed "
        "the float32 tensors as they are, torchmetrics computes KID in float32 and returns FID as float32 (it "
        "accumulates FID's sums in float64, then casts the result to the input's dtype): the last column, "
        "computed once, untimed.", "",
        "| side | update per batch, median (IQR; min-max) | compute (FID + KID), median of rounds | total per run, median "
        "| peak RSS |",
        "|---|---|---|---|---|",
    ]
    for side in SIDES:
        upd = spread([u for r in runs[side] for u in r["update_s"]])
        comp = statistics.median(r["compute_s"] for r in runs[side])
        total = statistics.median(r["total_s"] for r in runs[side])
        peak = statistics.median(r["peak_rss_mib"] for r in runs[side])
        lines.append(f"| {side} | {upd['median'] * 1e3:.2f} ms ({upd['q1'] * 1e3:.2f}-{upd['q3'] * 1e3:.2f}; "
                     f"{upd['min'] * 1e3:.2f}-{upd['max'] * 1e3:.2f}) | {comp:.2f} s | {total:.2f} s | {peak:.0f} MiB |")
    lines += [
        "",
        f"**kiln / torchmetrics speed: {statistics.median(ratios):.2f}** (torchmetrics' total time over kiln's, "
        f"median of the rounds; per round: {', '.join(f'{r:.2f}' for r in ratios)}). Totals per run, kiln: "
        + ", ".join(f"{r['total_s']:.2f}" for r in runs["kiln"]) + " s; torchmetrics: "
        + ", ".join(f"{r['total_s']:.2f}" for r in runs["torchmetrics"])
        + " s; 1-minute load average as each run started: "
        + ", ".join(f"{r['load1_before']:.2f}" for pair in zip(runs["kiln"], runs["torchmetrics"]) for r in pair)
        + " (kiln, torchmetrics, kiln, ...).", "",
        *meta_lines(meta, meta["versions"]),
        "- Where the time goes: torchmetrics' FID `compute` takes the eigenvalues of the non-symmetric "
        "S1 S2 (`torch.linalg.eigvals`, float64) and its `update` adds each batch's outer products to a "
        "D x D float64 sum; KID's `compute` builds three N x N polynomial kernels. Both sides run exactly this.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000,
                        help="real and generated rows each (more than --features, or the covariances are singular)")
    parser.add_argument("--features", type=int, default=1280,
                        help="feature width (kiln's offline extractor, EfficientNet-Lite0: 1280; InceptionV3 pool3: 2048)")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help=f"replace the '{SECTION[3:]}' section of BENCHMARKS.md")
    args = parse_args(parser, run_side)

    t0, load_before = time.time(), load1()
    base = {"samples": args.samples, "features": args.features, "batch": args.batch, "threads": args.threads}

    def child(spec: dict) -> dict:
        return run_child(__file__, base | spec, spec["side"])

    ref = child({"side": "reference"})
    print(f"reference: FID {ref['fid']:.10g}, KID {ref['kid']:.10g}", file=sys.stderr)
    runs = alternate(args.rounds, SIDES, lambda side, round_: child({"side": side, "as_given": round_ == 0}),
                     lambda r: f"FID {r['fid']:.10g}, KID {r['kid']:.10g}, total {r['total_s']:.2f} s "
                               f"(compute {r['compute_s']:.2f} s)")
    ratios = [t["total_s"] / k["total_s"] for k, t in zip(runs["kiln"], runs["torchmetrics"])]

    meta = run_meta(__file__, t0, load_before, ("modules/eval", "bench/fid.py"),
                    versions=versions("torch", "torchmetrics", "numpy"))
    section = report(args, runs, ref, ratios, meta)
    print(section)
    kiln, tm = runs["kiln"][0], runs["torchmetrics"][0]
    diffs = {"fid_vs_torchmetrics": rel(kiln["fid"], tm["fid"]), "kid_vs_torchmetrics": rel(kiln["kid"], tm["kid"]),
             "fid_vs_reference": rel(kiln["fid"], ref["fid"]), "kid_vs_reference": rel(kiln["kid"], ref["kid"])}
    result = {
        "compared": "kiln FidKid / torchmetrics FID+KID on the same features: values, speed",
        "ratio": statistics.median(ratios), "max_rel_diff": max(diffs["fid_vs_torchmetrics"], diffs["kid_vs_torchmetrics"]),
        "detail": f"FID {kiln['fid']:.6g} vs {tm['fid']:.6g}, KID {kiln['kid']:.6g} vs {tm['kid']:.6g} (rel diff "
                  f"{diffs['fid_vs_torchmetrics']:.0e}, {diffs['kid_vs_torchmetrics']:.0e}); speed "
                  f"{statistics.median(ratios):.2f}x",
        "values": {side: {"fid": runs[side][0]["fid"], "kid": runs[side][0]["kid"]} for side in SIDES} | {"reference": ref, "torchmetrics_float32": tm.get("as_given")},
        "rel_diff": diffs, "ratios": ratios,
    }
    save("fid", result, SECTION, section, meta, args.write)


if __name__ == "__main__":
    main()
