"""DataModules for the data sets that ship offline; each builds its shards into a local
cache on first use, so every `tiny.yaml` runs as is on a fresh clone.
"""
from __future__ import annotations

import os
from collections.abc import Callable

from kiln.datamodules.webdataset import WebDataModule


def cache_dir(name: str) -> str:
    """Where built data sets live: $KILN_CACHE, else ~/.cache/kiln."""
    root = os.environ.get("KILN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kiln")
    return os.path.join(root, name)


def _slug(groups: list[str]) -> str:
    """A folder-name-safe, readable name for a list of emoji groups and subgroups."""
    return "+".join("".join(c for c in g.lower() if c.isalnum() or c == "-") for g in groups)


class EmojiDataModule(WebDataModule):
    """Emoji in three styles (Twemoji, Noto, OpenMoji), captioned with their names.

    Train on some styles and hold out another: the held-out style shows the same emoji drawn
    by a different hand, so retrieval on it measures what transfers across styles.

    Args:
        train_styles: styles streamed for training.
        val_styles: held-out styles (validation and `kiln eval`).
        root: shard folder (any fsspec URL), used as it is if it holds a completed build, else
            built there. Default: the cache, holding the full set at `build_size`.
        build_size: pixel size the shards are rendered at (the mapper resizes from it).
        groups: only the emoji of these Unicode groups ("Smileys & Emotion", "People & Body",
            "Animals & Nature", "Food & Drink", "Travel & Places", "Activities", "Objects",
            "Symbols", "Flags") or subgroups ("heart", "face-smiling", "country-flag", ... as
            emoji-test.txt names them), built into a cache folder of their own; default all.
        **kwargs: the loader's settings, as `WebDataModule` takes them.
    """

    def __init__(
        self,
        mapper: Callable[[dict], dict],
        train_styles: list[str] = ["twemoji", "noto"],  # noqa: B006 - jsonargparse reads the default
        val_styles: list[str] = ["openmoji"],  # noqa: B006
        root: str | None = None,
        build_size: int = 64,
        groups: list[str] | None = None,
        **kwargs,
    ):
        from kiln.datamodules.emoji import STYLES, check_groups

        for style in [*train_styles, *val_styles]:
            if style not in STYLES:
                raise ValueError(f"unknown emoji style {style!r}; choose from {', '.join(STYLES)}")
        if groups is not None:
            check_groups(groups)
        self.groups = None if groups is None else sorted(set(groups))  # one order, one folder
        self.user_root = root is not None
        self.root = root or cache_dir(f"emoji-{build_size}" + ("" if groups is None else "-" + _slug(self.groups)))
        self.build_size = build_size
        self.train_styles, self.val_styles = list(train_styles), list(val_styles)
        super().__init__(
            train_urls=[f"{self.root}/{s}/{s}-*.tar" for s in self.train_styles],
            val_urls=[f"{self.root}/{s}/{s}-*.tar" for s in self.val_styles] or None,
            mapper=mapper, **kwargs,
        )

    def prepare_data(self) -> None:
        from kiln.datamodules.emoji import ensure_emoji_shards

        ensure_emoji_shards(self.root, size=self.build_size, accept_any=self.user_root, groups=self.groups)


class FashionMNISTDataModule(WebDataModule):
    """Fashion-MNIST (Debian `dataset-fashion-mnist`): 60,000 training and 10,000 held-out 28 px
    grey images of 10 classes, each captioned "a photo of a <class>" (`txt`) with its label (`cls`).

    Args:
        mapper: per-sample mapping (`ImageText` for text-to-image, `ImageClass` for class-conditional).
        root: shard folder (any fsspec URL), used as it is if it holds a completed build, else
            built there. Default: the cache.
        size: pixel size the shards are written at.
        **kwargs: the loader's settings, as `WebDataModule` takes them.
    """

    def __init__(self, mapper: Callable[[dict], dict], root: str | None = None, size: int = 28, **kwargs):
        self.root, self.size = root or cache_dir(f"fashion-mnist-{size}"), size
        super().__init__(train_urls=f"{self.root}/train/*.tar", val_urls=f"{self.root}/test/*.tar",
                         mapper=mapper, **kwargs)

    def prepare_data(self) -> None:
        from kiln.datamodules.builders import write_fashion_mnist_shards
        from kiln.datamodules.shards import read_manifest

        manifest = read_manifest(self.root)
        if manifest.get("builder") != "fashion-mnist" or manifest.get("limit") is not None:
            write_fashion_mnist_shards(self.root, size=self.size)
