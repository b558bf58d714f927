"""kiln's in-memory tar reader against Python's tarfile: the same members, and damage found."""
from __future__ import annotations

import io
import tarfile

import pytest

from kiln.datamodules.tars import tar_members, tar_samples


def _tar(members: dict[str, bytes], fmt=tarfile.USTAR_FORMAT, directory: str | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        if directory:
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _reference(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(i.name, tar.extractfile(i).read()) for i in tar if i.isreg()]


MEMBERS = {f"dir/k{i}.{ext}": bytes(j % 251 for j in range(i, 300 + 137 * i)) for i in range(6) for ext in ("png", "txt")}
MEMBERS["x" * 120 + "/long.txt"] = b"ustar keeps this in its prefix field"


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reads_what_tarfile_reads(fmt):
    data = _tar(MEMBERS, fmt, directory="dir")
    members, damage = tar_members(data)
    assert damage is None and members == _reference(data) and len(members) == len(MEMBERS)


def test_names_past_the_header_fall_back_to_tarfile():
    data = _tar({"y" * 300 + ".txt": b"pax or GNU long name", "k.png": b"x"}, tarfile.PAX_FORMAT)
    members, damage = tar_members(data)
    assert damage is None and members == _reference(data)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT])
def test_truncation_anywhere_is_damage_and_keeps_what_came_before(fmt):
    names = {"a" * 150 + ".txt": b"x"} if fmt == tarfile.PAX_FORMAT else {}  # forces the tarfile path
    data = _tar({**names, **MEMBERS}, fmt)
    whole = _reference(data)
    # Mid-member, at a member boundary (a tar that looks complete to tarfile), and in the end marker.
    boundaries = [len(_tar(dict(list({**names, **MEMBERS}.items())[:3]), fmt)) - 2 * 512 * 10]
    for cut in (len(data) // 2 + 100, *boundaries, 3 * 512):
        members, damage = tar_members(data[:cut])
        assert damage is not None, cut
        assert members == whole[: len(members)] and len(members) < len(whole)


def test_a_corrupt_header_is_damage():
    data = bytearray(_tar(MEMBERS))
    third_header = 512 * 2 + -(-len(MEMBERS["dir/k0.png"]) // 512) * 512 + -(-len(MEMBERS["dir/k0.txt"]) // 512) * 512
    data[third_header + 10] ^= 0xFF  # a byte of the third member's name
    members, damage = tar_members(bytes(data))
    assert "checksum" in str(damage) and members == _reference(bytes(_tar(MEMBERS)))[:2]


def _webdataset_samples(data: bytes, url: str) -> tuple[list[dict], Exception | None]:
    """What webdataset makes of a tar: `tar_file_iterator` + `group_by_keys`, metadata dropped."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    samples: list[dict] = []
    files = ({**f, "__url__": url} for f in tar_file_iterator(io.BytesIO(data)) if "__" not in f["fname"])
    try:
        samples.extend(group_by_keys(files))
    except ValueError as exn:
        return samples, exn
    return samples, None


def test_samples_group_as_webdataset_groups():
    names = ["a/k1.jpg", "a/k1.cls", "a/k1.seg.PNG", "a/k2.jpg", "noext", "d.x/noext", "a/.hidden", "k3.b.c.txt",
             "k3.jpg", "__index__", "d.x/k4.txt", "a/k1.txt"]  # a key seen before, not adjacent: a new sample
    data = _tar({name: f"{i}".encode() for i, name in enumerate(names)})
    samples, damage = tar_samples(data, "s3://b/shard.tar")
    assert damage is None and samples == _webdataset_samples(data, "s3://b/shard.tar")[0]
    assert [s["__key__"] for s in samples] == ["a/k1", "a/k2", "a/", "k3", "d.x/k4", "a/k1"]
    assert samples[0] == {"__key__": "a/k1", "__url__": "s3://b/shard.tar", "jpg": b"0", "cls": b"1", "seg.png": b"2"}


def test_a_field_twice_in_a_sample_ends_the_shard_there():
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, value in [("k1.jpg", b"1"), ("k2.jpg", b"2"), ("k2.cls", b"3"), ("k2.jpg", b"4"), ("k3.jpg", b"5")]:
            info = tarfile.TarInfo(name)
            info.size = len(value)
            tar.addfile(info, io.BytesIO(value))
    samples, damage = tar_samples(out.getvalue(), "u")
    reference, reference_damage = _webdataset_samples(out.getvalue(), "u")
    assert samples == reference == [{"__key__": "k1", "__url__": "u", "jpg": b"1"}]
    assert "twice" in str(damage) and reference_damage is not None
