"""GANs on 2 CPU processes (gloo): StyleGAN2-ADA and BigGAN train under DDP and FSDP2 (each
network's declared blocks sharded, both optimisers' state sharded with them) and end where one
process training on the same global batches ends (in float64, to 1e-9); a killed FSDP2 run resumes
to the uninterrupted one bit for bit.

What makes a 2-rank GAN run the one-process run: each rank's batch is its share of the global
batch, every random draw (latents, noise maps, style mixing, ADA's parameters, path-length
directions) is made for the global batch and sliced, ADA's sums and the running means
(w_avg, the path-length mean) are taken over all ranks, BigGAN's G normalises over the global batch
(cross-replica BatchNorm), and gradients are averaged over ranks."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, digits_data, ema_and_checkpoints, kiln, read_metrics, write_digits
from kiln.trainers.checkpoints.sharded import SafeReader, consolidate, read_pointer

N, K = 4, 2  # steps; the resumed run is killed after K
# The runs train in float64 (Lightning's DoublePrecision; "64-true" is refused by FSDP2's strategy):
# sharded, replicated and one-process runs add the same numbers in different orders, and in float32
# that rounding sometimes lands one of D's ~1e5 pre-activations on the other side of a (leaky) ReLU's
# kink, which changes one image's gradient by ~1e-3 and the weights by ~1e-4 from then on; where it
# happens depends on the CPU (a CI host diverged at step 2, this one did not). In float64 every
# strategy ends within ~1e-15 of the one process. Adam's eps = 1e-3 (above the rounding, below the
# real gradients) keeps a weight whose true gradient is 0 from stepping by ~lr on its rounding.
ATOL = 1e-9
EPS = 1.0e-3
STRATEGIES = {"ddp": "configs/trainer/ddp.yaml", "fsdp": "configs/trainer/fsdp.yaml", "single": "configs/trainer/cpu.yaml"}
FAMILIES = {
    # ADA on, its p moving (from 0.2, either way) and its sums mid-count at step K; R1 and path
    # length due at iterations 0 and 2, so in both halves of a resumed run.
    "stylegan": ("configs/stylegan/tiny.yaml",
                 "{augment_p: 0.2, ada_target: 0.0, ada_interval: 3, ada_kimg: 1, d_reg_interval: 2, g_reg_interval: 2, "
                 f"eps: {EPS}}}"),
    "biggan": ("configs/biggan/tiny.yaml", f"{{eps: {EPS}}}"),
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory, size=16, shard_size=16, limit=128)


def _config(model: str, digits: Path, kill: bool) -> str:
    # batch_size 16: one whole shard per rank and step, in order: 1 rank x 32 sees the same global batches
    return f"model:\n  init_args: {model}\n" + digits_data(digits, image_size=16, batch_size=16, val=False,
                                                             shuffle=False) + f"""\
trainer:
  accelerator: cpu
  devices: 2
  max_steps: {N}
  log_every_n_steps: 1
  enable_progress_bar: false
  plugins:
    - class_path: lightning.pytorch.plugins.precision.DoublePrecision
