"""`kiln plan -c CONFIG --nodes N --gpus-per-node G`: will this run fit, before a GPU is rented?

The model is built on the meta device (no memory, no weights), so paper-size configs plan in
seconds. One training step, also on meta, gives the FLOPs (torch.utils.flop_counter) and the
step's working memory: the peak of the bytes its ops allocate while they are alive (what autograd
keeps for backward, autograd's temporaries, the loss), storage by storage. A GAN's step is its
phases (`kiln.modules.gan.lit_module`), each run as training runs it: D main, R1 (a double
backward through D), G main (through G and D, D frozen), path length (a double backward through
G); the plan holds the largest phase.

Per-GPU memory, with P trainable, F frozen and E EMA parameters (fp32 master weights: 4 bytes
each under every precision; bf16 autocast shrinks activations, not these), W ranks and Adam(W).
A frozen network a family holds outside its module tree (`Spec.frozen`: Imagen's text encoder)
is whole on every rank, 4F under every strategy, and is not in the table's F:

    strategy  parameters  ema    gathered         gradients  optimizer       buffers
    ddp       4(P+F)      4E     -                4P         8P              4P
    zero2     4(P+F)      4E     -                4P/W       8P/W + 4P/W     2 x 4 x reduce_bucket_size
    zero3     4(P+F)/W    4E/W   4(P+F)           4P/W       8P/W + 4P/W     4 x reduce_bucket_size
    fsdp      4(P+F)/W    4E/W   16 unit + 4 rest 4P/W       8P/W            -
                                   (+ 4 x the phase's networks for a double backward)

    total = parameters + ema + optimizer + buffers
            + the largest phase's (gradients + gathered + max(activations, optimizer step))

Why each term, as measured on 2 ranks (tests/test_plan_measured.py):
- ema: the EMA callback's frozen copy of the averaged network (`kiln.trainers.callbacks.ema`), sharded
  like the live weights under ZeRO-3 and FSDP2.
- gradients sit beside the activations: Lightning's automatic optimisation zeroes them after
  the forward, so the last step's are still held while this one's activations grow; a GAN phase
  holds its own network's. DDP's buffers are its gradient buckets, a second copy of the
  gradients (gradient_as_bucket_view is off).
- DeepSpeed keeps an fp32 master copy of its partition even when training in fp32 (the 4P/W in
  optimizer), and gradient buckets of reduce_bucket_size elements (two for ZeRO-2's overlap_comm):
  1.6 GB and 0.8 GB per GPU at Lightning's default 2e8, whatever the model's size. ZeRO-3 keeps a
  weight it gathered until backward reuses it when that is within stage3_max_reuse_distance
  (Lightning: 1e9 elements): smaller models are held whole during the step, at most
  stage3_max_live_parameters.
- FSDP2 gathers a unit into an all-gather buffer and copies it out to the unsharded weights,
  prefetches the next unit while one runs, and holds the last reduce-scatter's input until the
  next: four buffers the size of the largest declared unit. A network's weights outside its units
  (embeddings, heads) stay gathered while it runs; a family with a double backward keeps every
  unit gathered until the phase's backward ends (`kiln.trainers.strategies.FSDP2`): the phase's
  networks whole.
- optimizer step: foreach Adam's square root of the second moment is one temporary the size of
  the weights it steps (this rank's share).
A GAN trains two optimizers, which Lightning's DeepSpeed strategy refuses ("DeepSpeed currently
only supports single optimizer"): ZeRO-2/3 are listed under `unsupported` for GANs.
"""
from __future__ import annotations

import contextlib
import functools
import json
import weakref
from typing import Any, Callable

import lightning as L
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kiln.modules.family import Family
from kiln.trainers.commands.args import CommandParser
from kiln.trainers.checkpoints.checkpoint import _instantiate
from kiln.trainers.strategies import shard_units

