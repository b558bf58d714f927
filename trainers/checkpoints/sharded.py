"""Sharded checkpoints on any fsspec URL, written atomically and read back as data.

A sharded checkpoint is a pointer file under the checkpoint's usual name plus a directory of
shards beside it:

    checkpoints/last.ckpt                     the pointer: loops, schedulers, callbacks, data
                                              position, RNG, kiln metadata, and where the shards are
    checkpoints/last.ckpt.shards/<step>-<id>/ FSDP2's DCP files, or DeepSpeed's own

Every rank writes its shards first; rank 0 then writes the pointer in one atomic step (a rename
on a file system, a single PUT on object storage) and only then deletes older shard directories.
A crash mid-save therefore leaves the previous pointer and its complete shards in place.

Reading never unpickles arbitrary objects: the pointer goes through `torch.load(weights_only=True)`,
DCP's `.metadata` through torch's weights-only unpickler with DCP's own metadata classes allowed,
and DCP's byte items through `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import io
import pickle
import posixpath
import uuid
from typing import Any

import fsspec
import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from kiln.trainers.checkpoints import deepspeed
from kiln.trainers.checkpoints.files import CheckpointError, load_checkpoint_dict, write_atomic

SHARDS = "kiln_shards"  # pointer key: {"format": "dcp" | "deepspeed", "dir": relative name, "world_size": W}
_DCP_CLASSES = [
    dcp_metadata.Metadata, dcp_metadata.TensorStorageMetadata, dcp_metadata.BytesStorageMetadata,
    dcp_metadata.ChunkStorageMetadata, dcp_metadata.TensorProperties, dcp_metadata.MetadataIndex,
    dcp_metadata.StorageMeta, dcp_metadata._MEM_FORMAT_ENCODING, _StorageInfo, torch.Size,
]


def shard_dir(pointer: str, step: int) -> tuple[str, str]:
    """(relative name, absolute URL) of a new shard directory for the pointer `pointer`."""
    name = f"{posixpath.basename(pointer)}.shards/{step:09d}-{uuid.uuid4().hex[:8]}"
    return name, f"{posixpath.dirname(pointer)}/{name}"


def write_pointer(pointer: str, checkpoint: dict[str, Any], shards: dict[str, Any], keep: str) -> None:
    """Rank 0, after every rank's shards are written: the pointer, atomically; then old shards go."""
    buffer = io.BytesIO()
    torch.save({**checkpoint, SHARDS: shards}, buffer)
    write_atomic(pointer, buffer.getvalue())
    fs, path = fsspec.core.url_to_fs(pointer)
    root = f"{path}.shards"
    for old in fs.ls(root, detail=False) if fs.exists(root) else []:
        if posixpath.basename(old.rstrip("/")) != posixpath.basename(keep):
            fs.rm(old, recursive=True)


