"""StyleGAN2-ADA's full learning checks (issue #7), not in CI:
`python3 -m pytest -m learning -s tests/test_stylegan_learning.py`.

1. `configs/stylegan/learn.yaml` (Fashion-MNIST at 32 px, at most 15 minutes of training on 2 CPU
   cores), then `kiln eval` of the EMA generator: FID and KID on EfficientNet-Lite0 features at
   least 3x lower than the untrained generator's.
2. ADA's controller: the same model on a 1,000-image subset (Fashion-MNIST shards written with the
   builder's `limit`) and on the full 60,000 for the same number of iterations: D overfits the
   subset, so p rises; on the full set it stays near 0. The figures are printed as JSON.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import kiln, read_metrics

pytestmark = pytest.mark.learning

ADA_STEPS = 1500  # iterations of each ADA run (at batch 32: 48k images, 48 passes over the subset)


def test_fid_and_kid_three_times_better_than_untrained(tmp_path):
    run = tmp_path / "run"
    r = kiln("fit", "-c", "configs/stylegan/learn.yaml", "--run_dir", str(run), "--wandb.mode", "disabled", timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = tmp_path / "m.json"
    r = kiln("eval", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--metrics", "fid,kid", "--num-samples", "1000",
             "--out", str(m), timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    scores = json.loads(m.read_text())
    print(json.dumps(scores, indent=1, sort_keys=True))
    assert scores["extractor"] == "efficientnet-lite0"
    assert scores["fid"] * 3 <= scores["fid_untrained"], scores
    assert scores["kid"] * 3 <= scores["kid_untrained"], scores


def subset_config(path: Path, shards: Path) -> Path:
    """learn.yaml's model on the shards at `shards` (WebDataModule: a limited build is used as is)."""
    path.write_text(f"""\
data:
  class_path: kiln.datamodules.webdataset.WebDataModule
  init_args:
    train_urls: {shards}/train/*.tar
    val_urls: {shards}/test/*.tar
""")
    return path


def _ada_p(run: Path) -> list[float]:
    return [m["train/ada_p"] for m in read_metrics(run) if "train/ada_p" in m]


def fit_for_ada(tmp_path: Path, name: str, extra: list[str], steps: int) -> list[float]:
    run = tmp_path / name
    r = kiln("fit", "-c", "configs/stylegan/learn.yaml", *extra, "--data.init_args.batch_size", "32", "--run_dir", str(run),
             "--wandb.mode", "disabled", "--trainer.max_steps", str(steps), "--trainer.max_time", "null", timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    return _ada_p(run)


def test_ada_p_rises_on_a_small_subset_and_stays_near_zero_on_the_full_set(tmp_path):
    from kiln.datamodules.builders import write_fashion_mnist_shards

    shards = tmp_path / "fashion-1k"
    write_fashion_mnist_shards(str(shards), size=28, limit=1000, progress=False)
    small = fit_for_ada(tmp_path, "subset", ["-c", str(subset_config(tmp_path / "subset.yaml", shards))],
                        ADA_STEPS)
    full = fit_for_ada(tmp_path, "full", [], ADA_STEPS)
    print(json.dumps({"ada_p_subset": small[-10:], "ada_p_full": full[-10:]}, indent=1))
    assert small[-1] >= 0.1, small[-10:]
    assert max(full[-10:]) <= 0.05, full[-10:]
    assert small[-1] >= 3 * full[-1], (small[-1], full[-1])
