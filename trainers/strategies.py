"""How a run is spread over processes, picked by config (configs/trainer/*.yaml):

    cpu.yaml    one process
    ddp.yaml    DDP: every rank holds the whole model (gloo on CPU, NCCL on GPU)
    fsdp.yaml   FSDP2 (`FSDP2`): each family's declared shard units, then the rest, are `fully_shard`ed
    zero2.yaml  DeepSpeed ZeRO-2 (`DeepSpeedZeRO`): optimizer state and gradients sharded
    zero3.yaml  DeepSpeed ZeRO-3: parameters sharded too

Families declare their shard units in their `Spec` (the transformer block, the U-Net's
residual block); FSDP2 shards each one and activation checkpointing wraps the same blocks. A
family's training may declare more (`for_module` and `FSDP2` read them): `find_unused_parameters`
(a backward that reaches only part of the model, as a GAN's phases do) and `double_backward`
(losses that backpropagate through a gradient, as R1 does).
Sharded strategies write checkpoints through `kiln.trainers.checkpoints.sharded`: shards on any fsspec URL,
a pointer written last and atomically, and nothing unpickled on the way back.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy
from torch import nn

from kiln.trainers.checkpoints import sharded
from kiln.modules.family import Family
from kiln.trainers.checkpoints.deepspeed import WeightsOnlyEngine, local_dir
from kiln.trainers.checkpoints.files import CheckpointError


def shard_units(module: Family) -> tuple[type, ...]:
    return tuple(module.spec().shard_units)


def parameter_numel(module: nn.Module) -> tuple[int, int]:
    """(elements this rank stores, elements of the whole model) over parameters, for any strategy:
    FSDP2's DTensors hold a local shard, ZeRO-3 parameters a `ds_tensor` partition."""
    local = total = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):  # ZeRO-3
            local += p.ds_tensor.numel()
            total += p.ds_numel
        elif hasattr(p, "to_local"):  # DTensor
            local += p.to_local().numel()
            total += p.numel()
        else:
            local += p.numel()
            total += p.numel()
    return local, total


class ParameterSharding(L.Callback):
    """Logs how parameters are spread: `dist/params_total` and `dist/params_local_max` (the most
    elements any one rank stores), so a sharded run shows it holds about 1/world per rank."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        local, total = parameter_numel(pl_module)
        per_rank = trainer.strategy.all_gather(torch.tensor(local, device=pl_module.device))
        metrics = {"dist/params_total": float(total), "dist/params_local_max": float(per_rank.max()),
                   "dist/world_size": float(trainer.world_size)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


class ActivationCheckpointing(L.Callback):
    """Recomputes each declared shard unit's activations in the backward pass instead of storing
    them: memory for compute, under any strategy (applied before DDP/FSDP2/DeepSpeed wrap)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            apply_activation_checkpointing,
            checkpoint_wrapper,
        )

        units = shard_units(pl_module)
        if not units:
            raise ValueError(f"activation checkpointing: {type(pl_module).__name__} declares no shard_units in its Spec")
        apply_activation_checkpointing(pl_module, checkpoint_wrapper_fn=checkpoint_wrapper,
                                       check_fn=lambda m: isinstance(m, units))


class Compile(L.Callback):
    """`torch.compile` of each declared shard unit (one compiled graph per block, reused by every
    block of the same shape, as torchtitan does), applied before the strategy wraps the model.

    Args:
        backend / mode: passed to torch.compile ("inductor" needs a C++ compiler on CPU).
    """

    def __init__(self, backend: str = "inductor", mode: str | None = None):
        self.backend, self.mode = backend, mode

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        units = shard_units(pl_module)
        if not units:
            raise ValueError(f"compile: {type(pl_module).__name__} declares no shard_units in its Spec")
        for sub in pl_module.modules():
            if isinstance(sub, units):
                sub.compile(backend=self.backend, mode=self.mode)


# Lightning's DDP strategy names and how each starts its processes (lightning.pytorch.strategies.ddp).
_DDP_NAMES = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_fork": "fork", "ddp_notebook": "fork"}


def for_module(strategy: Any, module: Family, accelerator: Any = "auto", devices: Any = "auto",
               num_nodes: int = 1) -> Any:
    """The Trainer's `strategy` for this family: a DDP strategy given by name (or "auto" where
    Lightning would pick DDP) is built with what the family declares (`find_unused_parameters`);
    anything else is returned as it is (a strategy built from a config's class_path keeps the
    settings written there)."""
    if not module.spec().find_unused_parameters or not isinstance(strategy, str):
        return strategy
    if strategy == "auto" and _processes(accelerator, devices, num_nodes) > 1:
        strategy = "ddp"
    if strategy not in _DDP_NAMES:
        return strategy
    return DDPStrategy(start_method=_DDP_NAMES[strategy], find_unused_parameters=True)


