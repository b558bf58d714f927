"""GLIDE's full learning check (issue #6), not in CI: `python3 -m pytest -m learning -s tests/test_glide_learning.py`.

Base: `configs/glide/learn.yaml` (Fashion-MNIST, captions "a photo of a <class>", at most 15 minutes
of training on 2 CPU cores), then `kiln eval`: the Fashion-MNIST judge's accuracy on guided samples
of each class prompt at guidance scales 1, 3 and 5 (20 steps of the stochastic DPM-Solver++(2M)),
FID/KID (EfficientNet-Lite0 features) against the untrained model, and 20-step samplers (that one,
the ODE DPM-Solver++(2M), DDIM) against 250-step ancestral sampling.
Upsampler: `configs/glide/learn-upsampler.yaml` (14 -> 28 px), judged against bicubic upsampling.
The figures are printed as JSON and kept in RESULTS.md.
"""
from __future__ import annotations

import json

import pytest

from conftest import kiln, kiln_eval

pytestmark = pytest.mark.learning


def test_base_draws_the_class_its_prompt_names(tmp_path):
    run = tmp_path / "base"
    r = kiln("fit", "-c", "configs/glide/learn.yaml", "--run_dir", str(run), "--wandb.mode", "disabled", timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = str(run / "checkpoints" / "last.ckpt")
    # The config's sampler (20 steps of the stochastic DPM-Solver++(2M)) at guidance 1, 3 and 5 (the config's).
    judged = ("--num-samples", "500")  # the judge follows from the data: fashion-mnist
    by_scale = {}
    for scale in (1, 3, 5):
        extra = () if scale == 5 else ("--no-untrained", "--metrics", "judge")
        by_scale[scale] = kiln_eval(ckpt, tmp_path / f"scale{scale}.json", *judged, "--guidance-scale", str(scale), *extra)
    samplers = {f"{name}-{steps}": kiln_eval(ckpt, tmp_path / f"{name}.json", "--num-samples", "200", "--metrics", "judge",
                                             "--no-untrained",
                                             "--sampler", name, "--steps", str(steps), "--guidance-scale", "5")
                for name, steps in (("dpmpp_2m_sde", 20), ("dpmpp_2m", 20), ("ddim", 20), ("ddpm", 250))}
    m = by_scale[5]
    print(json.dumps({"by_scale": by_scale, "samplers": samplers}, indent=1, sort_keys=True))
    assert m["judge"] == "fashion-mnist" and m["judge/accuracy"] >= 0.85, m
    assert m["fid"] * 3 <= m["fid_untrained"] and m["kid"] * 3 <= m["kid_untrained"], m
    fast, slow = samplers["dpmpp_2m_sde-20"]["judge/accuracy"], samplers["ddpm-250"]["judge/accuracy"]
    assert fast >= slow - 0.05, samplers


def test_upsampler_beats_bicubic(tmp_path):
    run = tmp_path / "upsampler"
    r = kiln("fit", "-c", "configs/glide/learn-upsampler.yaml", "--run_dir", str(run), "--wandb.mode", "disabled",
             timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = kiln_eval(str(run / "checkpoints" / "last.ckpt"), tmp_path / "sr.json", "--num-samples", "500", "--no-untrained")
    print(json.dumps(m, indent=1, sort_keys=True))
    assert m["l1"] < m["l1_baseline"] and m["fid"] < m["fid_baseline"], m
