"""What a newcomer sees. `kiln fit` outside a terminal (a SLURM log, a pipe) prints a line with the
step of max_steps, the loss, steps/s and the time left; on a terminal the rich bar counts steps of
max_steps too, not "Epoch 0/-2". Neither shows the messages that ask nothing of the user, and
`kiln eval` / `kiln sample` say what they are doing while they generate."""
from __future__ import annotations

import json
import re

import pytest

from conftest import kiln, tiny_on_digits

# Each message as the user saw it before kiln kept it quiet.
NOT_SHOWN = {
    "srun hint": "The `srun` command is available",
    "litlogger tip": "litlogger",
    "val_dataloader without validation_step": "but have no `validation_step`",
    "validation_step without val_dataloader": "but have no `val_dataloader`",
    "W&B anonymous mode": "anonymous",
    "FLOPs that are not counted": "FLOPs",
    "Lightning's torch deprecation": "LeafSpec",
    "negative epoch count": "Epoch 0/-2",
}
CLIP = ["-c", "configs/clip/tiny.yaml", "--data.init_args.batch_size", "32", "--data.init_args.build_size", "32",
        "--trainer.limit_val_batches", "0"]


def _noise(output: str) -> list[str]:
    return [name for name, text in NOT_SHOWN.items() if text in output]


def _fit(family: str, run, emoji_shards, digits, *extra: str, env: dict | None = None):
    if family == "clip":
        args = [*CLIP, "--data.init_args.root", emoji_shards, "--trainer.max_steps", "3"]
    else:  # a GAN: judged by callback, so held-out data and no validation_step
        config = run.parent / f"{run.name}.yaml"
        config.write_text(tiny_on_digits(digits, batch_size=16, steps=3))
        args = ["-c", f"configs/{family}/tiny.yaml", "-c", str(config), "--trainer.enable_progress_bar", "true"]
    # W&B on (offline), as a user has it: its warnings are part of what they see.
    return kiln("fit", *args, "--wandb.mode", "offline", "--run_dir", str(run), *extra, env=env)


@pytest.fixture(scope="module")
def stylegan_run(tmp_path_factory, emoji_shards, digits):
    run = tmp_path_factory.mktemp("stylegan") / "run"
    return _fit("stylegan", run, emoji_shards, digits), run


@pytest.mark.parametrize("family", ["clip", "stylegan"])
def test_fit_outside_a_terminal_prints_step_lines_and_no_noise(family, emoji_shards, digits, stylegan_run, tmp_path):
    r, _ = stylegan_run if family == "stylegan" else (_fit(family, tmp_path / "run", emoji_shards, digits), None)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("step ")]
    assert lines and lines[0].startswith("step 1/3 · "), r.stdout
    last = lines[-1]
    assert last.startswith("step 3/3 · ") and re.search(r" · [\d.]+ steps/s · \d+:\d\d:\d\d elapsed · 0:00:00 left$", last), last
    assert re.search(r"loss [-\d.e]+", last), last
    assert "Total params" in r.stdout  # the model summary is still there, without its FLOPs
    assert _noise(r.stdout + r.stderr) == [], r.stdout + r.stderr


def test_fit_on_a_terminal_counts_steps_and_max_time(emoji_shards, tmp_path):
    """Rich draws its live bar where the console says it is a terminal (TTY_COMPATIBLE)."""
    r = kiln("fit", *CLIP, "--data.init_args.root", emoji_shards, "--trainer.max_steps", "3", "--trainer.max_time",
             "00:00:10:00", "--wandb.mode", "disabled", "--run_dir", str(tmp_path / "run"),
             env={"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr[-3000:]
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", r.stdout)
    assert re.search(r"step · max_time \d+:\d\d:\d\d elapsed, 0:09:\d\d left .*3/3", shown), shown[-2000:]
    assert not [line for line in shown.splitlines() if line.startswith("step 3/3 · ")]  # no plain lines here
    assert _noise(shown + r.stderr) == [], shown + r.stderr


def test_eval_and_sample_report_progress_on_stderr(stylegan_run, tmp_path):
    r, run = stylegan_run
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = str(run / "checkpoints" / "last.ckpt")
    out = tmp_path / "m.json"
    r = kiln("eval", "--ckpt", ckpt, "--metrics", "fid", "--num-samples", "200",
             "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    for model in (1, 2):  # the checkpoint, then the untrained baseline; 100 samples a batch
        assert f"kiln eval: generating (model {model} of 2): 0/2\n" in r.stderr, r.stderr
        assert re.search(rf"kiln eval: generating \(model {model} of 2\): 2/2 · \d+:\d\d:\d\d elapsed\n", r.stderr)
    assert "kiln eval:" not in r.stdout  # stdout keeps the result
    assert json.loads(r.stdout.splitlines()[-1])["fid"] == json.loads(out.read_text())["fid"]

    r = kiln("sample", "--ckpt", ckpt, "--num", "3", "--out", str(tmp_path / "samples"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kiln sample: generating 3 images ...\n" in r.stderr
    assert re.search(r"kiln sample: generating 3 images: done in \d+:\d\d:\d\d\n", r.stderr), r.stderr


def test_time_left_never_reads_negative():
    """max_time stops a run after the step that crossed it: the last line read '-1 day, 23:59:57 left'."""
    from kiln.trainers.callbacks.progress import _clock

    assert _clock(-3.2) == "0:00:00" and _clock(75) == "0:01:15"