def _processes(accelerator: Any, devices: Any, num_nodes: int) -> int:
    """How many processes Lightning starts for these trainer settings (what "auto" picks DDP on)."""
    if isinstance(devices, (list, tuple)):
        per_node = len(devices)
    elif isinstance(devices, int) or (isinstance(devices, str) and devices.lstrip("-").isdigit()):
        per_node = int(devices)
        if per_node == -1:  # every device of the accelerator
            per_node = _devices_here(accelerator)
    else:  # "auto"
        per_node = _devices_here(accelerator)
    return per_node * max(1, int(num_nodes or 1))


def _devices_here(accelerator: Any) -> int:
    """What devices "auto" (or -1) comes to: every CUDA device where CUDA is asked for and present;
    on the CPU, one process."""
    cuda = accelerator in ("gpu", "cuda", "auto") if isinstance(accelerator, str) else type(accelerator).__name__ == "CUDAAccelerator"
    return torch.cuda.device_count() if cuda and torch.cuda.is_available() else 1


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


class FSDP2(ModelParallelStrategy):
    """FSDP2 (`torch.distributed.fsdp.fully_shard`) over all ranks.

    Args:
        reshard_after_forward: free gathered parameters after each unit's forward (ZeRO-3-like);
            False keeps them until backward (ZeRO-2-like, more memory, less communication).
        param_dtype / reduce_dtype: mixed precision ("bf16" on GPU): compute and gradient
            reduction dtypes; the sharded master weights and optimizer state stay fp32.
        timeout_s: collective and rendezvous timeout.
    """

    def __init__(self, reshard_after_forward: bool = True, param_dtype: str | None = None,
                 reduce_dtype: str | None = None, timeout_s: float = 1800.0, **kwargs: Any):
        super().__init__(timeout=timedelta(seconds=timeout_s), **kwargs)
        self.reshard_after_forward = reshard_after_forward
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self._keep_gathered: list[nn.Module] = []  # units whose weights outlive a backward (`parallelize`)

    def setup_environment(self) -> None:
        # Pure data parallel: every rank is a data-parallel rank (no tensor parallelism).
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()
        # Lightning calls `configure_model` next, at the point where parallelizing belongs.
        module = self.lightning_module
        family_hook = module.configure_model

        def configure_model() -> None:
            family_hook()
            self.parallelize(module)

        module.configure_model = configure_model

    def parallelize(self, module: L.LightningModule) -> None:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
        from torch.distributed.tensor import DTensor

        units = shard_units(module)
        if not units:
            raise ValueError(f"FSDP2: {type(module).__name__} declares no shard_units in its Spec")
        policy = MixedPrecisionPolicy(param_dtype=_dtype(self.param_dtype), reduce_dtype=_dtype(self.reduce_dtype))
        kwargs = {"mesh": self.device_mesh["data_parallel"], "mp_policy": policy,
                  "reshard_after_forward": self.reshard_after_forward}
        for sub in list(module.modules()):
            if isinstance(sub, units):
                fully_shard(sub, **kwargs)
        # What is left (embeddings, norms, heads): one unit per network a family runs on its own
        # (`Spec.components`: a GAN calls its generator and discriminator, never the pair), then
        # one per top-level child for whatever those leave. A unit gathers its weights only when
        # its own forward runs, so a network called on its own needs its own unit.
        spec = module.spec()
        for net in (*(module.component(name) for name in spec.components), *module.children()):
            if any(not isinstance(p, DTensor) for p in net.parameters()):
                fully_shard(net, **kwargs)
        # A backward through a gradient (create_graph) reuses the weights the first backward
        # gathered: FSDP2 must not free them when that first backward ends (pytorch#172543). They
        # are let go after each outer backward instead (`post_backward`), before any optimizer step.
        self._keep_gathered = []
        if spec.double_backward:
            self._keep_gathered = [m for m in module.modules() if isinstance(m, FSDPModule)]
            for unit in self._keep_gathered:
                unit.set_reshard_after_backward(False, recurse=False)

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        super().post_backward(closure_loss)
        for unit in self._keep_gathered:
            unit.reshard()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any = None) -> None:
        import torch.distributed.checkpoint as dcp

        pointer = self.broadcast(str(filepath))
        name, url = self.broadcast(sharded.shard_dir(pointer, checkpoint.get("global_step", 0)))
        state = {"state_dict": checkpoint.pop("state_dict")}
        for i, optim_state in enumerate(checkpoint.pop("optimizer_states", [])):
            state[f"optimizer_{i}"] = optim_state
        dcp.save(state, storage_writer=sharded.dcp_writer(url))
        self.barrier("kiln.shards_written")
        if self.global_rank == 0:
            sharded.write_pointer(pointer, checkpoint, {"format": "dcp", "dir": name, "world_size": self.world_size}, name)
        self.barrier("kiln.pointer_written")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        path = self.broadcast(str(checkpoint_path))
        ckpt, shards = sharded.read_pointer(path)
        module, strict = self.lightning_module, self.lightning_module.strict_loading
        if shards is None:  # a single-file checkpoint (DDP, one process, consolidated)
            full = StateDictOptions(full_state_dict=True, strict=strict)
            set_model_state_dict(module, ckpt.pop("state_dict"), options=full)
            for optimizer, state in zip(self.optimizers, ckpt.pop("optimizer_states", [])):
                set_optimizer_state_dict(module, optimizer, sharded.by_name(state, optimizer, module), options=full)
            return ckpt
        if shards["format"] != "dcp":
            raise CheckpointError(f"{path} is {sharded.describe(shards)}; FSDP2 reads DCP or single-file "
                                  f"checkpoints (`kiln consolidate {path} --out FILE` makes one)")
        state = {"state_dict": get_model_state_dict(module)}
        sharded.load_dcp(state, shards["url"])
        set_model_state_dict(module, state["state_dict"], options=StateDictOptions(strict=strict))
        for i, optimizer in enumerate(self.optimizers):
            state = {f"optimizer_{i}": get_optimizer_state_dict(module, optimizer)}
            sharded.load_dcp(state, shards["url"])
            set_optimizer_state_dict(module, optimizer, state[f"optimizer_{i}"])
        return ckpt


