"""`kiln consolidate CKPT --out FILE`."""
from __future__ import annotations

import io

import torch

from kiln.trainers.checkpoints.files import write_atomic
from kiln.trainers.checkpoints.sharded import consolidate
from kiln.trainers.commands.args import CommandParser


def main(argv: list[str]) -> None:
    """kiln consolidate CKPT --out FILE: a sharded checkpoint as one single-file kiln checkpoint
    (full weights and the run's metadata), readable by `kiln eval`, `kiln sample` and any strategy."""
    parser = CommandParser(prog="kiln consolidate", description=main.__doc__)
    parser.add_argument("ckpt", help="checkpoint (the pointer file of a sharded one), local path or URL")
    parser.add_argument("--out", required=True, help="single-file checkpoint to write (local path or URL)")
    args = parser.parse_args(argv)
    ckpt = consolidate(args.ckpt)
    ckpt.pop("optimizer_states", None)
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    write_atomic(args.out, buffer.getvalue())
    n = sum(t.numel() for t in ckpt["state_dict"].values())
    print(f"kiln consolidate: {args.ckpt} -> {args.out} ({len(ckpt['state_dict'])} tensors, {n:,} numbers)")
