"""Imagen's full learning checks (issue #26), not in CI: `python3 -m pytest -m learning -s tests/test_imagen_learning.py`.

Base: `configs/imagen/learn.yaml` (Fashion-MNIST, captions "a photo of a <class>", the frozen MiniLM encoder, at
most 15 minutes of training on 2 CPU cores), then `kiln eval`: the Fashion-MNIST judge's accuracy on guided samples
of the training prompts and FID/KID against the untrained model; then the paper's point, generalisation to text
never seen in training: judge accuracy on configs/imagen/fashion-mnist-unseen.tsv (`kiln eval --prompts`), for
Imagen and for GLIDE's learn config (its own text transformer, trained on the same data for the same 15 minutes).
Super-resolution: `configs/imagen/learn-sr.yaml` (14 -> 28 px, with noise-conditioning augmentation) on held-out
real images against bicubic, and the whole cascade's FID (base: `configs/imagen/learn-base-14.yaml`, trained
first as the stage both name) with the sampling-time level swept, against `configs/imagen/learn-sr-noaug.yaml`
(the same stage without the augmentation). Figures: RESULTS.md.
"""
from __future__ import annotations

import json

import pytest

from conftest import kiln, kiln_eval

pytestmark = pytest.mark.learning

UNSEEN = "configs/imagen/fashion-mnist-unseen.tsv"


def _fit(config: str, run) -> str:
    r = kiln("fit", "-c", config, "--run_dir", str(run), "--wandb.mode", "disabled", timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    return str(run / "checkpoints" / "last.ckpt")


def test_base_follows_text_it_never_saw_where_glide_does_not(tmp_path):
    imagen = _fit("configs/imagen/learn.yaml", tmp_path / "imagen")
    m = kiln_eval(imagen, tmp_path / "imagen.json", "--num-samples", "500")
    unseen = kiln_eval(imagen, tmp_path / "imagen-unseen.json", "--num-samples", "400", "--prompts", UNSEEN,
                       "--metrics", "judge", "--no-untrained")
    glide = _fit("configs/glide/learn.yaml", tmp_path / "glide")
    glide_unseen = kiln_eval(glide, tmp_path / "glide-unseen.json", "--num-samples", "400", "--prompts", UNSEEN,
                             "--metrics", "judge", "--no-untrained")
    print(json.dumps({"imagen": m, "imagen_unseen": unseen, "glide_unseen": glide_unseen}, indent=1, sort_keys=True))
    assert m["judge/accuracy"] >= 0.9 and m["fid"] * 3 <= m["fid_untrained"], m
    assert unseen["judge/accuracy"] >= 0.45, unseen
    assert unseen["judge/accuracy"] >= 2 * glide_unseen["judge/accuracy"], (unseen, glide_unseen)


def test_sr_beats_bicubic_and_noise_augmentation_helps_the_cascade(tmp_path):
    runs = {name: _fit(f"configs/imagen/{name}.yaml", tmp_path / name) for name in ("learn-sr", "learn-sr-noaug")}
    result = {}
    for name, ckpt in runs.items():
        for level in (0.0, 0.1, 0.25, 0.5) if name == "learn-sr" else (0.0,):
            result[f"{name}@{level}"] = kiln_eval(ckpt, tmp_path / f"{name}-{level}.json", "--num-samples", "500",
                                                  "--no-untrained", "--augmentation-level", str(level),
                                                  "--metrics", "l1,fid,kid")
    print(json.dumps(result, indent=1, sort_keys=True))
    # on real inputs, at the config's sampling level (0): below bicubic (noised further, the input says less)
    for key in ("learn-sr@0.0", "learn-sr-noaug@0.0"):
        assert result[key]["l1"] < result[key]["l1_baseline"], result[key]
    best = min(m["sr28/fid"] for k, m in result.items() if k.startswith("learn-sr@"))
    assert best < result["learn-sr-noaug@0.0"]["sr28/fid"], result
