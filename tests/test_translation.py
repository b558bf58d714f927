"""Image-to-image families (issue #27): Pix2Pix, CycleGAN and U-GAT-IT through `kiln fit`,
`kiln sample --input [--mode]` and `kiln eval` on emoji pairs (Twemoji -> Noto at 32 px); outputs
independent of the batch they are drawn in; CycleGAN's history pools through a checkpoint; and
Pix2Pix, whose batch norm and dropout see the global batch, trained on 2 processes ending where one
process on the same global batches ends. The full learning checks: tests/test_*_learning.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, kiln, kiln_eval, read_metrics
from kiln.datamodules.emoji import write_emoji_pair_shards

FAMILIES = ("pix2pix", "cyclegan", "ugatit")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """The first 96 pairs of each split at 32 px, 16 a shard."""
    root = tmp_path_factory.mktemp("pairs")
    write_emoji_pair_shards(str(root), size=32, shard_size=16, limit=96, progress=False, workers=1)
    return root


def _data(root: Path, **init_args) -> list[str]:
    return ["--data.init_args.root", str(root), "--data.init_args.build_size", "32",
            *(a for k, v in init_args.items() for a in (f"--data.init_args.{k}", str(v)))]


STEPS = 300  # the short learning check: each tiny model, 300 iterations
LEARNED = 0.7  # ... ends with L1 (and cycle error) below this fraction of the untrained model's


@pytest.fixture(scope="module")
def runs(pairs, tmp_path_factory):
    """family -> its tiny run, STEPS iterations (fit once per module)."""
    tmp, done = tmp_path_factory.mktemp("translation-runs"), {}

    def run(family: str) -> Path:
        if family not in done:
            out = tmp / family
            schedule = [] if family == "pix2pix" else ["--model.init_args.lr_constant_steps", str(STEPS // 2),
                                                       "--model.init_args.lr_decay_steps", str(STEPS // 2)]
            r = kiln("fit", "-c", f"configs/{family}/tiny.yaml", "--run_dir", str(out), "--wandb.mode", "disabled",
                     "--trainer.enable_progress_bar", "false", "--trainer.max_steps", str(STEPS),
                     "--checkpoint.every_n_train_steps", str(STEPS // 2), "--samples.every_n_train_steps", str(STEPS // 2),
                     *schedule, *_data(pairs))
            assert r.returncode == 0, r.stderr[-3000:]
            done[family] = out
        return done[family]

    return run


@pytest.mark.parametrize("family", FAMILIES)
def test_fit_sample_and_eval_on_held_out_pairs(runs, family, tmp_path):
    run = runs(family)
    assert sorted(p.name for p in (run / "samples").glob("grid-*.png")) == ["grid-step0000150.png", "grid-step0000300.png"]
    logged = {k for row in read_metrics(run) for k in row}
    assert "train/Gmain/loss" in logged and "train/Dmain/loss" in logged
    unpaired = family != "pix2pix"
    # FID and KID (EfficientNet-Lite0 features) once, for Pix2Pix: the same code scores every family
    metrics = ("--metrics", "translation") if unpaired else ()
    m = kiln_eval(str(run / "checkpoints" / "last.ckpt"), tmp_path / "m.json", *metrics)
    for key in ("l1", "l1_identity", "l1_ratio", "l1_nearest", "l1_nearest_ratio", "variance_ratio", "l1_untrained",
                *(() if unpaired else ("fid", "kid"))):
        assert key in m, (key, m)
    assert m["heldout/images"] == 96 and 0 < m["l1_identity"] < 0.5 and 0 < m["l1_nearest"] < 0.5, m
    assert abs(m["l1_ratio"] - m["l1"] / m["l1_identity"]) < 1e-9
    print(family, {k: round(v, 4) for k, v in m.items() if isinstance(v, float)})
    # the short learning check: clearly nearer the true targets than the untrained model
    assert m["l1"] < LEARNED * m["l1_untrained"], m
    if unpaired:
        assert m["cycle_a"] < LEARNED * m["cycle_a_untrained"], m
    assert ("cycle_a" in m and "b2a/l1" in m) == unpaired
    # kiln sample --input: one PNG per input and draw; the unpaired families both ways
    source = tmp_path / "in.png"
    from PIL import Image

    Image.new("RGB", (48, 40), (200, 60, 30)).save(source)
    ckpt = str(run / "checkpoints" / "last.ckpt")
    r = kiln("sample", "--ckpt", ckpt, "--input", str(source), "--num", "2", "--out", str(tmp_path / "a2b"))
    assert r.returncode == 0, r.stderr[-2000:]
    written = sorted(p.name for p in (tmp_path / "a2b").glob("0*.png"))
    assert written == ["0000-in.png", "0001-in.png"] and Image.open(tmp_path / "a2b" / written[0]).size == (32, 32)
    r = kiln("sample", "--ckpt", ckpt, "--input", str(source), "--mode", "b2a", "--out", str(tmp_path / "b2a"))
    if unpaired:
        assert r.returncode == 0, r.stderr[-2000:]
    else:
        assert r.returncode != 0 and "does not take --mode (it takes: --input)" in r.stderr
    r = kiln("sample", "--ckpt", ckpt, "--out", str(tmp_path / "none"))
    assert r.returncode != 0 and "give at least one --input" in r.stderr.strip().splitlines()[-1]


def _module(family: str):
    from kiln.modules.cyclegan.lit_module import CycleGANModule
    from kiln.modules.pix2pix.lit_module import Pix2PixModule
    from kiln.modules.ugatit.lit_module import UGATITModule

    cls = {"pix2pix": Pix2PixModule, "cyclegan": CycleGANModule, "ugatit": UGATITModule}[family]
    torch.manual_seed(0)
    return cls(**yaml.safe_load((REPO / f"configs/{family}/tiny.yaml").read_text())["model"]["init_args"])


@pytest.mark.parametrize("family", FAMILIES)
def test_an_output_does_not_depend_on_its_batch(family):
    module = _module(family)
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    seeds = [10, 11, 12, 13, 14]
    for mode in module.spec().modes or ("a2b",):
        together = module.translate(images, mode, seeds=seeds, use_ema=False)
        alone = torch.cat([module.translate(images[i:i + 1], mode, seeds=seeds[i:i + 1], use_ema=False) for i in range(5)])
        assert (together - alone).abs().max() < 1e-5, (family, mode)
    first = module.translate(images, seeds=seeds, use_ema=False)
    assert torch.equal(first, module.translate(images, seeds=seeds, use_ema=False))
    other = module.translate(images, seeds=[20, 21, 22, 23, 24], use_ema=False)
    # Pix2Pix keeps its dropout noise at test time, drawn from each image's seed; the others have none
    assert torch.equal(first, other) == (family != "pix2pix")


def test_cyclegan_history_pools_are_saved_and_given_back(runs):
    ckpt = torch.load(runs("cyclegan") / "checkpoints" / "last.ckpt", weights_only=True)
    pools = ckpt["image_pools"]
    assert set(pools) == {"a", "b"}
    for saved in pools.values():  # one rank's pools, full after 40 iterations of 4 images
        assert saved["count"].tolist() == [8] and saved["images"].shape == (1, 8, 3, 32, 32)
        assert saved["images"].abs().amax((1, 2, 3, 4)).item() > 0
    module = _module("cyclegan")
    module.on_load_checkpoint(ckpt)
    for domain, pool in module.pools.items():
        assert len(pool) == 8 and torch.equal(torch.stack(pool.images), pools[domain]["images"][0])
        assert torch.equal(pool.generator.get_state(), pools[domain]["generator"][0])


N = 3  # steps of the 2-process run


def test_pix2pix_on_two_processes_trains_as_one_holding_the_global_batch(tmp_path):
    """Batch norm in G and D over the global batch (cross-replica), dropout masks drawn for it:
    2 DDP ranks of 4 end where 1 process of 8 ends, in float64."""
    root = tmp_path / "pairs"
    write_emoji_pair_shards(str(root), size=32, shard_size=4, limit=32, progress=False, workers=1)
    common = ["-c", "configs/pix2pix/tiny.yaml", "--wandb.mode", "disabled", "--trainer.enable_progress_bar", "false",
              "--trainer.max_steps", str(N), "--checkpoint.every_n_train_steps", str(N),
              "--samples.every_n_train_steps", "1000", "--trainer.plugins",
              "lightning.pytorch.plugins.precision.DoublePrecision",
              *_data(root, shuffle="false", num_workers=0)]
    runs = {}
    for name, devices, batch in (("one", 1, 8), ("two", 2, 4)):
        extra = ["-c", "configs/trainer/ddp.yaml"] if devices == 2 else []
        r = kiln("fit", *common, *extra, "--trainer.devices", str(devices), "--data.init_args.batch_size", str(batch),
                 "--run_dir", str(tmp_path / name), env={"PYTHONPATH": str(REPO)})
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    one, two = runs["one"], runs["two"]
    assert one.keys() == two.keys()
    # the statistics moved from their start (0) by the global batch's
    assert max(one[k].abs().max().item() for k in one if k.endswith("running_mean")) > 1e-3
    diff = {k: (one[k] - two[k]).abs().max().item() for k in one if one[k].is_floating_point()}
    worst = max(diff, key=diff.get)
    assert diff[worst] < 1e-9, (worst, diff[worst])


# The authors' code (docs/paper-sizes.md): pix2pix unet_256 + 70x70 PatchGAN; CycleGAN resnet_9blocks +
# PatchGAN, two of each; U-GAT-IT full and light, a global and a local D per domain.
@pytest.mark.parametrize("config, sizes", [
    ("pix2pix/paper-256", {"generator": 54.414e6, "discriminator": 2.769e6}),
    ("cyclegan/paper-256", {"generator_a2b": 11.378e6, "generator_b2a": 11.378e6, "discriminator_a": 2.765e6,
                            "discriminator_b": 2.765e6}),
    ("ugatit/paper-256-full", {"generator_a2b": 278.96e6, "discriminator_global_a": 53.13e6,
                               "discriminator_local_b": 3.29e6}),
    ("ugatit/paper-256-light", {"generator_b2a": 10.59e6, "discriminator_global_b": 53.13e6,
                                "discriminator_local_a": 3.29e6}),
])
def test_paper_sizes(config, sizes):
    from kiln.trainers.commands.plan import plan

    result = plan([f"configs/{config}.yaml"], nodes=1, gpus_per_node=8)
    for name, expected in sizes.items():
        assert result["components"][name] == pytest.approx(expected, rel=0.05), name


def test_unpaired_sides_are_shuffled_independently_and_held_out_pairs_stay_true(pairs):
    from kiln.datamodules.datasets import EmojiPairsDataModule
    from kiln.datamodules.mappers import UnpairedImages

    data = EmojiPairsDataModule(UnpairedImages(32, a_key="input", b_key="target"), unpaired=True, root=str(pairs),
                                build_size=32, batch_size=16, num_workers=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert sum(a != b for a, b in zip(batch["key_a"], batch["key_b"])) >= 12  # different emoji side by side
    held_out = next(iter(data.val_dataloader()))
    assert held_out["key_a"] == held_out["key_b"]  # one sample, both of its drawings
    assert not torch.equal(held_out["a"], held_out["b"])
