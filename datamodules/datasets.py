"""DataModules for the data sets that ship offline; each builds its shards into a local
cache on first use, so every `tiny.yaml` runs as is on a fresh clone.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from kiln.datamodules.webdataset import ShardPipeline, WebDataModule


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


class EmojiPairsDataModule(WebDataModule):
    """The same emoji in two styles (`kiln data emoji-pairs`): Twemoji -> Noto by default, aligned
    true pairs for image-to-image translation. Training reads split `train`; the held-out split is
    `val` (a random 10%, whose skin-tone siblings may train) or `val-designs` (10% of the base
    designs, every variant held out). Unpaired training streams the training shards twice, as
    domains `a` (the input style) and `b` (the target style), each in its own shuffled order, so a
    batch's two sides are different emoji; held-out batches stay true pairs, so even an unpaired
    model is scored against the right answer.

    Args:
        mapper: `PairedImages` (paired) or `UnpairedImages(a_key="input", b_key="target")`.
        source / target: the two styles (twemoji, noto, openmoji).
        heldout: "val" or "val-designs".
        unpaired: stream the two sides independently.
        root: shard folder (any fsspec URL), used as it is if it holds a completed build, else
            built there. Default: the cache, at `build_size`.
        build_size: pixel size the shards are rendered at (the mapper resizes from it).
        **kwargs: the loader's settings, as `WebDataModule` takes them.
    """

    def __init__(self, mapper: Callable[[dict], dict], source: str = "twemoji", target: str = "noto",
                 heldout: str = "val", unpaired: bool = False, root: str | None = None, build_size: int = 64, **kwargs):
        if heldout not in ("val", "val-designs"):
            raise ValueError(f"heldout must be 'val' or 'val-designs', got {heldout!r}")
        self.source, self.target, self.build_size, self.user_root = source, target, build_size, root is not None
        self.root = root or cache_dir(f"emoji-pairs-{source}-{target}-{build_size}")
        train = f"{self.root}/train/*.tar"
        # The training shards hold true pairs whichever way they are streamed (the lookup baseline
        # of `kiln.modules.eval.translation` reads them).
        self.pair_urls = train
        super().__init__(train_urls={"a": train, "b": train} if unpaired else train,
                         val_urls=f"{self.root}/{heldout}/*.tar", mapper=mapper, **kwargs)

    def prepare_data(self) -> None:
        from kiln.datamodules.emoji import write_emoji_pair_shards
        from kiln.datamodules.shards import read_manifest

        manifest = read_manifest(self.root)
        if manifest.get("builder") == "emoji-pairs" and (self.user_root or (
                manifest.get("size") == self.build_size and manifest.get("limit") is None
                and (manifest.get("source"), manifest.get("target")) == (self.source, self.target))):
            return
        write_emoji_pair_shards(self.root, self.source, self.target, size=self.build_size)


def training_pairs(data: WebDataModule) -> Iterator[dict] | None:
    """The training pairs of a data module whose training shards hold true pairs (`pair_urls`),
    read once in order without augmentation, as batches reach the model; None for any other."""
    urls = getattr(data, "pair_urls", None)
    if urls is None:
        return None
    mapper = data.mapper.for_eval() if hasattr(data.mapper, "for_eval") else data.mapper
    pipeline = ShardPipeline(urls, mapper, data.batch_size, shuffle=False, seed=data.seed, strict=data.strict,
                             retries=data.retries, drop_last=False, split="val")
    return (data.on_after_batch_transfer(data.on_before_batch_transfer(batch, 0), 0) for batch in pipeline)