def read_pointer(path: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(checkpoint without its shards, shard info or None for a single-file checkpoint)."""
    ckpt = load_checkpoint_dict(path)
    shards = ckpt.pop(SHARDS, None)
    if shards is not None:
        shards = {**shards, "url": f"{posixpath.dirname(str(path))}/{shards['dir']}"}
    return ckpt, shards


def describe(shards: dict[str, Any] | None) -> str:
    if shards is None:
        return "a single-file checkpoint"
    kind = {"dcp": "an FSDP2 (DCP)", "deepspeed": "a DeepSpeed ZeRO"}.get(shards["format"], shards["format"])
    return f"{kind} checkpoint sharded over {shards['world_size']} ranks"


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` allowing only the classes it is made of (no code can run)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _DCP_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not checkpoint data")
        return allowed


_DCP_GLOBALS = {(c.__module__, c.__qualname__): c for c in _DCP_CLASSES} | {
    ("torch", name): getattr(torch, name) for name in (
        "float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool",
        "complex64", "float8_e4m3fn", "float8_e5m2", "strided", "contiguous_format", "channels_last")
} | {("collections", "OrderedDict"): __import__("collections").OrderedDict,
     # Looks a layout up by its name ("torch.strided"); no other effect.
     ("torch.serialization", "_get_layout"): torch.serialization._get_layout}


def _safe_unpickle(f) -> Any:
    try:
        return _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load DCP metadata: it holds more than checkpoint data ({e})") from None


class SafeReader(FsspecReader):
    """DCP reader over fsspec whose metadata is unpickled with the weights-only unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
            metadata = _safe_unpickle(f)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _WeightsOnlyBytes:
    """DCP's non-tensor items (optimizer step counts, for example), read as data."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class SafeLoadPlanner(_WeightsOnlyBytes, DefaultLoadPlanner):
    pass


class _SafeEmptyPlanner(_WeightsOnlyBytes, _EmptyStateDictLoadPlanner):
    pass


def dcp_writer(url: str) -> FsspecWriter:
    return FsspecWriter(url, single_file_per_rank=True, sync_files=False)


def load_dcp(state: dict[str, Any], url: str) -> None:
    """Fill `state` (sharded or not) from the DCP checkpoint at `url`, resharding as needed."""
    import torch.distributed.checkpoint as dcp

    _check_dcp(url)
    dcp.load(state, storage_reader=SafeReader(url), planner=SafeLoadPlanner())


def consolidate_dcp(url: str) -> dict[str, Any]:
    """The whole DCP checkpoint as one plain state dict, in this process, without a process group."""
    _check_dcp(url)
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=SafeReader(url), planner=_SafeEmptyPlanner(), no_dist=True)
    return state


def _check_dcp(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(f"{path}/.metadata"):
        raise CheckpointError(f"incomplete sharded checkpoint: {url} has no .metadata")
    SafeReader(url).read_metadata()  # refused here with a clear message, not deep inside DCP


def consolidate(pointer: str) -> dict[str, Any]:
    """A sharded checkpoint as a single-file kiln checkpoint: full model weights plus the pointer's
    metadata (the optimizer state stays with the shards)."""
    ckpt, shards = read_pointer(pointer)
    if shards is None:
        return ckpt
    if shards["format"] == "dcp":
        state = consolidate_dcp(shards["url"])["state_dict"]
    elif shards["format"] == "deepspeed":
        state = deepspeed.consolidate(shards["url"])
    else:
        raise CheckpointError(f"{pointer}: unknown shard format {shards['format']!r}")
    return {**ckpt, "state_dict": state}


def as_single_file(pointer: str) -> dict[str, Any]:
    """Any kiln checkpoint as Lightning's single-file layout, for strategies that keep whole
    models (one process, DDP): a DCP checkpoint is gathered, its optimizer state re-keyed from
    parameter names to the positions `torch.optim` uses. So a run can move from FSDP2 to DDP."""
    ckpt, shards = read_pointer(pointer)
    if shards is None:
        return ckpt
    if shards["format"] != "dcp":
        raise CheckpointError(f"{pointer} is {describe(shards)}; resume it with the same strategy on "
                              f"{shards['world_size']} ranks, or start from its weights (`kiln consolidate`)")
    state = consolidate_dcp(shards["url"])
    optimizers = [state[f"optimizer_{i}"] for i in range(len([k for k in state if k.startswith("optimizer_")]))]
    return {**ckpt, "state_dict": state["state_dict"], "optimizer_states": [_by_position(o) for o in optimizers]}


def by_name(state: dict[str, Any], optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> dict[str, Any]:
    """An optimizer state keyed by position -> keyed by parameter name, reading positions off the
    live optimizer (the family built it the same way), so the order of its groups is kept."""
    names = {p: _clean(n) for n, p in module.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    groups = [{**saved, "params": [order[i] for i in saved["params"]]} for saved in state["param_groups"]]
    return {"state": {order[i]: value for i, value in state["state"].items()}, "param_groups": groups}


def _clean(name: str) -> str:
    # Wrappers that do not change what a parameter is: activation checkpointing, torch.compile.
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _by_position(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter names (DCP) -> keyed by position (`Optimizer.state_dict`)."""
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": ids})
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}
