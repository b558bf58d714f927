"""The quickstart's picture, judged (issue #24), not in CI: `python3 -m pytest -m learning -s
tests/test_quickstart_learning.py`.

The README's first command (`kiln fit -c configs/glide/quickstart.yaml`, at most 10 minutes on 2 CPU
cores) is trained as a newcomer runs it; a kiln CLIP trained by the CLIP learn recipe
(`configs/clip/learn.yaml`) then reads the quickstart's grid -- the grid's prompts, the grid's
noise, EMA weights -- and for each sample ranks the grid's prompts. The bar: the right prompt
first for at least half of the samples (chance: 1 in the number of prompts, 6).
"""
from __future__ import annotations

import json
import time

import pytest

from conftest import kiln

pytestmark = pytest.mark.learning


def rank_quickstart(glide_ckpt: str, clip_ckpt: str) -> dict:
    """What the CLIP reads in the quickstart's grid: the share of samples whose own prompt ranks
    first among the grid's prompts, overall and per prompt."""
    from kiln.modules.eval.metrics import prompt_ranking
    from kiln.trainers.checkpoints.checkpoint import build_from_checkpoint, load_checkpoint

    glide, _ = build_from_checkpoint(load_checkpoint(glide_ckpt))
    clip, _ = build_from_checkpoint(load_checkpoint(clip_ckpt))
    grid = glide.eval().sample_grid()
    images, per, prompts = grid.images, grid.per_row, grid.labels
    clip.eval()
    targets = [i for i in range(len(prompts)) for _ in range(per)]
    result = {"prompt_rank/top1": prompt_ranking(clip, images, targets, prompts), "prompts": len(prompts)}
    for i, prompt in enumerate(prompts):
        result[f"prompt_rank/{prompt}"] = prompt_ranking(clip, images[i * per:(i + 1) * per], [i] * per, prompts)
    return result


def test_quickstart_draws_its_prompts(tmp_path):
    quick, clip = tmp_path / "quickstart", tmp_path / "clip"
    start = time.monotonic()
    r = kiln("fit", "-c", "configs/glide/quickstart.yaml", "--run_dir", str(quick), "--wandb.mode", "disabled", timeout=3600)
    seconds = time.monotonic() - start
    assert r.returncode == 0, r.stderr[-3000:]
    print("first lines a newcomer sees:", *r.stdout.splitlines()[:15], "(stderr)", *r.stderr.splitlines()[:5], sep="\n")
    r = kiln("fit", "-c", "configs/clip/learn.yaml", "--run_dir", str(clip), "--wandb.mode", "disabled", timeout=3600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = rank_quickstart(str(quick / "checkpoints" / "last.ckpt"), str(clip / "checkpoints" / "last.ckpt"))
    result["quickstart_seconds"] = round(seconds)
    print(json.dumps(result, indent=2))
    assert result["prompt_rank/top1"] >= 0.5, result