GIB = 1024 ** 3
STRATEGIES = ("ddp", "zero2", "zero3", "fsdp")
PARTS = ("parameters", "ema", "gathered", "gradients", "optimizer", "buffers", "activations")
SHORT = {"parameters": "params", "gradients": "grads", "optimizer": "optim", "activations": "activ"}  # table headings
# Lightning's DeepSpeedStrategy defaults, where a config does not set them.
DEEPSPEED = {"reduce_bucket_size": 2e8, "overlap_comm": True, "contiguous_gradients": True,
             "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9}


def load_config(paths: list[str], overrides: list[str] = ()) -> dict:
    """The configs at `paths` composed, with `--key value` overrides, as `kiln fit` reads them."""
    from kiln.trainers.commands.fit import read_config

    return read_config([arg for path in paths for arg in ("-c", path)] + list(overrides))


def _strategy_of(config: dict) -> str:
    strategy = config.get("trainer", {}).get("strategy", "ddp")
    if isinstance(strategy, dict):
        init = strategy.get("init_args", {})
        if strategy.get("class_path", "").endswith("FSDP2"):
            return "fsdp"
        if strategy.get("class_path", "").endswith("DeepSpeedZeRO"):
            return f"zero{init.get('stage', 3)}"
    return {"auto": "ddp", "deepspeed_stage_2": "zero2", "deepspeed_stage_3": "zero3"}.get(str(strategy), "ddp")


def _deepspeed_settings(config: dict) -> dict:
    strategy = config.get("trainer", {}).get("strategy")
    init = strategy.get("init_args", {}) if isinstance(strategy, dict) else {}
    return {key: init.get(key, default) for key, default in DEEPSPEED.items()}


def _ema_target(config: dict, module: Family) -> nn.Module | None:
    """The network the config's EMA callback copies, if it has one."""
    for callback in config.get("trainer", {}).get("callbacks") or []:
        if isinstance(callback, dict) and callback.get("class_path", "").endswith("ema.EMA"):
            return module.resolve((callback.get("init_args") or {}).get("target") or module.spec().ema_target)
    return None


def _count(module: nn.Module, trainable: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad == trainable)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class _LiveBytes(TorchDispatchMode):
    """The peak of the bytes that ops allocate while this mode is on and that are still alive: a
    storage counts from the op that creates it (an output whose storage no input shares: not a
    view, not in place) until it is freed (a weak reference to it dies). Works on meta tensors.
    (torch.distributed._tools.mem_tracker.MemTracker does the same, but hooks every parameter of
    every module it sees for gradients, which fails on a frozen one: the network a GAN phase does
    not train.)"""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            key = _storage_key(t) if isinstance(t, torch.Tensor) else None
            if key is None or key in inputs or key in self._alive:
                continue
            storage = t.untyped_storage()
            self.live += storage.nbytes()
            self._alive[key] = weakref.ref(storage, functools.partial(self._freed, key, storage.nbytes()))
        self.peak = max(self.peak, self.live)
        return out

    def _freed(self, key: int, nbytes: int, _ref) -> None:
        self._alive.pop(key, None)
        self.live -= nbytes


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse, nested)
        return None


def _run(module: nn.Module, step: Callable[[], None], flops: bool = True) -> dict[str, float]:
    """Working memory (and FLOPs) of one forward + backward. Gradients are dropped as they land
    on the weights: the plan counts them by strategy (sharded, bucketed) instead. (FLOPs are
    not counted through a double backward: FlopCounterMode's module hooks refuse autograd.grad.)"""
    from torch.utils.flop_counter import FlopCounterMode

    def drop(p: torch.Tensor) -> None:
        p.grad = None

    hooks = [p.register_post_accumulate_grad_hook(drop) for p in module.parameters() if p.requires_grad]
    counter, live = FlopCounterMode(display=False), _LiveBytes()
    try:
        with counter if flops else contextlib.nullcontext(), live:
            step()
    finally:
        for hook in hooks:
            hook.remove()
    return {"flops": counter.get_total_flops() if flops else 0, "activations": live.peak}


def _model_pass(module: Family, batch_size: int) -> dict[str, float]:
    """FLOPs and working memory of `module.model`'s forward on `plan_inputs` and its backward
    (a GAN's model is one D(G(z)) pass): the one phase `Family.plan_phases` runs by default."""
    [phase] = Family.plan_phases(module, batch_size)
    return _run(module, phase.run)


