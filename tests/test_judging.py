"""The evaluation callback in the loop: a class-conditional model trained on digits scores far
better FID/KID and judge accuracy than untrained, and 2 ranks score the same samples as 1 rank."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest

from conftest import REPO, kiln, read_metrics
from kiln.datamodules.builders import write_digits_shards
from kiln.datamodules.mappers import ImageClass
from kiln.datamodules.webdataset import WebDataModule
from kiln.trainers.callbacks.evaluation import GenerativeEval
from tests.toy_generator import ClassMeans, TwoStages


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("digits")
    write_digits_shards(str(root), shard_size=64, progress=False)
    return str(root)


def _run(digits: str, root, lr: float, steps: int, model=ClassMeans) -> dict:
    callback = GenerativeEval(every_n_steps=1000, num_samples=300, extractor="judge-digits", judge="digits")
    data = WebDataModule(f"{digits}/train/*.tar", ImageClass(image_size=8), val_urls=f"{digits}/test/*.tar",
                         batch_size=32, num_workers=0)
    trainer = L.Trainer(max_steps=steps, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        limit_val_batches=0, accelerator="cpu")
    trainer.fit(model(lr=lr), data)
    return callback.last


def test_training_improves_every_score(digits, tmp_path):
    untrained = _run(digits, tmp_path, lr=0.0, steps=1)
    trained = _run(digits, tmp_path, lr=0.05, steps=40)
    fid, kid = "eval/fid", "eval/kid"
    assert trained[fid] < untrained[fid] / 3, (trained, untrained)
    assert trained[kid] < untrained[kid] / 3
    assert untrained["eval/judge/accuracy"] <= 0.2 and trained["eval/judge/accuracy"] >= 0.8
    assert trained["eval/judge/real_accuracy"] >= 0.9


def test_each_cascade_stage_is_judged_at_its_own_size(digits, tmp_path):
    scores = _run(digits, tmp_path, lr=0.05, steps=40, model=TwoStages)
    assert {k for k in scores if "/base/" in k} == {"eval/base/fid", "eval/base/kid", "eval/base/samples",
                                                    "eval/base/judge/accuracy", "eval/base/judge/real_accuracy",
                                                    "eval/base/judge/diversity"}
    assert scores["eval/upsampled/judge/accuracy"] >= 0.8 and "eval/upsampled/fid" in scores


def _toy_config(path, digits: str, lr: float, batch_size: int, steps: int, callbacks: str = "", more: str = "") -> str:
    """`kiln fit` of the toy model on the digits shards (callbacks: YAML lines under trainer;
    more: top-level YAML lines)."""
    path.write_text(f"""\
model:
  class_path: tests.toy_generator.ClassMeans
  init_args: {{lr: {lr}}}
