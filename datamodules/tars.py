"""Members of a tar shard held in memory, at a fraction of `tarfile`'s cost.

Why by hand: `tarfile` builds a TarInfo per member, decoding every header field (owner,
mtime, mode, ...), and in stream mode it copies each member through a buffer; on WebDataset
shards of small images that header work costs more than decoding the JPEGs (`bench/loader.py
--profile`). WebDataset shards need only each regular file's name and bytes, so this reads the
name, size and type of plain POSIX (ustar) headers straight from the buffer and checks every
header's checksum at once with numpy. Anything else -- pax or GNU long-name headers, sizes in
base-256, links -- goes through `tarfile` instead, so no tar that `tarfile` reads is misread.
"""
from __future__ import annotations

import io
import tarfile

import numpy as np

BLOCK = 512
_END = bytes(2 * BLOCK)
_PLAIN = (b"0", b"\0")  # a regular file
_SKIPPED = (b"5",)  # a directory: no content


class _NotPlain(Exception):
    pass


def _field(header: bytes, start: int, stop: int) -> bytes:
    return header[start:stop].split(b"\0", 1)[0]


def _plain_members(data: bytes) -> tuple[list[tuple[str, bytes]], Exception | None]:
    members, headers, offset = [], [], 0
    damage: Exception | None = None
    while True:
        header = data[offset : offset + BLOCK]
        if len(header) < BLOCK:
            damage = tarfile.ReadError(f"truncated: no end-of-archive marker after {len(data)} bytes")
            break
        if header == _END[:BLOCK]:
            if data[offset : offset + 2 * BLOCK] != _END:
                damage = tarfile.ReadError("truncated: a single zero block where the archive should end")
            break
        kind, size = header[156:157], _field(header, 124, 136)
        if kind not in _PLAIN + _SKIPPED or header[124] & 0x80:
            raise _NotPlain
        size = int(size.strip() or b"0", 8)
        name = _field(header, 0, 100)
        if prefix := _field(header, 345, 500) if header[257:262] == b"ustar" else b"":
            name = prefix + b"/" + name
        start = offset + BLOCK
        if start + size > len(data):
            damage = tarfile.ReadError(f"unexpected end of data in {name.decode(errors='replace')}")
            break
        headers.append(offset)
        if kind in _PLAIN:
            members.append((name.decode("utf-8", "surrogateescape"), data[start : start + size]))
        offset = start + -(-size // BLOCK) * BLOCK
    # Checksums last, all at once: the sum of the header's bytes with its checksum field as spaces.
    if headers:
        blocks = np.frombuffer(data, np.uint8, count=(headers[-1] // BLOCK + 1) * BLOCK).reshape(-1, BLOCK)
        rows = blocks[np.asarray(headers) // BLOCK]
        sums = rows.sum(axis=1, dtype=np.int64) - rows[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
        stored = [int(_field(bytes(row[148:156]), 0, 8).strip() or b"0", 8) for row in rows]
        if bad := [i for i, (s, c) in enumerate(zip(sums, stored)) if s != c]:
            # Members from the first damaged header on are not to be trusted.
            kept = sum(1 for h in headers[: bad[0]] if data[h + 156 : h + 157] in _PLAIN)
            return members[:kept], tarfile.ReadError(f"bad header checksum at byte {headers[bad[0]]}")
    return members, damage


def tar_members(data: bytes) -> tuple[list[tuple[str, bytes]], Exception | None]:
    """(name, bytes) of each regular file of the tar in `data`, in order, and the error that
    ended it early (a truncated or corrupt tar), or None. Members before the damage are kept."""
    try:
        return _plain_members(data)
    except _NotPlain:
        pass
    members: list[tuple[str, bytes]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if info.isreg():
                    members.append((info.name, tar.extractfile(info).read()))
            end = tar.offset
    except (tarfile.TarError, EOFError, OSError) as exn:
        return members, exn
    if data[end : end + 2 * BLOCK] != _END:
        # tarfile takes a tar cut at a member boundary for a whole one.
        return members, tarfile.ReadError(f"truncated: no end-of-archive marker after {len(data)} bytes")
    return members, None