def phases(module: Family, batch_size: int) -> list[dict[str, Any]]:
    """One training step's working memory on the meta device, phase by phase (`Family.plan_phases`):
    each phase's name, the parameters it steps and runs through, and the peak bytes of what it
    allocates (`activations`); with one phase, its FLOPs too."""
    declared, out = module.plan_phases(batch_size), []
    for phase in declared:
        trained = module.resolve(phase.steps)
        # As training's toggle_optimizer: only the phase's network takes gradients.
        mine = {id(p) for p in trained.parameters()}
        frozen = [p for p in module.parameters() if p.requires_grad and id(p) not in mine]
        for p in frozen:
            p.requires_grad_(False)
        try:
            measured = _run(module, phase.run, flops=len(declared) == 1)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        out.append({"name": phase.name, "steps": _count(trained),
                    "through": sum(_numel(module.resolve(path)) for path in phase.through),
                    "activations": measured["activations"], **({"flops": measured["flops"]} if len(declared) == 1 else {})})
    return out


def measure(module: L.LightningModule, batch_size: int) -> dict[str, float]:
    """FLOPs per sample of the model's training forward + backward, and the working memory per
    sample of the step's largest phase, on the meta device."""
    steps = phases(module, batch_size)
    return {"flops_per_sample": _flops(module, steps, batch_size) / batch_size,
            "activation_bytes_per_sample": max(p["activations"] for p in steps) / batch_size}


def _flops(module: L.LightningModule, steps: list[dict], batch_size: int) -> float:
    """The model pass's FLOPs: counted with the one phase of a family without phases, else apart."""
    return steps[0]["flops"] if "flops" in steps[0] else _model_pass(module, batch_size)["flops"]


def _units(module: Family) -> tuple[int, int]:
    """(the largest declared shard unit, the most weights of one network outside its units), in elements."""
    units = shard_units(module)
    largest = max((_numel(m) for m in module.modules() if units and isinstance(m, units)), default=0)
    networks = [module.component(name) for name in module.spec().components] or [module]
    inside = {id(p) for m in module.modules() if units and isinstance(m, units) for p in m.parameters()}
    rest = max((sum(p.numel() for p in net.parameters() if id(p) not in inside) for net in networks), default=0)
    return largest, rest


def memory(sizes: dict[str, int], steps: list[dict], world: int, deepspeed: dict,
           double_backward: bool = False) -> dict[str, dict[str, float]]:
    """Bytes per GPU by part, for each strategy (see the module docstring). `sizes`: trainable,
    frozen and ema parameter counts, the largest unit and rest (`_units`)."""
    p, f, e = sizes["trainable"], sizes["frozen"], sizes["ema"]
    held_out = 4 * sizes.get("held_out", 0)  # frozen networks outside the module tree: whole on every rank
    bucket = 4 * deepspeed["reduce_bucket_size"]
    per = {}
    for name in STRATEGIES:
        sharded = name in ("zero3", "fsdp")  # weights sharded
        split = world if name != "ddp" else 1  # gradients and optimizer state sharded
        fixed = {
            "parameters": 4 * (p + f) / (world if sharded else 1) + held_out,
            "ema": 4 * e / (world if sharded else 1),
            "optimizer": 8 * p / split + (4 * p / world if name.startswith("zero") else 0),
            "buffers": {"ddp": 4 * p, "zero2": bucket * (2 if deepspeed["overlap_comm"] else 1),
                        "zero3": bucket if deepspeed["contiguous_gradients"] else 0, "fsdp": 0}[name],
        }
        worst = None
        for step in steps:
            if name == "zero3":
                held = step["through"] if step["through"] <= deepspeed["stage3_max_reuse_distance"] else 0
                gathered = 4 * min(max(held, sizes["unit"]), deepspeed["stage3_max_live_parameters"])
            elif name == "fsdp":
                gathered = 16 * sizes["unit"] + 4 * (step["through"] if double_backward else sizes["rest"])
            else:
                gathered = 0
            phase = {"gathered": gathered, "gradients": 4 * step["steps"] / split,
                     "activations": max(step["activations"], 4 * step["steps"] / split)}
            if worst is None or sum(phase.values()) > sum(worst[1].values()):
                worst = step["name"], phase
        parts = {**fixed, **worst[1]}
        per[name] = {**{k: parts[k] for k in PARTS}, "total": sum(parts[k] for k in PARTS), "peak_phase": worst[0]}
    return per


