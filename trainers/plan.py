"""`kiln plan -c CONFIG --nodes N --gpus-per-node G`: will this run fit, before a GPU is rented?

The model is built on the meta device (no memory, no weights), so paper-size configs plan in
seconds. One training forward and backward at the configured micro-batch, also on meta, gives
the FLOPs (torch.utils.flop_counter) and the activation memory: the bytes of the tensors autograd
keeps for backward (each saved tensor counted once per op that saves it, so an upper estimate).

Per-GPU memory under each strategy, with P parameters, W ranks and AdamW:

    strategy  parameters              gradients   optimizer (2 moments)
    ddp       4P                      4P          8P
    zero2     4P                      4P / W      8P / W
    zero3     4P / W + largest unit   4P / W      8P / W
    fsdp      4P / W + largest unit   4P / W      8P / W

("largest unit": the biggest declared shard unit, gathered whole while it runs.) Parameters are
fp32 master weights under every precision; bf16 autocast shrinks activations, not these.
"""
from __future__ import annotations

import json
from typing import Any

import lightning as L
import torch
import yaml
from torch import nn

from kiln.launch.args import CommandParser
from kiln.trainers.checkpoint import _instantiate
from kiln.trainers.strategies import shard_units

GIB = 1024 ** 3
STRATEGIES = ("ddp", "zero2", "zero3", "fsdp")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(paths: list[str]) -> dict:
    config: dict = {}
    for path in paths:
        with open(path) as f:
            config = _merge(config, yaml.safe_load(f) or {})
    if "model" not in config:
        raise ValueError(f"no model in {', '.join(paths)}")
    return config


def _strategy_of(config: dict) -> str:
    strategy = config.get("trainer", {}).get("strategy", "ddp")
    if isinstance(strategy, dict):
        init = strategy.get("init_args", {})
        if strategy.get("class_path", "").endswith("FSDP2"):
            return "fsdp"
        if strategy.get("class_path", "").endswith("DeepSpeedZeRO"):
            return f"zero{init.get('stage', 3)}"
    return {"auto": "ddp", "deepspeed_stage_2": "zero2", "deepspeed_stage_3": "zero3"}.get(str(strategy), "ddp")


def _count(module: nn.Module, trainable: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad == trainable)


def measure(module: L.LightningModule, batch_size: int) -> dict[str, float]:
    """FLOPs and saved-activation bytes of one training forward + backward, on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = module.plan_inputs(batch_size)
    params = {id(p) for p in module.parameters()}
    saved = 0

    def pack(t: torch.Tensor):
        nonlocal saved
        if id(t) not in params:
            saved += t.numel() * t.element_size()
        return t

    counter = FlopCounterMode(display=False)
    with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module.model(*inputs)
        leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        sum(t.float().sum() for t in leaves).backward()
    return {"flops_per_sample": counter.get_total_flops() / batch_size, "activation_bytes_per_sample": saved / batch_size}


def memory(params: int, largest_unit: int, world: int, activations: float) -> dict[str, dict[str, float]]:
    per = {}
    for name in STRATEGIES:
        sharded_params = name in ("zero3", "fsdp")
        p = 4 * params / world + 4 * largest_unit if sharded_params else 4 * params
        g = 4 * params / world if name != "ddp" else 4 * params
        o = 8 * params / world if name != "ddp" else 8 * params
        per[name] = {"parameters": p, "gradients": g, "optimizer": o, "activations": activations,
                     "total": p + g + o + activations}
    return per


def plan(paths: list[str], nodes: int, gpus_per_node: int, micro_batch: int | None = None) -> dict[str, Any]:
    config = load_config(paths)
    with torch.device("meta"):
        module = _instantiate(config["model"], L.LightningModule)
    batch = micro_batch or config.get("data", {}).get("init_args", {}).get("batch_size") or 1
    world = nodes * gpus_per_node
    units = shard_units(module)
    largest = max((_count(m) for m in module.modules() if units and isinstance(m, units)), default=0)
    measured = measure(module, batch)
    per_gpu = memory(_count(module), largest, world, measured["activation_bytes_per_sample"] * batch)
    components = module.model.components() if hasattr(module.model, "components") else {}
    return {
        "config": paths, "family": getattr(module, "family", None), "nodes": nodes, "gpus_per_node": gpus_per_node,
        "micro_batch": batch, "global_batch": batch * world, "strategy": _strategy_of(config),
        "parameters": _count(module), "frozen_parameters": _count(module, trainable=False),
        "components": {name: _count(m) for name, m in components.items()},
        "largest_shard_unit": largest, **measured,
        "memory_per_gpu": per_gpu,  # bytes, by part
        "memory_per_gpu_gb": {name: round(m["total"] / 1e9, 3) for name, m in per_gpu.items()},  # GB = 1e9 bytes
    }


def main(argv: list[str]) -> None:
    parser = CommandParser(prog="kiln plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", action="append", required=True)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default: H100 80 GB)")
    parser.add_argument("--micro-batch", type=int, help="samples per GPU per step (default: the config's batch_size)")
    parser.add_argument("--strategy", choices=STRATEGIES, help="the strategy to check (default: the config's)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ValueError("--nodes and --gpus-per-node must be at least 1")
    result = plan(args.config, args.nodes, args.gpus_per_node, args.micro_batch)
    chosen = args.strategy or result["strategy"]
    budget = args.gpu_memory_gib * GIB
    result["fits"] = {name: m["total"] <= budget for name, m in result["memory_per_gpu"].items()}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_table(result, args.gpu_memory_gib))
    if not result["fits"][chosen]:
        need = result["memory_per_gpu"][chosen]["total"] / GIB
        fitting = [n for n in STRATEGIES if result["fits"][n]]
        hint = (f"; {fitting[0]} fits ({result['memory_per_gpu'][fitting[0]]['total'] / GIB:.1f} GiB)" if fitting
                else "; no strategy fits: lower the micro-batch, add GPUs, or checkpoint activations")
        raise ValueError(f"does not fit: {chosen} needs {need:.1f} GiB per GPU, more than the "
                         f"{args.gpu_memory_gib:g} GiB given{hint}")


def _table(r: dict, gib: float) -> str:
    def human(n: float) -> str:
        for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= size:
                return f"{n / size:.2f}{unit}"
        return f"{n:.0f}"

    lines = [
        f"{r['family']} from {', '.join(r['config'])}: {r['parameters']:,} parameters ({human(r['parameters'])})"
        + (f", {r['frozen_parameters']:,} frozen" if r["frozen_parameters"] else ""),
        *(f"  {name}: {n:,}" for name, n in r["components"].items()),
        f"{r['nodes']} node(s) x {r['gpus_per_node']} GPU(s), micro-batch {r['micro_batch']}, "
        f"global batch {r['global_batch']}",
        f"training FLOPs per sample: {human(r['flops_per_sample'])} "
        f"(forward + backward; {human(r['flops_per_sample'] * r['global_batch'])} per step)",
        "",
        f"per-GPU memory, GiB    params    grads    optim    activ    total   (of {gib:g})",
    ]
    for name, m in r["memory_per_gpu"].items():
        mark = "  <- config" if name == r["strategy"] else ""
        cells = "".join(f"{m[k] / GIB:9.2f}" for k in ("parameters", "gradients", "optimizer", "activations", "total"))
        lines.append(f"  {name:<20}{cells}  {'fits' if m['total'] <= gib * GIB else 'DOES NOT FIT'}{mark}")
    return "\n".join(lines)

