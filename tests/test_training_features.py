"""Training options that must not change the maths: generator state across a resume, activation
checkpointing and torch.compile of the declared blocks."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from kiln.modules.clip.lit_module import CLIPModule
from kiln.modules.family import Family, Spec
from kiln.trainers.callbacks.rng import RandomState
from kiln.trainers.strategies import ActivationCheckpointing, Compile


class Dropout(Family):
    def spec(self) -> Spec:
        return Spec("dropout", generates=False)

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 1))

    def training_step(self, batch, _):
        return (self.net(batch[0]) - batch[1]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(steps: int, callbacks: list, root) -> L.Trainer:
    return L.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, accelerator="cpu")


@pytest.mark.parametrize("save_rng", [True, False])
def test_resume_draws_the_same_random_numbers(tmp_path, save_rng):
    """Dropout masks after a resume are the uninterrupted run's only when RandomState is saved."""
    data = torch.utils.data.TensorDataset(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)), torch.ones(8, 1))
    loader = lambda: DataLoader(data, batch_size=8)  # noqa: E731  (one batch per epoch: no data position)
    callbacks = lambda: [RandomState()] if save_rng else []  # noqa: E731
    L.seed_everything(0)
    full = Dropout()
    _trainer(8, callbacks(), tmp_path).fit(full, loader())
    L.seed_everything(0)
    half = Dropout()
    trainer = _trainer(4, callbacks(), tmp_path)
    trainer.fit(half, loader())
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    L.seed_everything(0)  # what a new process does first
    resumed = Dropout()
    _trainer(8, callbacks(), tmp_path).fit(resumed, loader(), ckpt_path=tmp_path / "half.ckpt")
    same = all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))
    assert same == save_rng


class Pairs(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"image": torch.rand(3, 16, 16, generator=g) * 2 - 1, "caption": f"emoji number {i % 16}"}


def _small_clip() -> CLIPModule:
    return CLIPModule(embed_dim=32, vision={"image_size": 16, "patch_size": 4, "width": 32, "layers": 2, "heads": 2},
                      text={"context_length": 32, "width": 32, "layers": 2, "heads": 2}, warmup_steps=1)


def _clip_weights(callbacks: list, root) -> tuple[dict[str, torch.Tensor], CLIPModule]:
    L.seed_everything(0)
    module = _small_clip()
    _trainer(3, callbacks, root).fit(module, DataLoader(Pairs(), batch_size=16))
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, module


@pytest.mark.parametrize("option", ["activation_checkpointing", "compile"])
def test_block_options_keep_the_maths(tmp_path, option):
    plain, _ = _clip_weights([], tmp_path)
    callback = ActivationCheckpointing() if option == "activation_checkpointing" else Compile(backend="aot_eager")
    changed, module = _clip_weights([callback], tmp_path)
    if option == "activation_checkpointing":
        wrapped = [m for m in module.modules() if type(m).__name__ == "CheckpointWrapper"]
        assert len(wrapped) == 4  # every transformer block of both towers
    else:
        assert all(getattr(b, "_compiled_call_impl", None) is not None for b in module.modules()
                   if isinstance(b, module.spec().shard_units))
    assert plain.keys() == changed.keys()
    for k in plain:
        torch.testing.assert_close(changed[k], plain[k], rtol=1e-5, atol=1e-6)


def test_fsdp2_mixed_precision_keeps_fp32_master_weights(tmp_path):
    """FSDP2 with bf16 compute (one process here; on GPUs the same policy): the blocks compute in
    bf16, the sharded master weights and optimizer state stay fp32, and the loss follows fp32's."""
    from kiln.trainers.strategies import FSDP2

    losses = {}
    for name, strategy in (("fp32", "auto"), ("bf16", FSDP2(param_dtype="bf16", reduce_dtype="fp32"))):
        L.seed_everything(0)
        module = _small_clip()
        seen: set = set()
        module.model.visual.transformer.blocks[0].register_forward_pre_hook(lambda m, a: seen.add(a[0].dtype))
        trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu", devices=1,
                            strategy=strategy)
        trainer.fit(module, DataLoader(Pairs(), batch_size=16))
        losses[name] = trainer.callback_metrics["train/loss"].item()
        assert seen == {torch.bfloat16 if name == "bf16" else torch.float32}
        assert all(p.dtype == torch.float32 for p in module.parameters())
        if name == "bf16":
            state = trainer.optimizers[0].state
            assert all(s["exp_avg"].dtype == torch.float32 for s in state.values())
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


def test_ema_checkpoints_load_and_a_missing_ema_is_named(tmp_path):
    """A checkpoint trained with EMA rebuilds with its `ema` copy; asking one without for EMA fails
    with one clear sentence."""
    from kiln.trainers.checkpoints.checkpoint import build_from_checkpoint
    from kiln.modules.ema import weights_for_sampling
    from kiln.trainers.callbacks.ema import EMA, attach

    module = _small_clip()
    attach(module, module.spec().ema_target)
    assert EMA(decay=0.5).decay_at(0) == pytest.approx(0.1)  # warm-up starts at 1/10
    config = "model:\n  class_path: kiln.modules.clip.lit_module.CLIPModule\n  init_args: " + str(
        dict(module.hparams)).replace("'", '"') + "\n"
    ckpt = {"state_dict": module.state_dict(), "kiln": {"family": "clip", "config": config}}
    rebuilt, _ = build_from_checkpoint(ckpt)
    assert weights_for_sampling(rebuilt) is rebuilt.ema
    plain = _small_clip()
    assert weights_for_sampling(plain) is plain.model
    with pytest.raises(ValueError, match="this clip checkpoint has no EMA weights"):
        weights_for_sampling(plain, use_ema=True)


class Regression(Family):
    def spec(self) -> Spec:
        return Spec("regression", generates=False)

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Linear(8, 1).double()

    def training_step(self, batch, _):
        return (self.model(batch[0]) - batch[1]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_ema_averages_once_per_optimizer_step_under_gradient_accumulation(tmp_path, accumulate=4):
    """accumulate_grad_batches=k over batches of B gives the weights and the EMA of one step over
    k * B: one average per optimizer step, not one per micro-batch (decay^k)."""
    from kiln.trainers.callbacks.ema import EMA

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 8, generator=g, dtype=torch.float64),
                                          torch.randn(64, 1, generator=g, dtype=torch.float64))
    runs = {}
    for k in (1, accumulate):
        torch.manual_seed(0)
        module = Regression()
        trainer = L.Trainer(max_steps=6, accumulate_grad_batches=k, callbacks=[EMA(decay=0.9, warmup=False)],
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
        trainer.fit(module, DataLoader(data, batch_size=64 // (2 * k)))  # two optimizer steps per epoch
        assert trainer.global_step == 6
        runs[k] = module
    vector = torch.nn.utils.parameters_to_vector
    assert torch.allclose(vector(runs[accumulate].model.parameters()), vector(runs[1].model.parameters()),
                          rtol=0, atol=1e-12)  # the same optimizer steps
    averaged = vector(runs[1].ema.parameters())
    assert not torch.allclose(averaged, vector(runs[1].model.parameters()))  # the average lags the weights
    assert torch.allclose(vector(runs[accumulate].ema.parameters()), averaged, rtol=0, atol=1e-12)