data:
  class_path: kiln.datamodules.webdataset.WebDataModule
  init_args:
    train_urls: {digits}/train/*.tar
    val_urls: {digits}/test/*.tar
    mapper: {{class_path: kiln.datamodules.mappers.ImageClass, init_args: {{image_size: 8}}}}
    batch_size: {batch_size}
    num_workers: 0
trainer:
  accelerator: cpu
  max_steps: {steps}
  limit_val_batches: 0
  enable_progress_bar: false{callbacks}
wandb:
  mode: disabled
{more}""")
    return str(path)


def test_a_learn_config_trains_the_stages_it_names_first(digits, tmp_path):
    """`stages:` names the runs a config builds on; `kiln fit` trains a missing one into the cache
    first and hands its checkpoint to `stage:NAME`; the next run finds it there."""
    base = _toy_config(tmp_path / "base.yaml", digits, lr=0.05, batch_size=32, steps=20)
    config = _toy_config(tmp_path / "second.yaml", digits, lr=0.0, batch_size=32, steps=2,
                         more=f"stages: {{base: {base}}}\n")
    Path(config).write_text(Path(config).read_text().replace("init_args: {lr: 0.0}", "init_args: {lr: 0.0, start_from: stage:base}"))
    env = {"PYTHONPATH": str(REPO), "KILN_TRUSTED_PACKAGES": "tests", "KILN_CACHE": str(tmp_path / "cache")}
    r = kiln("fit", "-c", config, "--run_dir", str(tmp_path / "run"), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stage 'base' is not trained yet: training it first" in r.stdout
    [stage] = (tmp_path / "cache" / "stages").glob("base-*")
    assert (stage / "done").exists()
    import torch

    def means(ckpt) -> torch.Tensor:
        return torch.load(ckpt, weights_only=True)["state_dict"]["model.means"]

    trained = means(stage / "checkpoints" / "last.ckpt")
    assert trained.abs().sum() > 0 and torch.equal(means(tmp_path / "run" / "checkpoints" / "last.ckpt"), trained)
    r = kiln("fit", "-c", config, "--run_dir", str(tmp_path / "again"), env=env)
    assert r.returncode == 0 and "not trained yet" not in r.stdout, r.stderr[-3000:]
    Path(config).write_text(Path(config).read_text().replace("stage:base", "stage:tokenizer"))
    r = kiln("fit", "-c", config, "--run_dir", str(tmp_path / "bad"), env=env)
    assert r.returncode != 0 and "'stage:tokenizer' names no stage of this config (stages: base)" in r.stderr, r.stderr


def test_two_ranks_score_like_one(digits, tmp_path):
    config = _toy_config(tmp_path / "toy.yaml", digits, lr=0.0, batch_size=16, steps=2, callbacks="""
  callbacks:
    - class_path: kiln.trainers.callbacks.evaluation.GenerativeEval
      init_args: {every_n_steps: 1000, num_samples: 250, extractor: judge-digits, judge: digits}""")
    scores = {}
    for devices in (1, 2):
        run = tmp_path / f"ranks-{devices}"
        r = kiln("fit", "-c", str(config), "--trainer.devices", str(devices), "--run_dir", str(run),
                 env={"PYTHONPATH": str(REPO)})
        assert r.returncode == 0, r.stderr[-3000:]
        [row] = [row for row in read_metrics(run) if "eval/fid" in row]
        scores[devices] = row
    for key in ("eval/fid", "eval/kid", "eval/judge/accuracy"):
        assert scores[2][key] == pytest.approx(scores[1][key], rel=1e-6, abs=1e-9), key


def test_a_toy_family_in_tests_trains_samples_evaluates_and_plans_through_the_contract(digits, tmp_path):
    """tests/toy_generator.py is a family like the built ones, with nothing of its own under
    trainers/: `kiln fit` trains it (and saves its sample grid), `kiln eval` judges it, `kiln
    sample` draws the classes asked for, and `kiln plan` sizes it, each through `Family` only."""
    config = _toy_config(tmp_path / "toy.yaml", digits, lr=0.05, batch_size=32, steps=40)
    env = {"PYTHONPATH": str(REPO), "KILN_TRUSTED_PACKAGES": "tests"}  # the toy family lives in tests/
    r = kiln("fit", "-c", str(config), "--run_dir", str(tmp_path / "run"), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((tmp_path / "run" / "samples").glob("grid-step0000040.png"))
    r = kiln("plan", "-c", str(config), "--nodes", "1", "--gpus-per-node", "2", "--json", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads(r.stdout)
    assert plan["family"] == "toy" and plan["parameters"] == 10 * 8 * 8 and plan["phases"][0]["name"] == "step"
    out = tmp_path / "m.json"
    r = kiln("eval", "--ckpt", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--extractor", "judge-digits",
             "--judge", "digits", "--num-samples", "300", "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(out.read_text())
    assert m["extractor"] == "judge-digits" and m["samples"] == 300
    assert m["fid"] < m["fid_untrained"] / 3 and m["judge/accuracy"] >= 0.8 > m["judge/accuracy_untrained"]
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and m["is"] > m["is_untrained"]
    assert 0 < m["judge/diversity_untrained"] and 0 < m["judge/diversity"] < 1.5  # the toy: 0.024 (untrained 0.013)
    # The judge follows from the data the run trained on (its shards' manifest: digits), with no flag.
    r = kiln("eval", "--ckpt", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--metrics", "judge",
             "--num-samples", "300", "--no-untrained", "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    inferred = json.loads(out.read_text())
    assert inferred["judge"] == "digits" and inferred["judge/accuracy"] == m["judge/accuracy"]
    # `kiln sample` on the same checkpoint: the PNGs are the classes asked for (the digits judge says so).
    samples = tmp_path / "samples"
    r = kiln("sample", "--ckpt", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--class", "3", "--class", "7",
             "--num", "2", "--seed", "1", "--out", str(samples), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    pngs = sorted(p.name for p in samples.glob("0*.png"))
    assert pngs == ["0000-3.png", "0001-3.png", "0002-7.png", "0003-7.png"] and (samples / "grid.png").exists()
    from PIL import Image

    from kiln.modules.eval.judge import get_judge, to_unit

    images = to_unit(np.stack([np.array(Image.open(samples / name)) for name in pngs]))
    assert get_judge("digits").logits(images).argmax(1).tolist() == [3, 3, 7, 7]
    r = kiln("sample", "--ckpt", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--prompt", "a seven",
             "--out", str(samples), env=env)
    assert r.returncode != 0 and "family does not take --prompt (it takes: --class)" in r.stderr, r.stderr


def test_fsdp2_ranks_make_the_same_number_of_generation_calls(digits, tmp_path):
    """201 samples in calls of 100 over 2 ranks: 101 + 100, yet both ranks call 2 times (a sharded
    forward is a collective; a rank calling once more waited forever), and the scores are one rank's."""
    config = _toy_config(tmp_path / "toy.yaml", digits, lr=0.0, batch_size=16, steps=2, callbacks="""
  callbacks:
    - class_path: kiln.trainers.callbacks.evaluation.GenerativeEval
      init_args: {every_n_steps: 1000, num_samples: 201, batch_size: 100, extractor: judge-digits, judge: digits}""")
    Path(config).write_text(Path(config).read_text().replace("tests.toy_generator.ClassMeans",
                                                           "tests.toy_generator.ShardedClassMeans"))
    scores = {}
    for devices, strategy in ((1, "auto"), (2, "fsdp")):
        run = tmp_path / f"ranks-{devices}"
        args = ["-c", str(config), "--trainer.devices", str(devices), "--run_dir", str(run)]
        if strategy == "fsdp":  # a short collective timeout: a rank left waiting fails the test in a minute
            args += ["--trainer.strategy", "kiln.trainers.strategies.FSDP2", "--trainer.strategy.timeout_s", "60"]
        r = kiln("fit", *args, env={"PYTHONPATH": str(REPO)}, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        [row] = [row for row in read_metrics(run) if "eval/fid" in row]
        scores[devices] = row
    for key in ("eval/fid", "eval/kid", "eval/judge/accuracy"):
        assert scores[2][key] == pytest.approx(scores[1][key], rel=1e-5, abs=1e-9), key