""" + ema_and_checkpoints(every=K, kill_at=K if kill else None)


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    """run(family, strategy) -> its run directory, each fit once per module."""
    tmp, done = tmp_path_factory.mktemp("gan-strategies"), {}

    def run(family: str, strategy: str) -> Path:
        if (family, strategy) not in done:
            done[family, strategy] = _fit(tmp, digits, family, strategy, tmp / f"{family}-{strategy}")
        return done[family, strategy]

    return run


def _fit(tmp: Path, digits: Path, family: str, strategy: str, run: Path, kill: bool = False, *extra: str) -> Path:
    config, model = FAMILIES[family]
    path = tmp / f"{run.name}{'-kill' if kill else ''}.yaml"
    path.write_text(_config(model, digits, kill))
    if strategy == "single":
        extra = ("--trainer.devices", "1", "--data.init_args.batch_size", "32", *extra)
    r = kiln("fit", "-c", config, "-c", STRATEGIES[strategy], "-c", str(path), "--run_dir", str(run), *extra,
             env={"PYTHONPATH": str(REPO)})
    if kill:
        assert r.returncode != 0, "not killed"
    else:
        assert r.returncode == 0, r.stderr[-3000:]
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == N
    return run


def _state(run: Path) -> dict[str, torch.Tensor]:
    return consolidate(str(run / "checkpoints" / "last.ckpt"))["state_dict"]


def _differences(a: dict, b: dict) -> dict[str, float]:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()}


# BigGAN's G puts a BatchNorm after these: their true gradient is 0 and what they get is rounding,
# different under each strategy. They (and the running means of the BatchNorms that subtract them)
# are compared through G's output instead.
CANCELLED = re.compile(r"(generator|ema)\.(blocks\.\d+\.(conv1|conv2|shortcut)\.bias|linear\.bias|.*running_mean)")


def _biggan_images(state: dict, net: str) -> torch.Tensor:
    """G (or EMA-G) of a checkpoint, in training mode (batch statistics), on fixed z and classes."""
    from kiln.modules.biggan.lit_module import BigGANModule

    hparams = yaml.safe_load((REPO / FAMILIES["biggan"][0]).read_text())["model"]["init_args"]
    module = BigGANModule(**hparams).double()
    prefix = "model.generator." if net == "generator" else "ema."
    module.generator.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return module.generator.train()(torch.randn(32, hparams["dim_z"], generator=g, dtype=torch.float64), torch.arange(32) % 10)


@pytest.mark.parametrize("family, strategy", [
    ("stylegan", "fsdp"), ("stylegan", "ddp"), ("biggan", "fsdp"), ("biggan", "ddp"),
])
def test_two_ranks_equal_one_process_on_the_same_global_batch(runs, family, strategy):
    single, ranks = _state(runs(family, "single")), _state(runs(family, strategy))
    diff = _differences(single, ranks)
    assert any(k.startswith("model.generator.") for k in diff) and any(k.startswith("ema.") for k in diff)
    if family == "biggan":
        cancelled = {k for k in diff if CANCELLED.search(k)}
        assert len(cancelled) > 10
        for net in ("generator", "ema"):
            images = _biggan_images(single, net)
            assert (images - _biggan_images(ranks, net)).abs().max().item() < ATOL, net
        diff = {k: v for k, v in diff.items() if k not in cancelled}
    worst = max(diff, key=diff.get)
    assert diff[worst] < ATOL, (worst, diff[worst])
    # ... while training moved the weights far more than that: G after N steps vs its EMA (decay 0.9)
    moved = max((single[k] - single["ema." + k[len("model.generator."):]]).abs().max().item()
                for k in single if k.startswith("model.generator.") and single[k].is_floating_point())
    assert moved > 1e4 * ATOL, moved
    if family == "stylegan":
        # ADA's state is the one process's: the same p, moved by r_t over all ranks' reals.
        assert torch.equal(single["augment.p"], ranks["augment.p"]) and single["augment.p"] != 0.2
        assert torch.equal(single["augment.signs"], ranks["augment.signs"])
        assert single["pl_mean"] > 0 and single["model.generator.mapping.w_avg"].abs().sum() > 0


def test_fsdp2_shards_both_networks_and_both_optimisers(runs):
    run = runs("stylegan", "fsdp")
    [row] = [r for r in read_metrics(run) if "dist/params_total" in r]
    assert row["dist/world_size"] == 2
    assert 0.5 <= row["dist/params_local_max"] / row["dist/params_total"] < 0.55  # 1/world, plus padding
    _, shards = read_pointer(str(run / "checkpoints" / "last.ckpt"))
    metadata = SafeReader(shards["url"]).read_metadata().state_dict_metadata
    for i, network in enumerate(("generator", "discriminator")):
        moments = [k for k in metadata if k.startswith(f"optimizer_{i}.state.") and k.endswith(".exp_avg_sq")]
        assert moments and all(f"model.{network}." in k for k in moments), (i, moments[:3])
        # each moment tensor is stored as one chunk per rank: the optimiser state is sharded
        conv = next(k for k in moments if k.endswith("blocks.0.conv1.weight.exp_avg_sq"))
        assert len(metadata[conv].chunks) == 2, metadata[conv]


def test_killed_fsdp2_gan_resumes_to_the_uninterrupted_run(runs, digits, tmp_path):
    full = runs("stylegan", "fsdp")
    resumed = tmp_path / "resumed"
    _fit(tmp_path, digits, "stylegan", "fsdp", resumed, True)
    at_kill, _ = read_pointer(str(resumed / "checkpoints" / "last.ckpt"))
    assert at_kill["global_step"] == K
    assert consolidate(str(resumed / "checkpoints" / "last.ckpt"))["state_dict"]["augment.signs"][1] > 0  # mid-count
    _fit(tmp_path, digits, "stylegan", "fsdp", resumed, False, "--ckpt_path", str(resumed / "checkpoints" / "last.ckpt"))
    diff = _differences(_state(full), _state(resumed))
    assert max(diff.values()) == 0.0, max(diff, key=diff.get)
    optimisers = [{k: v for k, v in _dcp(run).items() if k.startswith("optimizer_")} for run in (full, resumed)]
    assert optimisers[0].keys() == optimisers[1].keys() and len(optimisers[0]) == 2
    for name in optimisers[0]:
        a, b = optimisers[0][name]["state"], optimisers[1][name]["state"]
        assert a.keys() == b.keys() and a
        for param in a:
            for key in a[param]:
                assert torch.equal(torch.as_tensor(a[param][key]), torch.as_tensor(b[param][key])), (name, param, key)


def _dcp(run: Path) -> dict:
    from kiln.trainers.checkpoints.sharded import consolidate_dcp

    _, shards = read_pointer(str(run / "checkpoints" / "last.ckpt"))
    return consolidate_dcp(shards["url"])


def test_the_family_declares_and_trainers_build_the_ddp_settings():
    """A GAN declares that DDP must find unused parameters (each phase's backward reaches one
    network); `kiln.trainers.strategies.for_module` builds DDP with it wherever DDP runs, and
    leaves other families and other strategies alone."""
    from lightning.pytorch.strategies import DDPStrategy

    from kiln.modules.biggan.lit_module import BigGANModule
    from kiln.modules.clip.lit_module import CLIPModule
    from kiln.modules.stylegan.lit_module import StyleGAN2Module
    from kiln.trainers.strategies import FSDP2, for_module

    tiny = {family: yaml.safe_load((REPO / config).read_text())["model"]["init_args"] for family, (config, _) in FAMILIES.items()}
    for gan in (StyleGAN2Module(**tiny["stylegan"]), BigGANModule(**tiny["biggan"])):
        assert gan.spec().find_unused_parameters and gan.spec().optimizers == 2
        for name in ("ddp", "ddp_spawn"):
            assert isinstance(for_module(name, gan, "cpu", 2), DDPStrategy)
        assert isinstance(for_module("auto", gan, "cpu", 2), DDPStrategy)  # Lightning would pick DDP
        assert isinstance(for_module("auto", gan, "cpu", "auto", num_nodes=2), DDPStrategy)
        assert for_module("auto", gan, "cpu", 1) == "auto"  # one process: no DDP
        fsdp = FSDP2()
        assert for_module(fsdp, gan, "cpu", 2) is fsdp
    assert for_module("ddp", CLIPModule(), "cpu", 2) == "ddp"  # nothing declared: Lightning's own
    # R1 and path length backpropagate through a gradient: FSDP2 keeps gathered weights for them.
    assert StyleGAN2Module(**tiny["stylegan"]).spec().double_backward
    assert not StyleGAN2Module(**{**tiny["stylegan"], "r1_gamma": 0.0, "pl_weight": 0.0}).spec().double_backward
    assert not BigGANModule(**tiny["biggan"]).spec().double_backward
