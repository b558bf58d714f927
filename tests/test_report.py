"""`kiln report` on a real run directory, opened in headless Chromium: every image is inlined and
loads, offline."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from conftest import kiln
from kiln.trainers.callbacks.samples import save_grid

CHECK = """<script>window.addEventListener('load', () => {
  document.body.dataset.images = JSON.stringify([...document.images].map(
    i => ({alt: i.alt, src: i.src.slice(0, 5), complete: i.complete, width: i.naturalWidth})));
});</script>"""


class _Body(HTMLParser):
    images = None

    def handle_starttag(self, tag, attrs):
        if tag == "body" and dict(attrs).get("data-images"):
            self.images = json.loads(dict(attrs)["data-images"])


def chromium_images(page: Path, tmp: Path) -> list[dict]:
    """Open `page` in headless Chromium with no network and return what each <img> loaded."""
    binary = shutil.which("chromium")
    if binary is None:
        pytest.skip("Debian chromium is not installed (.ci/install installs it)")
    argv = [binary, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp}/profile",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-default-apps", "--disable-breakpad", "--host-resolver-rules=MAP * ~NOTFOUND",
            "--log-level=3", "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()]
    dom = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp)},
                         check=True).stdout
    parser = _Body()
    parser.feed(dom)
    assert parser.images is not None, dom[-2000:]
    return parser.images


def test_report_of_a_real_run_renders_offline(emoji_shards, tmp_path):
    run = tmp_path / "run"
    r = kiln("fit", "-c", "configs/clip/tiny.yaml", "--data.init_args.root", emoji_shards,
             "--data.init_args.build_size", "32", "--data.init_args.batch_size", "32", "--trainer.max_steps", "8",
             "--trainer.val_check_interval", "4", "--trainer.log_every_n_steps", "1", "--run_dir", str(run),
             "--wandb.mode", "disabled")
    assert r.returncode == 0, r.stderr[-2000:]
    # A family's grids at two steps (CLIP draws none): the layout kiln's SampleGrid writes.
    for step in (4, 8):
        save_grid(torch.rand(16, 3, 16, 16) * 2 - 1, str(run / "samples" / f"grid-step{step:07d}.png"))
    out = tmp_path / "report.html"
    r = kiln("report", str(run), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    page = tmp_path / "check.html"
    page.write_text(out.read_text().replace("</body>", CHECK + "</body>"))
    images = chromium_images(page, tmp_path)
    alts = [i["alt"] for i in images]
    assert {"train/loss", "val/retrieval/top1", "grid step 4", "grid step 8"} <= set(alts), alts
    assert all(i["src"] == "data:" and i["complete"] and i["width"] > 0 for i in images), images
    # The first screen: the latest grid, then training and evaluation curves; the series that
    # never move (data/skipped/* at 0, the world size logged once) are table rows, not plots.
    leading = [a for a in alts[1:] if a.split("/", 1)[0] in ("train", "val", "eval")]
    assert alts[0] == "grid step 8 (latest)" and alts[1:1 + len(leading)] == leading and "train/loss" in leading, alts
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    flat = {k for k in {k for row in metrics for k in row} - {"step", "epoch"}
            if len({row[k] for row in metrics if k in row}) == 1}
    assert flat and not flat & set(alts), (flat, alts)
    page_text = out.read_text()
    assert all(f"<td>{name}</td>" in page_text for name in flat)


def test_report_of_a_directory_that_is_not_a_run(tmp_path):
    r = kiln("report", str(tmp_path), "--out", str(tmp_path / "r.html"))
    assert r.returncode != 0
    assert "is not a kiln run directory" in r.stderr
