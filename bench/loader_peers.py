"""bench/loader.py's peers: litdata and mosaicml-streaming on the shard set's JPEG bytes, converted
once into each library's format and read with its own StreamingDataset and StreamingDataLoader.
They run under bench/.venv-streaming (this interpreter's torch, the peers with --no-deps), never in
the test environment; loader.py times them beside kiln's loader and the bare loop.
"""
from __future__ import annotations

import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from common import REPO, venv_python

SHARD_SIZE = 256  # samples per tar shard, chunk and MDS shard (loader.py writes the shards with it)

# The peers: pinned, in their own venv. Bump CONVERT_VERSION when the conversion changes.
VENV = os.path.join(REPO, "bench", ".venv-streaming")
PEER_VERSIONS = {"litdata": "0.2.76", "mosaicml-streaming": "0.13.0"}
CONVERT_VERSION = 1
PEER_LABELS = {"litdata": "litdata", "mosaic": "mosaicml-streaming"}
# What the peers import on the paths used here, installed before the peers themselves, which go
# in with --no-deps: both declare torchvision (the builds on disk need another torch than the
# pinned one), and streaming also declares cloud SDKs (Azure, GCS, OCI, SFTP) and matplotlib that
# it imports only for other stores and tools.
PEER_DEPS = ["numpy<2.2", "pillow", "psutil", "boto3<2", "lightning-utilities", "filelock", "requests", "obstore",
             "xxhash<4", "zstd<2", "brotli", "python-snappy<1", "transformers<5", "tqdm", "catalogue<3",
             "simplejpeg"]  # the last for the peer decoding as kiln does


def tar_samples(path: str):
    """The samples of one tar shard as {"jpg": the JPEG's bytes, "cls": int}, in shard order: what
    both conversions store."""
    sample: dict = {}
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if member.name.endswith(".cls"):
                sample["cls"] = int(tar.extractfile(member).read())
            elif member.name.endswith(".jpg"):
                sample["jpg"] = tar.extractfile(member).read()
            if len(sample) == 2:
                yield sample
                sample = {}


def decode_jpeg(data: bytes, decoder: str):
    """A JPEG's pixels, (H, W, 3) uint8: "pil" as a user's transform would decode it, or
    "simplejpeg", libjpeg-turbo called directly as kiln decodes it (the same pixels)."""
    import numpy as np

    if decoder == "simplejpeg":
        import simplejpeg

        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    from PIL import Image

    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))  # convert forces the decode


def decode_item(item: dict, decoder: str = "pil") -> dict:
    """A peer's stored sample decoded as the bare loop decodes it: the uint8 (H, W, 3) tensor and the label."""
    import torch

    return {"image": torch.from_numpy(decode_jpeg(item["jpg"], decoder)), "label": item["cls"]}


def stub_torchvision() -> None:
    """`import streaming` imports its torchvision datasets (streaming.vision), which this benchmark
    never uses, and the torchvision builds on disk need another torch than the pinned one. Where
    torchvision is missing, stand-in modules with the two names that import looks up (never called
    here) take its place; nothing on the path measured goes through them."""
    import importlib.machinery
    import importlib.util
    import types

    if importlib.util.find_spec("torchvision") is not None:
        return
    names = ("torchvision", "torchvision.datasets", "torchvision.transforms", "torchvision.transforms.functional")
    modules = {}
    for name in names:
        modules[name] = types.ModuleType(name)
        modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)

    class VisionDataset:  # streaming.vision's base class
        pass

    def to_tensor(*args, **kwargs):
        raise NotImplementedError("torchvision stand-in (bench/loader_peers.py)")

    modules["torchvision.datasets"].VisionDataset = VisionDataset
    modules["torchvision.transforms.functional"].to_tensor = to_tensor
    sys.modules.update(modules)


