"""The offline emoji data: which glyphs pass, how they render, and the shards built from them."""

import hashlib
import importlib.util
import json
import random
import sys
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import webdataset

try:
    from kiln.datamodules import emoji
except ImportError:
    # Before the package is installed: load the file directly. It must sit in sys.modules
    # so that multiprocessing workers can unpickle its functions.
    _spec = importlib.util.spec_from_file_location(
        "kiln_emoji_under_test", Path(__file__).parents[1] / "datamodules" / "emoji.py")
    emoji = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = emoji
    _spec.loader.exec_module(emoji)

SIZE, LIMIT, SHARD = 32, 24, 10


def by_name(name):
    return next(e for e in emoji.catalogue() if e.name == name)


def test_catalogue_is_plausible_ordered_and_deterministic():
    full = emoji.catalogue()
    assert 3000 <= len(full) <= 4000
    assert len({e.key for e in full}) == len(full)
    assert full[0].key == "1f600" and full[0].name == "grinning face"
    kept = set(full)
    assert [e for e, _ in emoji._parse()[0] if e in kept] == full  # emoji-test.txt order
    assert emoji.catalogue(list(reversed(emoji.STYLES))) == full
    # Rendered and checked again from scratch, one style (all three take a minute and a half on 2 cores).
    assert emoji._drawn_keys("twemoji") == emoji._DRAWN["twemoji"]
    # Every single style keeps at least as much as all three together.
    for style in emoji.STYLES:
        assert len(emoji.catalogue((style,))) >= len(full)


def test_catalogue_fields():
    groups = emoji.categories()
    assert "Component" not in groups and groups[0] == "Smileys & Emotion" and groups[-1] == "Flags"
    assert all(groups[e.category] == e.group for e in emoji.catalogue())
    wave = next(e for e in emoji.catalogue() if e.key == "1f44b-1f3fd")
    assert (wave.codepoints, wave.name, wave.base) == ("1F44B 1F3FD", "waving hand: medium skin tone",
                                                      "1f44b")
    assert wave.subgroup == "hand-fingers-open" and wave.group == "People & Body"
    # fe0f is dropped from the key but kept in the code points that get shaped.
    heart = by_name("red heart")
    assert heart.key == "2764" and heart.codepoints == "2764 FE0F"
    bases = {e.base for e in emoji.catalogue()}
    assert len(bases) < 0.7 * len(emoji.catalogue())  # skin-tone variants group together


def test_reused_designs_keep_the_older_emoji():
    names = {e.name for e in emoji.catalogue()}
    # Twemoji and Noto draw both flags alike; the E0.6 one keeps it.
    assert "flag: United States" in names and "flag: U.S. Outlying Islands" not in names
    # Noto ignores the skin tone of the snowboarder.
    assert "snowboarder" in names and "snowboarder: dark skin tone" not in names
    assert "snowboarder: dark skin tone" in {e.name for e in emoji.catalogue(("twemoji",))}


@pytest.mark.parametrize("name", ["grinning face", "waving hand: medium skin tone",
                                  "family: man, woman, girl, boy", "flag: Japan", "keycap: 7"])
def test_styles_are_different_drawings_of_one_emoji(name):
    e = by_name(name)
    images = {s: np.asarray(emoji.render(e, s, SIZE), dtype=np.float32) for s in emoji.STYLES}
    for style, im in images.items():
        assert im.shape == (SIZE, SIZE, 3), style
        ink = (im < 240).any(axis=2).mean()
        assert 0.1 < ink < 0.98, (style, ink)  # drawn, and on a white background
        border = np.concatenate([im[0], im[-1], im[:, 0], im[:, -1]])
        assert border.mean() > 240, style  # centred with a margin, not cropped by the frame
    styles = list(images)
    for i, a in enumerate(styles):
        for b in styles[i + 1:]:
            assert np.abs(images[a] - images[b]).mean() > 5, (a, b)


def test_render_refuses_a_glyph_the_style_lacks():
    missing = emoji.Emoji("10ffff", "10FFFF", "no such emoji", "Symbols", "none", 7, "10ffff")
    for style in emoji.STYLES:
        with pytest.raises(ValueError):
            emoji.render(missing, style, SIZE)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("emoji")
    manifest = emoji.write_emoji_shards(f"file://{out}", size=SIZE, shard_size=SHARD,
                                        limit=LIMIT, progress=False, workers=2)
    return out, manifest


def test_manifest_describes_the_shards(built):
    out, manifest = built
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["count"] == LIMIT and manifest["size"] == SIZE
    assert manifest["styles"] == list(emoji.STYLES)
    assert manifest["categories"] == emoji.categories()
    for style in emoji.STYLES:
        shards = manifest["shards"][style]
        assert [s["url"] for s in shards] == [f"{style}/{style}-{i:06d}.tar" for i in range(3)]
        assert [s["samples"] for s in shards] == [10, 10, 4]
        for shard in shards:
            data = (out / shard["url"]).read_bytes()
            assert len(data) == shard["bytes"]
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert not list(out.rglob("*.tmp"))


