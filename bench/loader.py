"""Data loader benchmark: kiln's `ShardPipeline` against a bare tar + PIL loop on one JPEG shard set.

    python bench/loader.py [--samples N] [--workers 2,0] [--size S] [--batch-size B]
                           [--repeats R] [--no-s3] [--out table.md | results.json] [--profile]

A benchmark, not a test: it asserts nothing and takes minutes. It builds N emoji images as JPEG
(quality 90) into shards of 256 samples once (cached under $KILN_CACHE, else ~/.cache/kiln), then
times each configuration in a fresh process, interleaved round by round (bare, kiln, ..., bare,
kiln, ...), and reports medians and the kiln / bare ratio measured within each round:

* bare: a torch IterableDataset that splits the shards over the DataLoader's workers, reads each
  with `tarfile` in stream mode and decodes each `.jpg` with PIL, yielding a uint8 tensor and the
  `cls` label per sample; the DataLoader batches them (batch_size=B). The least a JPEG tar loader
  must do.
* kiln: `ShardPipeline` (with `ImageClass` at native size) in a `DataLoader(batch_size=None)`,
  as `WebDataModule.train_dataloader()` builds it, reading the same number of samples.
* kiln S3: the same, from a moto S3 server on loopback (which shares the CPUs).

Per run: samples/s over the pass (and without the first batch), time from `iter(loader)` to the
first batch (worker start-up included), and the peak of the summed PSS (and RSS) of the process
and its DataLoader workers, sampled every 20 ms.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "kiln-bench"
SHARD_SIZE = 256
BUILD_VERSION = 1


# -- the shard set ------------------------------------------------------------------------------

def _samples(n: int, size: int):
    """N Twemoji images as JPEG, with class (emoji group) and caption; past the ~3600 emoji the
    images repeat rotated / mirrored, so no two samples share their bytes."""
    import random

    from PIL import Image

    from kiln.datamodules import emoji

    emojis = emoji.catalogue(("twemoji",))
    emojis = random.Random(0).sample(emojis, len(emojis))
    turns = [None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270,
             Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.TRANSPOSE,
             Image.Transpose.TRANSVERSE]
    for i in range(n):
        e, turn = emojis[i % len(emojis)], turns[(i // len(emojis)) % len(turns)]
        image = emoji.render(e, "twemoji", size)
        if turn is not None:
            image = image.transpose(turn)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        yield {"__key__": f"{i:08d}", "jpg": buffer.getvalue(), "cls": str(e.category).encode(),
               "txt": e.name.encode("utf-8")}


def build(n: int, size: int) -> tuple[str, list[str]]:
    """The shard folder (built on first use) and its shard paths."""
    from kiln.datamodules.datasets import cache_dir
    from kiln.datamodules.shards import read_manifest, write_shards

    root = cache_dir(f"bench-jpeg-{size}-{n}")
    manifest = read_manifest(root)
    if manifest.get("version") != BUILD_VERSION:
        t = time.perf_counter()
        manifest = write_shards(root, "bench-jpeg", {"train": _samples(n, size)}, shard_size=SHARD_SIZE,
                                meta={"version": BUILD_VERSION, "size": size}, total=n, progress=False)
        print(f"built {n} samples into {root} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return root, [f"{root}/{s['url']}" for s in manifest["shards"]["train"]]


# -- the two loaders ----------------------------------------------------------------------------

def bare_dataset(paths: list[str]):
    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.data import IterableDataset, get_worker_info

    class BareTars(IterableDataset):
        def __iter__(self):
            info = get_worker_info()
            mine = paths[info.id::info.num_workers] if info else paths
            for path in mine:
                label = None
                with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
                    for member in tar:
                        # Members of a sample are written in key order, cls before jpg.
                        if member.name.endswith(".cls"):
                            label = int(tar.extractfile(member).read())
                        elif member.name.endswith(".jpg"):
                            data = tar.extractfile(member).read()
                            image = Image.open(io.BytesIO(data)).convert("RGB")  # convert forces the decode
                            yield torch.from_numpy(np.array(image)), label

    return BareTars()


def make_loader(spec: dict):
    """(DataLoader, samples it will deliver) for one configuration."""
    from torch.utils.data import DataLoader

    if spec["loader"] == "bare":
        loader = DataLoader(bare_dataset(spec["urls"]), batch_size=spec["batch_size"], num_workers=spec["workers"])
        return loader, spec["samples"]
    from kiln.datamodules.mappers import ImageClass
    from kiln.datamodules.webdataset import ShardPipeline

    batches = spec["samples"] // spec["batch_size"]
    pipeline = ShardPipeline(spec["urls"], ImageClass(image_size=spec["size"]), spec["batch_size"],
                             shuffle=spec["shuffle"], batches_per_epoch=batches)
    return DataLoader(pipeline, batch_size=None, num_workers=spec["workers"]), batches * spec["batch_size"]


class PeakMemory(threading.Thread):
    """Peaks of the summed RSS and PSS of this process and its descendants, sampled every 20 ms.
    RSS counts pages shared by the forked workers (torch, lightning) once per process; PSS
    splits them between the processes sharing them, so its sum is the memory really in use."""

    def __init__(self):
        import psutil

        super().__init__(daemon=True)
        self.me, self.rss, self.pss, self.stop = psutil.Process(), 0, 0, threading.Event()

    def sample(self) -> tuple[int, int]:
        import psutil

        rss = pss = 0
        for process in [self.me, *self.me.children(recursive=True)]:
            try:
                info = process.memory_full_info()  # /proc/PID/smaps_rollup: ~0.1 ms
            except psutil.Error:
                continue  # a worker that just exited
            rss, pss = rss + info.rss, pss + info.pss
        self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
        return rss, pss

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(0.02)


def measure(spec: dict) -> dict:
    """One pass of one configuration, in this process."""
    loader, expected = make_loader(spec)
    memory = PeakMemory()
    idle_rss, idle_pss = memory.sample()
    memory.start()
    samples, t0 = 0, time.perf_counter()
    first = last = None
    for batch in loader:
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        samples += images.shape[0]
        last = time.perf_counter()
        if first is None:
            first, first_samples = last, samples
    memory.stop.set()
    memory.join()
    if samples != expected:
        raise RuntimeError(f"{spec['name']}: {samples} samples, expected {expected}")
    return {"samples": samples, "seconds": last - t0, "samples_per_s": samples / (last - t0),
            "samples_per_s_after_first": (samples - first_samples) / (last - first),
            "first_batch_s": first - t0, "peak_pss_mib": memory.pss / 2**20, "peak_rss_mib": memory.rss / 2**20,
            "idle_pss_mib": idle_pss / 2**20, "idle_rss_mib": idle_rss / 2**20}


def run_child(spec: dict, env: dict) -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_run", json.dumps(spec)], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{spec['name']} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- profile --------------------------------------------------------------------------------------

def profile(paths: list[str], size: int, batch_size: int, n: int) -> None:
    """cProfile of both loaders in this process (num_workers=0) over n samples."""
    import cProfile
    import pstats

    for loader in ("bare", "kiln"):
        spec = {"name": loader, "loader": loader, "urls": paths, "workers": 0, "batch_size": batch_size,
                "shuffle": True, "samples": n, "size": size}
        if loader == "bare":
            spec["urls"] = paths[: n // SHARD_SIZE]
        prof = cProfile.Profile()
        prof.enable()
        result = measure(spec)
        prof.disable()
        print(f"\n== {loader}, num_workers=0: {result['samples_per_s']:.0f} samples/s under cProfile")
        stats = pstats.Stats(prof)
        stats.sort_stats("tottime").print_stats(22)


# -- the driver -----------------------------------------------------------------------------------

def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def table(results: dict, ratios: dict) -> str:
    lines = ["| configuration | samples/s: median (runs) | ratio: median (per round) | samples/s after 1st batch "
             "| time to first batch | peak memory, PSS (RSS) summed over processes | before iter() |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        ratio = ratios.get(name)
        ratio_text = f"{ratio[1]:.2f} of {ratio[0]} ({', '.join(f'{r:.2f}' for r in ratio[2])})" if ratio else "baseline"
        runs = ", ".join(f"{r['samples_per_s']:.0f}" for r in rows)
        lines.append(f"| {name} | {median(rows, 'samples_per_s'):.0f} ({runs}) | {ratio_text} "
                     f"| {median(rows, 'samples_per_s_after_first'):.0f} | {median(rows, 'first_batch_s'):.2f} s "
                     f"| {median(rows, 'peak_pss_mib'):.0f} MiB ({median(rows, 'peak_rss_mib'):.0f} MiB) "
                     f"| {median(rows, 'idle_pss_mib'):.0f} MiB |")
    return "\n".join(lines)


def versions() -> str:
    import fsspec
    import moto
    import numpy
    import PIL
    import s3fs
    import torch
    import webdataset

    return (f"Python {platform.python_version()}, torch {torch.__version__}, webdataset {webdataset.__version__}, "
            f"Pillow {PIL.__version__}, numpy {numpy.__version__}, fsspec {fsspec.__version__}, "
            f"s3fs {s3fs.__version__}, moto {moto.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=24576, help="samples in the shard set, read once per run")
    parser.add_argument("--workers", default="2,0", help="DataLoader workers, comma-separated; the first is the main comparison")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the table shows medians")
    parser.add_argument("--no-s3", action="store_true", help="skip the moto S3 runs")
    parser.add_argument("--no-unshuffled", action="store_true", help="skip kiln with shuffle=False")
    parser.add_argument("--out", help="write the table (.md) or all results (.json) here")
    parser.add_argument("--profile", action="store_true", help="cProfile both loaders in-process instead")
    parser.add_argument("--_run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._run:
        print(json.dumps(measure(json.loads(args._run))))
        return

    root, paths = build(args.samples, args.size)
    if args.profile:
        profile(paths, args.size, args.batch_size, min(args.samples, 8 * SHARD_SIZE))
        return
    workers = [int(w) for w in args.workers.split(",")]
    base = {"batch_size": args.batch_size, "samples": len(paths) * SHARD_SIZE, "size": args.size}
    specs, ratios = [], {}
    for w in workers:
        bare = f"bare tar+PIL, W={w}"
        specs.append(base | {"name": bare, "loader": "bare", "urls": paths, "workers": w})
        kiln = f"kiln ShardPipeline, shuffle on, W={w}"
        specs.append(base | {"name": kiln, "loader": "kiln", "urls": paths, "workers": w, "shuffle": True})
        ratios[kiln] = ("bare", bare)
        if w == workers[0] and not args.no_unshuffled:
            name = f"kiln ShardPipeline, shuffle off, W={w}"
            specs.append(base | {"name": name, "loader": "kiln", "urls": paths, "workers": w, "shuffle": False})
            ratios[name] = ("bare", bare)
        if w == workers[0] and not args.no_s3:
            name = f"kiln ShardPipeline from S3 (moto), shuffle on, W={w}"
            s3 = [f"s3://{BUCKET}/{os.path.relpath(p, root)}" for p in paths]
            specs.append(base | {"name": name, "loader": "kiln", "urls": s3, "workers": w, "shuffle": True, "s3": True})
            ratios[name] = ("local", kiln)

    env, server = dict(os.environ), None
    if any(s.get("s3") for s in specs):
        sys.path.insert(0, REPO)
        from tests.servers import MotoServer

        server = MotoServer()
        env |= {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": server.endpoint}
        os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                               "AWS_ENDPOINT_URL")})
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=server.endpoint)
        fs.mkdir(BUCKET)
        fs.put(f"{root}/train", f"{BUCKET}/train", recursive=True)
    try:
        results: dict[str, list[dict]] = {s["name"]: [] for s in specs}
        load_before = os.getloadavg()
        for round_ in range(args.repeats):
            for spec in specs:
                load = os.getloadavg()[0]
                result = run_child(spec, env) | {"load1_before": load}
                results[spec["name"]].append(result)
                print(f"round {round_ + 1} {spec['name']}: {result['samples_per_s']:.0f} samples/s, first batch "
                      f"{result['first_batch_s']:.2f} s, peak PSS {result['peak_pss_mib']:.0f} MiB", file=sys.stderr)
        load_after = os.getloadavg()
    finally:
        if server is not None:
            server.stop()
    for name, (_, against) in ratios.items():
        per_round = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(results[name], results[against])]
        ratios[name] = (ratios[name][0], statistics.median(per_round), per_round)
    md = table(results, ratios)
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "machine": platform.platform(), "versions": versions(), "command": " ".join(["python"] + sys.argv),
            "samples": base["samples"], "size": args.size, "batch_size": args.batch_size, "repeats": args.repeats,
            "load_before": load_before, "load_after": load_after}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            if args.out.endswith(".json"):
                json.dump({"meta": meta, "results": results,
                           "ratios": {k: {"against": v[0], "median": v[1], "per_round": v[2]} for k, v in ratios.items()}},
                          f, indent=1)
            else:
                f.write(f"{md}\n\n`{meta['command']}` -- {meta['date']}, {meta['cpus']} CPUs, load average "
                        f"{meta['load_before'][0]:.2f} before / {meta['load_after'][0]:.2f} after; {meta['versions']}\n")
    print(md)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
