"""The unpaired translators' full learning checks (issue #27), not in CI:
`python3 -m pytest -m learning -s tests/test_unpaired_learning.py -k cyclegan` (or `-k ugatit`).

`configs/<family>/learn.yaml`: unpaired Twemoji and Noto emoji at 32 px (the two sides of the
training pairs streamed independently, so a batch's a and b are different emoji), at most 30
minutes of training on 2 CPU cores, judged during training every quarter (the `GenerativeEval`
callback: `eval/cycle_a`, ...) and by `kiln eval` at the end on the held-out true pairs. Bars: on
the random 10% held out, L1 to the true Noto drawing at most 0.9x the input's own (`l1_ratio`); the
cycle error falling from the first evaluation to the last; no collapse: the outputs' per-image
variance at least half the targets' (`variance_ratio`). Reported beside them: the held-out base
designs (`val-designs`), the lookup table (`l1_nearest_ratio`), b -> a, FID on the target style.
"""
from __future__ import annotations

import json

import pytest

from conftest import kiln, kiln_eval, read_metrics
from kiln.datamodules.datasets import cache_dir

pytestmark = pytest.mark.learning


@pytest.mark.parametrize("family", ["cyclegan", "ugatit"])
def test_unpaired_translation_beats_the_input_on_held_out_pairs(family, tmp_path):
    run = tmp_path / "run"
    r = kiln("fit", "-c", f"configs/{family}/learn.yaml", "--run_dir", str(run), "--wandb.mode", "disabled", timeout=5400)
    assert r.returncode == 0, r.stderr[-3000:]
    evals = [row for row in read_metrics(run) if "eval/cycle_a" in row]
    ckpt = str(run / "checkpoints" / "last.ckpt")
    designs = f"{cache_dir('emoji-pairs-twemoji-noto-64')}/val-designs/*.tar"
    m = {"val": kiln_eval(ckpt, tmp_path / "val.json"),
         "val-designs": kiln_eval(ckpt, tmp_path / "designs.json", "--heldout", designs, "--no-untrained"),
         "during training": [{k: row[k] for k in ("step", "eval/l1_ratio", "eval/cycle_a", "eval/cycle_b",
                                                   "eval/variance_ratio", "eval/fid") if k in row} for row in evals]}
    print(json.dumps({family: m}, indent=1, sort_keys=True))
    val = m["val"]
    assert val["l1_ratio"] <= 0.9, val
    assert len(evals) >= 2 and evals[-1]["eval/cycle_a"] < evals[0]["eval/cycle_a"], m["during training"]
    assert val["variance_ratio"] >= 0.5, val
