"""Data loader benchmark: kiln's `ShardPipeline` against a bare tar + PIL loop on one JPEG shard set,
and against litdata and mosaicml-streaming on the same JPEGs converted to their formats.

    python bench/loader.py [--samples N] [--workers 2,0] [--size S] [--batch-size B] [--repeats R]
                           [--no-s3] [--no-unshuffled] [--no-uint8] [--no-same-decoder] [--no-peers]
                           [--out table.md | results.json]
    python bench/loader.py --profile    # stage costs and cProfile of both loaders, in-process
    python bench/loader.py --write      # also the table and run details in BENCHMARKS.md's "Data loader"

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
* kiln, uint8 mapper: the same pipeline with a mapper that returns the image as the bare loop
  does (uint8, no normalisation), to tell the pipeline's cost from `ImageClass`'s.
* kiln S3: the same as kiln, from a moto S3 server on loopback (which shares the CPUs).
* litdata / mosaicml-streaming (the peers, at the first worker count): the same JPEG bytes and
  labels converted once (cached beside the shards) with `litdata.optimize` (chunks of 256
  samples) and `streaming.MDSWriter` (shards of about 256 samples), both as a raw `bytes` column
  and an int column, read with each library's `StreamingDataset` (shuffle on) and
  `StreamingDataLoader` (batch_size=B, num_workers=W); each sample is decoded with PIL into the
  uint8 tensor and label the bare loop yields, in the dataset's per-sample hook (litdata's
  `transform`, a `__getitem__` override for streaming). From S3 too: litdata downloads chunks
  into a fresh cache folder, streaming into a fresh `local` folder, per run. They run under
  bench/.venv-streaming (created on first use, this interpreter's torch version), never in
  the test environment; see bench/loader_peers.py.
* the same decoder: kiln decodes JPEGs with simplejpeg (libjpeg-turbo called directly; Pillow
  calls the same library through ~100 us of Python per small image), so the bare loop and
  litdata also run decoding with simplejpeg, to tell the pipelines apart from the decoders.

Per run: samples/s over the pass (and without the first batch), time from `iter(loader)` to the
first batch (worker start-up included) and the time building the dataset and loader took before
it (after the imports; the peers read their index there), the peak of the summed PSS (and RSS)
of the process and its DataLoader workers, and the CPU time per sample spent in the process and
in the workers (which, unlike samples/s, barely moves when other jobs share the cores).
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

from common import BENCHMARKS, machine, write_result
from loader_peers import (CONVERT_VERSION, PEER_LABELS, SHARD_SIZE, convert, converted, decode_jpeg, peer_loader, peer_python,
                          peer_versions, stub_torchvision)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "kiln-bench"
BUILD_VERSION = 1
_TEMP: list[str] = []  # a child's own temporary directory (download caches, lock files), removed when it ends


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

def bare_dataset(paths: list[str], decoder: str = "pil"):
    import torch
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
                            yield torch.from_numpy(decode_jpeg(tar.extractfile(member).read(), decoder)), label

    return BareTars()


class Uint8Image:
    """The least mapper: the decoded image as a uint8 (H, W, 3) tensor and the label, as the bare
    loop yields them. Beside `ImageClass` it separates the pipeline's cost from the mapper's
    (label lookup, per-sample reseeding of `rng`)."""

    def __call__(self, sample: dict) -> dict:
        import numpy as np
        import torch

        return {"image": torch.from_numpy(np.array(sample.image("jpg"))), "label": sample["cls"]}


def preload(spec: dict) -> None:
    """Import what `make_loader` imports for this configuration, so that timing `make_loader`
    times building the dataset and the loader, not the imports."""
    import torch.utils.data  # noqa: F401

    if spec["loader"] == "litdata":
        import litdata  # noqa: F401
    elif spec["loader"] == "mosaic":
        stub_torchvision()
        import streaming  # noqa: F401
    elif spec["loader"] == "kiln":
        import kiln.datamodules.mappers  # noqa: F401
        import kiln.datamodules.webdataset  # noqa: F401


def make_loader(spec: dict):
    """(DataLoader, samples it will deliver) for one configuration."""
    from torch.utils.data import DataLoader

    if spec["loader"] == "bare":
        loader = DataLoader(bare_dataset(spec["urls"], spec.get("decoder", "pil")), batch_size=spec["batch_size"], num_workers=spec["workers"])
        return loader, spec["samples"]
    if spec["loader"] in PEER_LABELS:
        return peer_loader(spec), spec["samples"]
    from kiln.datamodules.mappers import ImageClass, as_collated
    from kiln.datamodules.webdataset import ShardPipeline

    batches = spec["samples"] // spec["batch_size"]
    mapper = Uint8Image() if spec.get("mapper") == "uint8" else ImageClass(image_size=spec["size"])
    pipeline = ShardPipeline(spec["urls"], mapper, spec["batch_size"],
                             shuffle=spec["shuffle"], batches_per_epoch=batches)
    return (DataLoader(pipeline, batch_size=None, collate_fn=as_collated, num_workers=spec["workers"]),
            batches * spec["batch_size"])


class PeakMemory(threading.Thread):
    """Peaks of the summed RSS and PSS of this process and its descendants (the workers).

    RSS counts the pages that forked workers share (torch, lightning) once per process; PSS
    splits them between the processes sharing them, so its sum is the memory really in use.
    PSS comes from /proc/PID/smaps_rollup, ~4 ms per torch process, so it is sampled once a
    second (a 20 ms period cost the loaders most of a core); RSS every 20 ms."""

    def __init__(self):
        import psutil

        super().__init__(daemon=True)
        self.me, self.rss, self.pss, self.stop = psutil.Process(), 0, 0, threading.Event()
        self.processes = [self.me]

    def sample(self, pss: bool) -> tuple[int, int]:
        import psutil

        rss = total_pss = 0
        for process in self.processes:
            try:
                if pss:
                    info = process.memory_full_info()
                    rss, total_pss = rss + info.rss, total_pss + info.pss
                else:
                    rss += process.memory_info().rss
            except psutil.Error:
                continue  # a worker that just exited
        self.rss, self.pss = max(self.rss, rss), max(self.pss, total_pss)
        return rss, total_pss

    def run(self) -> None:
        tick = 0
        while not self.stop.is_set():
            if tick % 25 == 3:  # the workers fork once iter() is called
                self.processes = [self.me, *self.me.children(recursive=True)]  # ~1 ms: a scan of /proc
            self.sample(pss=tick % 50 == 8)
            tick += 1
            self.stop.wait(0.02)


def measure(spec: dict) -> dict:
    """One pass of one configuration, in this process."""
    preload(spec)
    setup = time.perf_counter()
    loader, expected = make_loader(spec)
    setup = time.perf_counter() - setup
    memory = PeakMemory()
    idle_rss, idle_pss = memory.sample(pss=True)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    memory.start()
    samples, t0 = 0, time.perf_counter()
    first = last = None
    for batch in loader:
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        samples += images.shape[0]
        last = time.perf_counter()
        if first is None:
            first, first_samples = last, samples
        if samples == expected:
            memory.sample(pss=True)  # the workers are still up
    memory.stop.set()
    memory.join()
    # The loop's end joined the workers, so their CPU time is in RUSAGE_CHILDREN.
    cpu1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    main_cpu, worker_cpu = ((b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime) for a, b in zip(cpu0, cpu1))
    if samples != expected:
        raise RuntimeError(f"{spec['name']}: {samples} samples, expected {expected}")
    return {"samples": samples, "seconds": last - t0, "samples_per_s": samples / (last - t0),
            "samples_per_s_after_first": (samples - first_samples) / (last - first),
            "first_batch_s": first - t0, "setup_s": setup, "peak_pss_mib": memory.pss / 2**20, "peak_rss_mib": memory.rss / 2**20,
            "idle_pss_mib": idle_pss / 2**20, "idle_rss_mib": idle_rss / 2**20,
            "main_cpu_us_per_sample": 1e6 * main_cpu / samples, "worker_cpu_us_per_sample": 1e6 * worker_cpu / samples}


def run_child(spec: dict, env: dict, mode: str = "--_run") -> dict:
    """`loader.py --_run SPEC` (or --_convert) in a fresh process, under spec["python"] (the peers'
    venv) or this interpreter; its last stdout line as JSON."""
    out = subprocess.run([spec.get("python", sys.executable), os.path.abspath(__file__), mode, json.dumps(spec)],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{spec['name']} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the driver -----------------------------------------------------------------------------------

def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def table(results: dict, ratios: dict) -> str:
    lines = ["| configuration | samples/s: median (runs) | ratio: median (per round) | samples/s after 1st batch "
             "| time to first batch (+ building the dataset before `iter()`) "
             "| peak memory, PSS (RSS) summed over processes | before iter() | CPU us/sample: main + workers |",
             "|---|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        ratio = ratios.get(name)
        per_round = ", ".join(f"{r:.2f}" for r in ratio[2]) if ratio else ""
        ratio_text = f"{ratio[1]:.2f} of {ratio[0]} ({per_round})" if ratio else "baseline"
        runs = ", ".join(f"{r['samples_per_s']:.0f}" for r in rows)
        lines.append(f"| {name} | {median(rows, 'samples_per_s'):.0f} ({runs}) | {ratio_text} "
                     f"| {median(rows, 'samples_per_s_after_first'):.0f} | {median(rows, 'first_batch_s'):.2f} s "
                     f"(+{median(rows, 'setup_s'):.2f} s) "
                     f"| {median(rows, 'peak_pss_mib'):.0f} MiB ({median(rows, 'peak_rss_mib'):.0f} MiB) "
                     f"| {median(rows, 'idle_pss_mib'):.0f} MiB | {median(rows, 'main_cpu_us_per_sample'):.0f} + "
                     f"{median(rows, 'worker_cpu_us_per_sample'):.0f} |")
    return "\n".join(lines)


def versions(peers: str | None = None, s3: bool = True) -> str:
    """The packages the runs used: s3fs and moto only where there were S3 runs (`--no-s3` needs neither)."""
    import fsspec
    import numpy
    import PIL
    import torch
    import webdataset

    text = (f"Python {platform.python_version()}, torch {torch.__version__}, webdataset {webdataset.__version__}, "
            f"Pillow {PIL.__version__}, numpy {numpy.__version__}, fsspec {fsspec.__version__}")
    if s3:
        import moto
        import s3fs

        text += f", s3fs {s3fs.__version__}, moto {moto.__version__}"
    return text + (f"; the peers, under bench/.venv-streaming: {peers}" if peers else "")


def versus_best(results: dict, name: str, peers: list[str]) -> dict | None:
    """kiln's run `name` against the fastest of `peers` in each round: the ratio per round, its
    median, and which peer was fastest."""
    if not peers or name not in results:
        return None
    per_round, best = [], []
    for i, run in enumerate(results[name]):
        fastest = max(peers, key=lambda p: results[p][i]["samples_per_s"])
        per_round.append(run["samples_per_s"] / results[fastest][i]["samples_per_s"])
        best.append(fastest)
    return {"kiln": name, "median": statistics.median(per_round), "per_round": per_round, "best_peer": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=32768, help="samples in the shard set, read once per run")
    parser.add_argument("--workers", default="2,0",
                        help="DataLoader workers, comma-separated; the first is the main comparison")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the table shows medians")
    parser.add_argument("--no-s3", action="store_true", help="skip the moto S3 runs")
    parser.add_argument("--no-unshuffled", action="store_true", help="skip kiln with shuffle=False")
    parser.add_argument("--no-uint8", action="store_true", help="skip kiln with the uint8 mapper")
    parser.add_argument("--no-same-decoder", action="store_true",
                        help="skip the bare loop and litdata decoding with simplejpeg, as kiln does")
    parser.add_argument("--no-peers", action="store_true",
                        help="skip litdata and mosaicml-streaming (and their venv, bench/.venv-streaming)")
    parser.add_argument("--out", help="write the table (.md) or all results (.json) here")
    parser.add_argument("--profile", action="store_true",
                        help="stage costs and cProfile of both loaders in-process, instead")
    parser.add_argument("--write", action="store_true",
                        help="replace the table and run details in BENCHMARKS.md's 'Data loader' section")
    parser.add_argument("--_run", help=argparse.SUPPRESS)
    parser.add_argument("--_convert", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._convert or args._run:
        # The peers leave lock files and working folders in the temporary directory: this run's own.
        tempfile.tempdir = tempfile.mkdtemp(prefix="kiln-bench-")
        _TEMP.append(tempfile.tempdir)
    if args._convert:
        try:
            print(json.dumps(convert(json.loads(args._convert))))
        finally:
            shutil.rmtree(_TEMP[0], ignore_errors=True)
        return
    if args._run:
        try:
            print(json.dumps(measure(json.loads(args._run))))
        finally:
            for folder in _TEMP:
                shutil.rmtree(folder, ignore_errors=True)
        return

    workers = [int(w) for w in args.workers.split(",")]
    shards = -(-args.samples // SHARD_SIZE)
    if not args.profile and shards < max(workers):  # a worker without a shard has nothing to read
        parser.error(f"--samples {args.samples} makes {shards} shard(s) of {SHARD_SIZE}: fewer than the "
                     f"{max(workers)} workers; give at least --samples {max(workers) * SHARD_SIZE}")
    root, paths = build(args.samples, args.size)
    if args.profile:
        from loader_profile import profile

        profile(paths, args.size, args.batch_size, min(args.samples, 8 * SHARD_SIZE))
        return
    python = formats = None
    if not args.no_peers:
        python = peer_python()
        formats = converted(paths, args.samples, args.size, python, run_child)
    base = {"batch_size": args.batch_size, "samples": len(paths) * SHARD_SIZE, "size": args.size}
    specs, ratios = [], {}
    peers_local, peers_s3 = [], []
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
        if w == workers[0] and not args.no_uint8:
            name = f"kiln ShardPipeline, uint8 mapper, shuffle on, W={w}"
            specs.append(base | {"name": name, "loader": "kiln", "urls": paths, "workers": w, "shuffle": True,
                                 "mapper": "uint8"})
            ratios[name] = ("bare", bare)
        if w == workers[0] and not args.no_same_decoder:
            # kiln decodes JPEGs with simplejpeg: the bare loop and the best peer doing the same
            # tell the pipelines apart from the decoders.
            name = f"bare tar+simplejpeg, W={w}"
            specs.append(base | {"name": name, "loader": "bare", "urls": paths, "workers": w, "decoder": "simplejpeg"})
            ratios[name] = ("bare", bare)
        if w == workers[0] and formats:
            for peer, fmt in formats.items():
                name = f"{PEER_LABELS[peer]}, shuffle on, W={w}"
                specs.append(base | {"name": name, "loader": peer, "data": fmt["dir"], "workers": w, "python": python})
                ratios[name] = ("bare", bare)
                peers_local.append(name)
            if not args.no_same_decoder:
                name = "litdata + simplejpeg, shuffle on, W={w}".format(w=w)
                specs.append(base | {"name": name, "loader": "litdata", "data": formats["litdata"]["dir"], "workers": w,
                                     "python": python, "decoder": "simplejpeg"})
                ratios[name] = ("bare", bare)
                peers_local.append(name)
        if w == workers[0] and not args.no_s3:
            name = f"kiln ShardPipeline from S3 (moto), shuffle on, W={w}"
            s3 = [f"s3://{BUCKET}/{os.path.relpath(p, root)}" for p in paths]
            specs.append(base | {"name": name, "loader": "kiln", "urls": s3, "workers": w, "shuffle": True, "s3": True})
            ratios[name] = ("local", kiln)
            for peer in formats or {}:
                name = f"{PEER_LABELS[peer]} from S3 (moto), shuffle on, W={w}"
                specs.append(base | {"name": name, "loader": peer, "data": f"s3://{BUCKET}/{peer}", "workers": w,
                                     "python": python, "s3": True})
                ratios[name] = ("local", f"{PEER_LABELS[peer]}, shuffle on, W={w}")
                peers_s3.append(name)

    env, server = dict(os.environ), None
    if any(s.get("s3") for s in specs):
        sys.path.insert(0, REPO)
        from tests.servers import MotoServer

        server = MotoServer()
        env |= {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": server.endpoint,
                "S3_ENDPOINT_URL": server.endpoint}  # the name mosaicml-streaming reads
        os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                               "AWS_ENDPOINT_URL")})
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=server.endpoint)
        fs.mkdir(BUCKET)
        fs.put(f"{root}/train", f"{BUCKET}/train", recursive=True)
        for peer, fmt in (formats or {}).items():
            fs.put(fmt["dir"], f"{BUCKET}/{peer}", recursive=True)
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
    main_name = f"kiln ShardPipeline, shuffle on, W={workers[0]}"
    versus = {"local": versus_best(results, main_name, peers_local),
              "s3": versus_best(results, f"kiln ShardPipeline from S3 (moto), shuffle on, W={workers[0]}", peers_s3),
              "bare_same_decoder": versus_best(results, main_name, [n for n in results if "simplejpeg" in n and
                                                                     n.startswith("bare")])}
    md = table(results, ratios)
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "machine": platform.platform(), "versions": versions(peer_versions(python) if python else None,
                                                                   s3=server is not None),
            "command": shlex.join(["python3", os.path.relpath(os.path.abspath(__file__), REPO), *sys.argv[1:]]),
            "samples": base["samples"], "size": args.size, "batch_size": args.batch_size, "repeats": args.repeats,
            "load_before": load_before, "load_after": load_after,
            "peers": {PEER_LABELS[p]: f["files"] for p, f in (formats or {}).items()}}
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            if args.out.endswith(".json"):
                summary = {k: {"against": v[0], "median": v[1], "per_round": v[2]} for k, v in ratios.items()}
                json.dump({"meta": meta, "results": results, "ratios": summary, "versus_best_peer": versus}, f,
                          indent=1)
            else:
                f.write(f"{md}\n\n" + "\n".join(peer_lines(versus)) + f"\n\n`{meta['command']}` -- {meta['date']}, "
                        f"{meta['cpus']} CPUs, load average {meta['load_before'][0]:.2f} before / "
                        f"{meta['load_after'][0]:.2f} after; {meta['versions']}\n")
    print(md)
    print("\n".join(peer_lines(versus)))
    print(json.dumps(meta, indent=1))
    ratio, per_round = ratios[main_name][1], ratios[main_name][2]
    local = versus["local"]
    detail = f"rounds {min(per_round):.2f}-{max(per_round):.2f}"
    if local:
        peer_ratios = ", ".join(f"{n.split(',')[0]} {ratios[n][1]:.2f}x" for n in peers_local)
        verdict = ">=" if local["median"] >= 1 else "<"
        detail += f"; kiln {verdict} the best peer (peers vs bare: {peer_ratios})"
        if versus["s3"]:
            detail += f"; from S3 vs the best peer {versus['s3']['median']:.2f}x"
    if versus["bare_same_decoder"]:
        detail += f"; {versus['bare_same_decoder']['median']:.2f}x of a bare loop with kiln's JPEG decoder"
    detail += f"; {args.samples} {args.size}px JPEGs, batch {args.batch_size}, W={workers[0]}"
    write_result("loader", {
        "section": "Data loader",
        "compared": f"kiln ShardPipeline / bare tar + PIL loop" + (" and / the best of litdata, mosaicml-streaming"
                                                                 if local else "") + f", samples/s, W={workers[0]}",
        "ratio": ratio, "ratio_vs_best_peer": local["median"] if local else None,
        "ratio_vs_best_peer_s3": versus["s3"]["median"] if versus["s3"] else None,
        "ratio_vs_bare_same_decoder": versus["bare_same_decoder"]["median"] if versus["bare_same_decoder"] else None,
        "detail": detail, "ratios": {k: v[1] for k, v in ratios.items()},
        "first_batch_s": {k: median(v, "first_batch_s") for k, v in results.items()},
        "command": meta["command"],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load1": [load_before[0], load_after[0]], "written": args.write})
    if args.write:
        write_table(md, meta, versus)


def peer_lines(versus: dict) -> list[str]:
    """The kiln / best peer ratios, as the bullets under the table."""
    lines = []
    for where, v in versus.items():
        if v and where == "bare_same_decoder":
            rounds = ", ".join(f"{r:.2f}" for r in v["per_round"])
            lines.append(f"- **kiln / the bare loop decoding with simplejpeg too**: {v['median']:.2f} (median; "
                         f"per round: {rounds}).")
        elif v:
            rounds = ", ".join(f"{r:.2f} ({p.split(',')[0].replace(' from S3 (moto)', '')})"
                               for r, p in zip(v["per_round"], v["best_peer"]))
            lines.append(f"- **kiln / the best peer{' from S3' if where == 's3' else ''}**: {v['median']:.2f} "
                         f"(median; per round, against that round's fastest peer: {rounds}); "
                         f"kiln {'>=' if v['median'] >= 1 else '<'} the best peer.")
    return lines


def write_table(md: str, meta: dict, versus: dict) -> None:
    """In BENCHMARKS.md's "Data loader" section, replace the table and the run's bullets under it
    (command, machine, versions, load) with this run's; the prose around them stays."""
    run = [*peer_lines(versus),
           f"- Command: `{meta['command']}`.",
           f"- Machine: {machine()}. Date: {meta['date']}.",
           f"- Versions: {meta['versions']}.",
           f"- Load average (1 min): {meta['load_before'][0]:.2f} before, {meta['load_after'][0]:.2f} after."]
    if meta.get("peers"):
        files = ", ".join(f"{k}: {v} {'chunks' if k == 'litdata' else 'shards'}" for k, v in meta["peers"].items())
        run.insert(len(peer_lines(versus)),
                   f"- Peer data: {files}, converted from the tar shards (conversion version {CONVERT_VERSION}).")
    with open(BENCHMARKS, encoding="utf-8") as f:
        lines = f.read().split("\n")
    try:
        start = lines.index("## Data loader")
    except ValueError:
        lines += ["", "## Data loader", "", md, "", *run, ""]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        first = next((i for i in range(start, end) if lines[i].startswith("| configuration")), end)
        last = first
        while last < end and lines[last].startswith("|"):
            last += 1
        after = last + 1 if last < end and lines[last] == "" else last
        while after < end and (lines[after].startswith("- ") or lines[after].startswith("  ")):
            after += 1
        lines[first:after] = [md, "", *run]
    tmp = BENCHMARKS + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(tmp, BENCHMARKS)
    print("wrote the table of the 'Data loader' section of BENCHMARKS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