def convert(spec: dict) -> dict:
    """Write the shard set's samples into a peer's format at spec["out"] (through a temporary
    folder, so a cached conversion is always whole); run under the peers' venv."""
    out, tmp = spec["out"], spec["out"] + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if spec["format"] == "litdata":
        from litdata import optimize

        # One input per tar shard; chunk_size fixes 256 samples a chunk, as in the tar shards.
        optimize(fn=tar_samples, inputs=spec["shards"], output_dir=tmp, chunk_size=SHARD_SIZE, num_workers=1,
                 verbose=False)
    else:
        stub_torchvision()
        from streaming import MDSWriter

        samples = [s for path in spec["shards"] for s in tar_samples(path)]
        # MDS shards are bounded in bytes: about 256 samples' worth (4-byte offsets and lengths included).
        size_limit = SHARD_SIZE * (sum(len(s["jpg"]) for s in samples) // len(samples) + 16)
        with MDSWriter(out=tmp, columns={"jpg": "bytes", "cls": "int"}, size_limit=size_limit) as writer:
            for sample in samples:
                writer.write(sample)
    with open(os.path.join(tmp, "index.json"), encoding="utf-8") as f:
        index = json.load(f)
    os.replace(tmp, out)
    return {"files": len(index.get("chunks") or index.get("shards") or [])}


def peer_loader(spec: dict):
    """A peer's StreamingDataLoader for one configuration (litdata or mosaicml-streaming), in its venv."""
    if spec["loader"] == "litdata":
        import litdata

        kwargs = {}
        if spec.get("s3"):  # chunks are downloaded into a cache folder of this run's own
            kwargs = {"cache_dir": tempfile.mkdtemp(prefix="litdata-"),
                      "storage_options": {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}}
            # litdata fetches chunks from S3 with obstore, whose client options it fixes, and obstore
            # refuses plain http unless allowed: moto on loopback serves http only. Allowing it is
            # the one change to litdata here; the path (obstore, async prefetch) stays its default.
            from litdata.streaming import downloader

            downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = True
        transform = functools.partial(decode_item, decoder=spec.get("decoder", "pil"))
        dataset = litdata.StreamingDataset(spec["data"], shuffle=True, transform=transform, **kwargs)
        return litdata.StreamingDataLoader(dataset, batch_size=spec["batch_size"], num_workers=spec["workers"])
    # mosaicml-streaming
    stub_torchvision()
    import streaming

    class Decoded(streaming.StreamingDataset):
        def __getitem__(self, index):
            return decode_item(super().__getitem__(index), spec.get("decoder", "pil"))

    if spec.get("s3"):  # shards are downloaded into a `local` folder of this run's own
        local = tempfile.mkdtemp(prefix="mds-")
        kwargs = {"remote": spec["data"], "local": local}
    else:
        kwargs = {"local": spec["data"]}
    dataset = Decoded(**kwargs, shuffle=True, batch_size=spec["batch_size"])
    return streaming.StreamingDataLoader(dataset, batch_size=spec["batch_size"], num_workers=spec["workers"])


def peer_python() -> str:
    """bench/.venv-streaming's python: this interpreter's torch version (pinned, so pip never
    brings another build), the peers' imports (PEER_DEPS), then the peers with --no-deps."""
    import torch

    version = torch.__version__  # with its local label (+cpu), so the same build comes from disk
    venv_python(VENV, "import torch, numpy, PIL, psutil, boto3, lightning_utilities, filelock, obstore, xxhash, zstd, "
                      "brotli, snappy, transformers, catalogue, simplejpeg; print(torch.__version__)", version,
                [f"torch=={version}", *PEER_DEPS])
    probe = ("import importlib.metadata as m, torch; print(torch.__version__, "
             + ", ".join(f"m.version({name!r})" for name in PEER_VERSIONS) + ")")
    want = " ".join([version, *PEER_VERSIONS.values()])
    return venv_python(VENV, probe, want, ["--no-deps", *(f"{k}=={v}" for k, v in PEER_VERSIONS.items())])


def peer_versions(python: str) -> str:
    code = ("import importlib.metadata as m, platform; print(', '.join([f'{p} {m.version(p)}' for p in "
            f"{[*PEER_VERSIONS, 'torch', 'numpy', 'pillow', 'boto3', 'obstore']!r}] + "
            "['Python ' + platform.python_version()]))")
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def converted(paths: list[str], n: int, size: int, python: str, run_child) -> dict[str, dict]:
    """The shard set in each peer's format, converted on first use into the cache beside it, one
    folder per format, conversion version and peer version: {"litdata": {"dir", "files"}, ...}.
    `run_child(spec, env, "--_convert")` runs `convert` in the peers' venv."""
    from kiln.datamodules.datasets import cache_dir

    out = {}
    for peer, package in (("litdata", "litdata"), ("mosaic", "mosaicml-streaming")):
        fmt = "litdata" if peer == "litdata" else "mds"
        folder = cache_dir(f"bench-{fmt}-{size}-{n}-v{CONVERT_VERSION}-{package}{PEER_VERSIONS[package]}")
        if not os.path.exists(os.path.join(folder, "index.json")):
            t = time.perf_counter()
            spec = {"name": f"converting to {fmt}", "format": fmt, "shards": paths, "out": folder, "python": python}
            run_child(spec, dict(os.environ), "--_convert")
            print(f"converted {n} samples to {PEER_LABELS[peer]}'s format in {folder} in "
                  f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
        with open(os.path.join(folder, "index.json"), encoding="utf-8") as f:
            index = json.load(f)
        files = index.get("chunks") or index.get("shards") or []
        out[peer] = {"dir": folder, "files": len(files)}
    return out