def test_shards_read_back_with_webdataset(built):
    out, manifest = built
    # The first LIMIT emoji of the catalogue, written in a seeded random order (the same in every style).
    expected = random.Random(0).sample(emoji.catalogue()[:LIMIT], LIMIT)
    assert [e.key for e in expected] != [e.key for e in emoji.catalogue()[:LIMIT]]
    read = {}
    for style in emoji.STYLES:
        urls = [str(out / s["url"]) for s in manifest["shards"][style]]
        read[style] = list(webdataset.WebDataset(urls, shardshuffle=False).decode("pil"))
    for style, samples in read.items():
        assert [s["__key__"] for s in samples] == [e.key for e in expected]
        for sample, e in zip(samples, expected):
            assert sample["png"].size == (SIZE, SIZE)
            assert sample["txt"] == e.name and sample["cls"] == e.category
            assert sample["json"] == {**vars(e), "style": style}
    # Same key, same caption in every style; different pictures.
    for a, b in zip(read["twemoji"], read["openmoji"]):
        assert a["txt"] == b["txt"]
        assert np.asarray(a["png"]).tobytes() != np.asarray(b["png"]).tobytes()


def test_build_is_reproducible_across_workers_and_filesystems(built):
    _, manifest = built
    again = emoji.write_emoji_shards("memory://emoji-repro", size=SIZE, shard_size=SHARD,
                                     limit=LIMIT, progress=True, workers=0)
    assert again["shards"] == manifest["shards"]
    assert fsspec.filesystem("memory").exists("/emoji-repro/manifest.json")


def test_interrupted_build_leaves_no_final_shard_and_no_manifest(tmp_path, monkeypatch):
    (tmp_path / "manifest.json").write_text("{}")  # from an earlier build, now stale
    render, calls, at_failure = emoji.render, [], []

    def flaky(*args):
        calls.append(args)
        if len(calls) > 15:
            # What a killed process would leave: no chance to clean up after this point.
            at_failure.extend(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.tar*"))
            raise RuntimeError("interrupted")
        return render(*args)

    monkeypatch.setattr(emoji, "render", flaky)
    with pytest.raises(RuntimeError, match="interrupted"):
        emoji.write_emoji_shards(str(tmp_path), size=SIZE, shard_size=SHARD, limit=LIMIT,
                                 progress=False, workers=0)
    assert not (tmp_path / "manifest.json").exists()
    partial = [f for f in at_failure if f.startswith("twemoji/twemoji-000001.tar.")]
    assert "twemoji/twemoji-000001.tar" not in at_failure and len(partial) == 1
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    # The first shard was complete before the failure; the second was never moved into place.
    assert files == ["twemoji/twemoji-000000.tar"]
    assert len(list(webdataset.WebDataset(str(tmp_path / files[0]), shardshuffle=False))) == SHARD


def test_ensure_builds_only_when_the_manifest_does_not_match(tmp_path, monkeypatch):
    builds = []
    monkeypatch.setattr(emoji, "write_emoji_shards", lambda root, size, groups=None: builds.append((root, size)))
    root = str(tmp_path)
    assert emoji.ensure_emoji_shards(root, size=SIZE) == root
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"builder": "emoji", "version": emoji.MANIFEST_VERSION, "size": SIZE, "styles": list(emoji.STYLES),
         "limit": None}))
    assert emoji.ensure_emoji_shards(root, size=SIZE) == root
    assert emoji.ensure_emoji_shards(root, size=2 * SIZE) == root
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"builder": "emoji", "size": SIZE, "styles": list(emoji.STYLES), "limit": 5}))
    emoji.ensure_emoji_shards(root, size=SIZE)
    (tmp_path / "manifest.json").write_text('{"size": 3')  # truncated
    emoji.ensure_emoji_shards(root, size=SIZE)
    assert builds == [(root, SIZE), (root, 2 * SIZE), (root, SIZE), (root, SIZE)]
    # a build of some groups serves only a request for those groups
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"builder": "emoji", "version": emoji.MANIFEST_VERSION, "size": SIZE, "styles": list(emoji.STYLES),
         "limit": None, "groups": ["Flags"]}))
    emoji.ensure_emoji_shards(root, size=SIZE, groups=["Flags"])
    emoji.ensure_emoji_shards(root, size=SIZE)
    assert builds[4:] == [(root, SIZE)]


def test_a_build_of_some_groups_holds_only_their_emoji(tmp_path):
    from kiln.datamodules.datasets import EmojiDataModule
    from kiln.datamodules.mappers import ImageText

    # a group and a subgroup (emoji-test.txt's names)
    manifest = emoji.write_emoji_shards(str(tmp_path), size=SIZE, groups=["Flags", "food-prepared"], limit=40,
                                        progress=False, workers=1)
    assert manifest["groups"] == ["Flags", "food-prepared"] and manifest["count"] == 40
    metas = []
    for tar in (tmp_path / "noto").glob("*.tar"):
        with tarfile.open(tar) as tf:
            metas += [json.loads(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".json")]
    assert len(metas) == 40 and all(m["group"] == "Flags" or m["subgroup"] == "food-prepared" for m in metas)
    assert {m["subgroup"] for m in metas} > {"food-prepared"}  # the catalogue's first 40 of both reach flags
    with pytest.raises(ValueError, match="unknown emoji group"):
        emoji.write_emoji_shards(str(tmp_path / "x"), size=SIZE, groups=["Flag"], progress=False)
    with pytest.raises(ValueError, match="unknown emoji group"):
        EmojiDataModule(ImageText(image_size=SIZE), groups=["Flag"])
    # the folder depends on the groups, not on their order
    a = EmojiDataModule(ImageText(image_size=SIZE), groups=["Flags", "heart"], build_size=SIZE)
    b = EmojiDataModule(ImageText(image_size=SIZE), groups=["heart", "Flags"], build_size=SIZE)
    assert a.root == b.root != EmojiDataModule(ImageText(image_size=SIZE), build_size=SIZE).root