class DeepSpeedZeRO(DeepSpeedStrategy):
    """DeepSpeed ZeRO through Lightning, also on CPU with gloo (Lightning's own refuses the CPU in
    three places), with kiln's sharded checkpoints.

    Args:
        stage: 2 shards optimizer state and gradients, 3 the parameters too.
        param_persistence_threshold: ZeRO-3 keeps parameters smaller than this unsharded
            (DeepSpeed's default 1e5 suits GPUs; 0 shards every parameter).
        timeout_s: collective timeout.
    """

    def __init__(self, stage: int = 3, param_persistence_threshold: int | None = None,
                 timeout_s: float = 1800.0, **kwargs: Any):
        super().__init__(stage=stage, timeout=timedelta(seconds=timeout_s), **kwargs)
        if param_persistence_threshold is not None:
            self.config["zero_optimization"]["stage3_param_persistence_threshold"] = param_persistence_threshold

    def setup_environment(self) -> None:
        if self.root_device.type == "cpu":
            DDPStrategy.setup_environment(self)  # skip the CUDA-only check
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        if self.root_device.type != "cpu":
            return super().setup_distributed()
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _auto_select_batch_size(self) -> int:
        # Lightning asks the train loader's sampler; kiln's streaming loaders batch in the pipeline.
        return getattr(self.lightning_module.trainer.datamodule, "batch_size", 1)

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import argparse

        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.root_device.index or 0),
            config=self.config, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
            model_parameters=[p for p in model.parameters() if p.requires_grad], dist_init_required=False,
        )
        engine.checkpoint_engine = WeightsOnlyEngine(engine.checkpoint_engine)
        return engine, ds_optimizer

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any = None) -> None:
        pointer = self.broadcast(str(filepath))
        name, url = self.broadcast(sharded.shard_dir(pointer, checkpoint.get("global_step", 0)))
        rest = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        with local_dir(url, upload=True) as local:
            self.deepspeed_engine.save_checkpoint(local, client_state={}, tag="checkpoint",
                                                  exclude_frozen_parameters=self.exclude_frozen_parameters)
        self.barrier("kiln.shards_written")
        if self.global_rank == 0:
            shards = {"format": "deepspeed", "dir": name, "world_size": self.world_size, "stage": self.config[
                "zero_optimization"]["stage"]}
            sharded.write_pointer(pointer, rest, shards, name)
        self.barrier("kiln.pointer_written")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        from lightning.pytorch.trainer.states import TrainerFn

        path = self.broadcast(str(checkpoint_path))
        ckpt, shards = sharded.read_pointer(path)
        if shards is None or shards["format"] != "deepspeed":
            raise CheckpointError(f"{path} is {sharded.describe(shards)}; DeepSpeed resumes only its own "
                                  "checkpoints (start from the weights with `model.init_args.weights` instead)")
        if shards["world_size"] != self.world_size:
            raise CheckpointError(f"{path} was written by {shards['world_size']} ranks; DeepSpeed reloads it only "
                                  f"on the same number (this run has {self.world_size})")
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        with local_dir(shards["url"], upload=False) as local:
            loaded, _ = self.deepspeed_engine.load_checkpoint(
                local, tag="checkpoint", load_optimizer_states=fitting, load_lr_scheduler_states=False,
                load_module_strict=self.lightning_module.strict_loading)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load the shards of {path}")
        return ckpt


