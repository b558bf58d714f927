"""`kiln data <builder> --out URL`: write WebDataset shards of an offline data set to any fsspec URL."""
from __future__ import annotations

import argparse

from kiln.trainers.args import CommandParser


def _emoji(args: argparse.Namespace) -> dict:
    from kiln.datamodules.emoji import write_emoji_shards

    return write_emoji_shards(args.out, size=args.size, shard_size=args.shard_size, limit=args.limit)


BUILDERS = {"emoji": _emoji}


def main(argv: list[str]) -> None:
    parser = CommandParser(prog="kiln data", description=__doc__)
    parser.add_argument("builder", choices=sorted(BUILDERS))
    parser.add_argument("--out", required=True, help="destination folder or URL (s3://bucket/prefix, file://...)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    parser.add_argument("--limit", type=int, default=None, help="keep only the first N items")
    args = parser.parse_args(argv)
    if args.size < 8 or args.shard_size < 1:
        raise ValueError("--size must be at least 8 and --shard-size at least 1")
    manifest = BUILDERS[args.builder](args)
    shards = sum(len(v) for v in manifest["shards"].values())
    print(f"kiln data {args.builder}: {manifest['count']} items, {shards} shards -> {args.out}")
