"""The evaluation callback in the loop: a class-conditional model trained on digits scores far
better FID/KID and judge accuracy than untrained, and 2 ranks score the same samples as 1 rank."""
from __future__ import annotations

import json

import lightning as L
import pytest

from conftest import REPO, kiln, read_metrics
from kiln.datamodules.builders import write_digits_shards
from kiln.datamodules.mappers import ImageClass
from kiln.datamodules.webdataset import WebDataModule
from kiln.trainers.judging import GenerativeEval
from tests.toy_generator import ClassMeans


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("digits")
    write_digits_shards(str(root), shard_size=64, progress=False)
    return str(root)


def _run(digits: str, root, lr: float, steps: int) -> dict:
    callback = GenerativeEval(every_n_steps=1000, num_samples=300, extractor="judge-digits", judge="digits")
    data = WebDataModule(f"{digits}/train/*.tar", ImageClass(image_size=8), val_urls=f"{digits}/test/*.tar",
                         batch_size=32, num_workers=0)
    trainer = L.Trainer(max_steps=steps, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                        limit_val_batches=0, accelerator="cpu")
    trainer.fit(ClassMeans(lr=lr), data)
    return callback.last


def test_training_improves_every_score(digits, tmp_path):
    untrained = _run(digits, tmp_path, lr=0.0, steps=1)
    trained = _run(digits, tmp_path, lr=0.05, steps=40)
    fid, kid = "eval/fid/judge-digits", "eval/kid/judge-digits"
    assert trained[fid] < untrained[fid] / 3, (trained, untrained)
    assert trained[kid] < untrained[kid] / 3
    assert untrained["eval/judge_accuracy"] <= 0.2 and trained["eval/judge_accuracy"] >= 0.8
    assert trained["eval/judge_real_accuracy"] >= 0.9


def _toy_config(path, digits: str, lr: float, batch_size: int, steps: int, callbacks: str = "") -> str:
    """`kiln fit` of the toy model on the digits shards (callbacks: YAML lines under trainer)."""
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
""")
    return str(path)


def test_two_ranks_score_like_one(digits, tmp_path):
    config = _toy_config(tmp_path / "toy.yaml", digits, lr=0.0, batch_size=16, steps=2, callbacks="""
  callbacks:
    - class_path: kiln.trainers.judging.GenerativeEval
      init_args: {every_n_steps: 1000, num_samples: 250, extractor: judge-digits, judge: digits}""")
    scores = {}
    for devices in (1, 2):
        run = tmp_path / f"ranks-{devices}"
        r = kiln("fit", "-c", str(config), "--trainer.devices", str(devices), "--run_dir", str(run),
                 env={"PYTHONPATH": str(REPO)})
        assert r.returncode == 0, r.stderr[-3000:]
        [row] = [row for row in read_metrics(run) if "eval/fid/judge-digits" in row]
        scores[devices] = row
    for key in ("eval/fid/judge-digits", "eval/kid/judge-digits", "eval/judge_accuracy"):
        assert scores[2][key] == pytest.approx(scores[1][key], rel=1e-6, abs=1e-9), key


def test_kiln_eval_on_a_generative_checkpoint(digits, tmp_path):
    config = _toy_config(tmp_path / "toy.yaml", digits, lr=0.05, batch_size=32, steps=40)
    env = {"PYTHONPATH": str(REPO), "KILN_TRUSTED_PACKAGES": "tests"}  # the toy family lives in tests/
    r = kiln("fit", "-c", str(config), "--run_dir", str(tmp_path / "run"), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "m.json"
    r = kiln("eval", "--ckpt", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--extractor", "judge-digits",
             "--judge", "digits", "--num-samples", "300", "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(out.read_text())
    assert m["extractor"] == "judge-digits" and m["samples"] == 300
    assert m["fid"] < m["fid_untrained"] / 3 and m["judge/accuracy"] >= 0.8 > m["judge/accuracy_untrained"]
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and m["is"] > m["is_untrained"]
    r = kiln("eval", "--ckpt", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), "--metrics", "is",
             "--out", str(out), env=env)
    assert r.returncode != 0 and "inception score need a judge: --judge" in r.stderr
