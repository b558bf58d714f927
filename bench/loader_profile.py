"""bench/loader.py --profile: each stage of the bare loop and of kiln's loader timed alone in one
process (CPU time per sample, best of 5), then cProfile over both loaders with num_workers=0."""
from __future__ import annotations

import io
import tarfile
import time

from loader import Uint8Image, bare_dataset, measure
from loader_peers import SHARD_SIZE


def stage_costs(paths: list[str], size: int, batch_size: int) -> None:
    """CPU time per sample of each stage of both loaders, run alone in this process without a
    profiler (best of 5), so the two loaders can be compared stage by stage."""
    import numpy as np
    import simplejpeg
    import torch
    from PIL import Image
    from torch.utils.data import default_collate
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    from kiln.datamodules.decoding import Sample
    from kiln.datamodules.mappers import ImageClass, to_tensor
    from kiln.datamodules.webdataset import ShardPipeline, _Faults, _SampleSeeds, collate, read_shard

    n = len(paths) * SHARD_SIZE
    mapper = ImageClass(image_size=size)

    def cost(label: str, work) -> None:
        best = float("inf")
        for _ in range(5):
            start = time.process_time()
            work()
            best = min(best, time.process_time() - start)
        print(f"{label:72s} {1e6 * best / n:6.1f}")

    def tar_only():
        for path in paths:
            with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    tar.extractfile(member).read()

    def wds_tar():
        for path in paths:
            with open(path, "rb") as f:
                for _ in group_by_keys({**x, "__url__": path} for x in tar_file_iterator(f)):
                    pass

    def batches(items):
        return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]

    def bare_all():
        for batch in batches(list(bare_dataset(paths))):
            default_collate(batch)

    def kiln_all(mapper, shuffle=True):
        def run():
            for _ in ShardPipeline(paths, mapper, batch_size, shuffle=shuffle, batches_per_epoch=n // batch_size):
                pass
        return run

    raw = [sample for path in paths for sample in read_shard(path, _Faults(False))]
    decoded = [{"jpg": Sample(sample)["jpg"], "cls": Sample(sample)["cls"], "__key__": sample["__key__"]} for sample in raw]
    samples = list(map(Sample, raw))  # as the pipeline hands them to the mapper, fields decoded ahead here
    for sample in samples:
        sample.image("jpg"), sample["cls"]
    examples = [mapper(sample) for sample in samples]
    uint8 = [(torch.from_numpy(np.array(sample["jpg"])), sample["cls"]) for sample in decoded]
    print(f"\n== CPU per sample, in-process, no profiler, {n} samples (best of 5){' ' * 24}us/sample")
    cost("bare: open + tarfile stream mode, read every member", tar_only)
    cost("kiln: read_shard (fsspec fetch, kiln.datamodules.tars.tar_samples)",
         lambda: [read_shard(path, _Faults(False)) for path in paths])
    cost("  webdataset tar_file_iterator + group_by_keys on a plain open()", wds_tar)
    cost("bare: PIL open + convert('RGB') + np.array",
         lambda: [np.array(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for s in raw])
    cost("kiln: Sample(raw).image('jpg') (simplejpeg, pixels) and ['cls']",
         lambda: [(x.image("jpg"), x["cls"]) for x in map(Sample, raw)])
    cost("  for comparison: Sample(raw)['jpg'] (simplejpeg, then a PIL image)", lambda: [x["jpg"] for x in map(Sample, raw)])
    cost("  simplejpeg.decode_jpeg_header alone (kiln's colour-space check)",
         lambda: [simplejpeg.decode_jpeg_header(s["jpg"]) for s in raw])
    cost("  simplejpeg.decode_jpeg alone", lambda: [simplejpeg.decode_jpeg(s["jpg"], colorspace="RGB") for s in raw])
    cost("  for comparison: Pillow open + load (what webdataset's 'pil' handler runs)",
         lambda: [Image.open(io.BytesIO(s["jpg"])).load() for s in raw])
    def seeding():
        seeds = _SampleSeeds(0, 0, 0, 0)
        for i in range(n):
            mapper.rng.seed(seeds((0, i // 2048, i % 2048)))

    cost("kiln: the per-sample seed + mapper.rng.seed (seeding itself waits for a draw)", seeding)
    cost("kiln: ImageClass mapper (its fields decoded already)", lambda: [mapper(s) for s in samples])
    cost("  ImageClass mapper on fresh Samples (decoding included), results dropped",
         lambda: [mapper(s) and None for s in map(Sample, raw)])
    cost("  to_tensor of a PIL image (uint8; the float conversion runs after the transfer)",
         lambda: [to_tensor(s["jpg"]) for s in decoded])
    cost("  resize at native size (returns a copy)",
         lambda: [s["jpg"].resize((size, size), Image.Resampling.BICUBIC, box=(0, 0, size, size)) for s in decoded])
    cost("  for comparison: torch.from_numpy(np.array(image)) (uint8)",
         lambda: [torch.from_numpy(np.array(s["jpg"])) for s in decoded])
    cost("  for comparison: one-pass float: from_numpy(array).permute.float().mul_.sub_",
         lambda: [torch.from_numpy(np.array(s["jpg"])).permute(2, 0, 1).float().mul_(2 / 255).sub_(1) for s in decoded])
    cost("kiln: collate of dicts (uint8 image, label, key), images channels-last",
         lambda: [collate(b) for b in batches(examples)])
    cost("  for comparison: default_collate of the same (transposes each image)",
         lambda: [default_collate(b) for b in batches(examples)])
    cost("bare: default_collate of (uint8 image, label)", lambda: [default_collate(b) for b in batches(uint8)])
    cost("bare: whole loop (BareTars + collate)", bare_all)
    cost("kiln: whole ShardPipeline, ImageClass, shuffle on", kiln_all(mapper))
    cost("kiln: whole ShardPipeline, ImageClass, shuffle off", kiln_all(mapper, shuffle=False))
    cost("kiln: whole ShardPipeline, uint8 mapper, shuffle on", kiln_all(Uint8Image()))
    cost("kiln: whole ShardPipeline, a mapper returning a constant (reading + the pipeline's own work)",
         kiln_all(lambda sample: {"label": 0}))


def profile(paths: list[str], size: int, batch_size: int, n: int) -> None:
    """Stage costs, then cProfile of both loaders in this process (num_workers=0) over n samples:
    the top functions by own time (cProfile inflates code made of many small calls)."""
    import cProfile
    import pstats

    paths = paths[: n // SHARD_SIZE]
    stage_costs(paths, size, batch_size)
    for loader in ("bare", "kiln"):
        spec = {"name": loader, "loader": loader, "urls": paths, "workers": 0, "batch_size": batch_size,
                "shuffle": True, "samples": n, "size": size}
        prof = cProfile.Profile()
        prof.enable()
        result = measure(spec)
        prof.disable()
        print(f"\n== cProfile: {loader}, num_workers=0, {n} samples: "
              f"{result['samples_per_s']:.0f} samples/s under the profiler")
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
