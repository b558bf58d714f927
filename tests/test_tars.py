"""kiln's in-memory tar reader against Python's tarfile: the same members, and damage found."""
from __future__ import annotations

import io
import tarfile

import pytest

from kiln.datamodules.tars import tar_members


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