def unsupported(module: Family) -> dict[str, str]:
    """Strategies this family cannot train under, and why."""
    optimizers = module.spec().optimizers
    if optimizers > 1:
        why = f"it trains {optimizers} optimizers (a GAN's G and D); Lightning's DeepSpeed strategy takes one"
        return {"zero2": why, "zero3": why}
    return {}


def plan(paths: list[str], nodes: int, gpus_per_node: int, micro_batch: int | None = None,
         overrides: list[str] = ()) -> dict[str, Any]:
    config = load_config(paths, overrides)
    with torch.device("meta"):
        module = _instantiate(config["model"], Family)
    batch = micro_batch or config.get("data", {}).get("init_args", {}).get("batch_size") or 1
    world = nodes * gpus_per_node
    largest, rest = _units(module)
    ema = _ema_target(config, module)
    steps = phases(module, batch)
    spec = module.spec()
    # frozen networks held outside the module tree (Spec.frozen: Imagen's text encoder) count as frozen
    held_out = {name: _numel(module.resolve(path)) for name, path in spec.frozen.items()}
    sizes = {"trainable": _count(module), "frozen": _count(module, trainable=False),
             "held_out": sum(held_out.values()), "ema": _numel(ema) if ema is not None else 0, "unit": largest, "rest": rest}
    per_gpu = memory(sizes, steps, world, _deepspeed_settings(config), spec.double_backward)
    components = {name: module.component(name) for name in spec.components}
    return {
        "config": paths, "family": spec.name, "nodes": nodes, "gpus_per_node": gpus_per_node,
        "micro_batch": batch, "global_batch": batch * world, "strategy": _strategy_of(config),
        "parameters": _count(module), "frozen_parameters": sizes["frozen"] + sizes["held_out"],
        "frozen_networks": held_out,
        "ema_parameters": sizes["ema"],
        "components": {name: _count(m) for name, m in components.items()},
        "largest_shard_unit": largest, "flops_per_sample": _flops(module, steps, batch) / batch,
        "activation_bytes_per_sample": max(p["activations"] for p in steps) / batch,
        "phases": [{k: v for k, v in p.items() if k != "flops"} for p in steps],
        "unsupported": unsupported(module),
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
    args, overrides = parser.parse_known_args(argv)  # the rest: `--key value` as `kiln fit` takes them
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ValueError("--nodes and --gpus-per-node must be at least 1")
    result = plan(args.config, args.nodes, args.gpus_per_node, args.micro_batch, overrides)
    chosen = args.strategy or result["strategy"]
    budget = args.gpu_memory_gib * GIB
    result["fits"] = {name: m["total"] <= budget for name, m in result["memory_per_gpu"].items()
                      if name not in result["unsupported"]}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_table(result, args.gpu_memory_gib))
    if chosen in result["unsupported"]:
        raise ValueError(f"{chosen} cannot train this {result['family']}: {result['unsupported'][chosen]}")
    if not result["fits"][chosen]:
        need = result["memory_per_gpu"][chosen]["total"] / GIB
        fitting = [n for n in STRATEGIES if result["fits"].get(n)]
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
        "per-GPU memory, GiB" + "".join(f"{SHORT.get(k, k):>9}" for k in (*PARTS, "total")) + f"   (of {gib:g})",
    ]
    for name, m in r["memory_per_gpu"].items():
        mark = "  <- config" if name == r["strategy"] else ""
        cells = "".join(f"{m[k] / GIB:9.2f}" for k in (*PARTS, "total"))
        verdict = ("not supported: " + r["unsupported"][name] if name in r["unsupported"]
                   else "fits" if m["total"] <= gib * GIB else "DOES NOT FIT")
        lines.append(f"  {name:<17}{cells}  {verdict}{mark}")
    return "\n".join(lines)
