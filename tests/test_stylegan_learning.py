"""StyleGAN2-ADA's full learning checks (issue #7), not in CI:
`python3 -m pytest -m learning -s tests/test_stylegan_learning.py`.

1. `configs/stylegan/learn.yaml` (Fashion-MNIST at 32 px, at most 15 minutes of training on 2 CPU
   cores), then `kiln eval` of the EMA generator: FID and KID on EfficientNet-Lite0 features at
   least 3x lower than the untrained generator's.
2. ADA's controller: learn.yaml's model with a discriminator 4x wider at 8 and 4 px (where width
   is cheap) and R1 gamma 0.01, on a 1,000-image subset (Fashion-MNIST shards written with the
   builder's `limit`) and on the full 60,000, trained side by side for the same number of
   iterations: D overfits the subset, so r_t (D's mean sign on reals) climbs to the target and p
   rises; on the full set r_t falls away from it and p stays near 0. The figures are printed as JSON.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import kiln, read_metrics

pytestmark = pytest.mark.learning

ADA_STEPS = 16000  # iterations of each ADA run (at batch 32: 512k images, 512 passes over the subset)
# learn.yaml's D is 32 channels wide from 16 px down; here 64 at 8 px and 128 at 4 px: 8x the
# parameters for ~2x the FLOPs. At learn.yaml's width D never overfits 1,000 images within a CPU
# budget (RESULTS.md); the FID check keeps the narrow D, which trains faster.
ADA_MODEL = ["--model.init_args.d_channel_base", "512", "--model.init_args.d_channel_max", "128",
             "--model.init_args.r1_gamma", "0.01"]


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


def _ada(run: Path, key: str) -> list[float]:
    return [m[key] for m in read_metrics(run) if key in m]


def fit_for_ada(tmp_path: Path, name: str, extra: list[str], steps: int) -> Path:
    run = tmp_path / name
    r = kiln("fit", "-c", "configs/stylegan/learn.yaml", *extra, *ADA_MODEL, "--data.init_args.batch_size", "32",
             "--run_dir", str(run), "--wandb.mode", "disabled", "--trainer.max_steps", str(steps),
             "--trainer.max_time", "null", timeout=7200)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def windows(values: list[float], parts: int = 6) -> list[float]:
    size = max(1, len(values) // parts)
    return [round(sum(values[i:i + size]) / len(values[i:i + size]), 3) for i in range(0, len(values), size)]


def test_ada_p_rises_on_a_small_subset_and_stays_near_zero_on_the_full_set(tmp_path):
    from kiln.datamodules.builders import write_fashion_mnist_shards

    shards = tmp_path / "fashion-1k"
    write_fashion_mnist_shards(str(shards), size=28, limit=1000, progress=False)
    subset = ["-c", str(subset_config(tmp_path / "subset.yaml", shards))]
    with ThreadPoolExecutor(2) as pool:  # one intra-op thread each (learn.yaml): both cores busy
        runs = pool.map(lambda args: fit_for_ada(tmp_path, *args, ADA_STEPS), [("subset", subset), ("full", [])])
        small_run, full_run = list(runs)
    small, full = _ada(small_run, "train/ada_p"), _ada(full_run, "train/ada_p")
    print(json.dumps({"ada_p_subset": small[-10:], "ada_p_full": full[-10:],
                      "r_t_windows_subset": windows(_ada(small_run, "train/ada_rt")),
                      "r_t_windows_full": windows(_ada(full_run, "train/ada_rt"))}, indent=1))
    # The words: p rises on the subset (from 0 to at least 0.05: 40 more steps up than
    # down, of 32 * 4 / 100k each with learn.yaml's ada_kimg) and stays near 0 on the full set (at
    # most 0.01 over its last ten values, so at most a fifth of the subset's). The ADA paper's p
    # climbs far higher with a 512-channel D over thousands of kimg; this D and 512 kimg gave 0.068.
    assert small[-1] >= 0.05, small[-10:]
    assert max(full[-10:]) <= 0.01, full[-10:]
