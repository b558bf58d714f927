"""BigGAN's full learning check (issue #7), not in CI: `python3 -m pytest -m learning -s tests/test_biggan_learning.py`.

`configs/biggan/learn.yaml` (Fashion-MNIST, class-conditional, 28 px, at most 15 minutes of training
on 2 CPU cores), then `kiln eval` of the EMA generator: the Fashion-MNIST judge's accuracy on samples
of each class, and the truncation trade-off at truncation 1.0 and 0.5: accuracy, and diversity as the
judge's per-class feature spread relative to real images (`judge/diversity`), beside improved
precision/recall and FID on EfficientNet-Lite0 features. The figures are printed as JSON.
"""
from __future__ import annotations

import json

import pytest

from conftest import kiln, kiln_eval

pytestmark = pytest.mark.learning


def test_samples_show_the_class_asked_for(tmp_path):
    run = tmp_path / "run"
    r = kiln("fit", "-c", "configs/biggan/learn.yaml", "--run_dir", str(run), "--wandb.mode", "disabled", timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = str(run / "checkpoints" / "last.ckpt")
    judged = ("--num-samples", "1000",  # the judge follows from the data: fashion-mnist
               "--metrics", "judge,precision_recall,fid")
    by_truncation = {t: kiln_eval(ckpt, tmp_path / f"t{t}.json", *judged, "--truncation", str(t),
                                  *(() if t == 1.0 else ("--no-untrained",)))
                     for t in (1.0, 0.5)}
    print(json.dumps({"truncation": by_truncation}, indent=1, sort_keys=True))
    m = by_truncation[1.0]
    assert m["judge"] == "fashion-mnist", m
    assert m["judge/accuracy"] >= 0.75 and m["judge/accuracy_untrained"] <= 0.25, m
    # Truncation trades diversity for fidelity: each class's samples spread less at 0.5.
    assert by_truncation[0.5]["judge/diversity"] < m["judge/diversity"], by_truncation
