"""GAN resume equality: a `kiln fit` SIGKILLed after step K and resumed from its `last.ckpt` ends,
at step N, bit for bit where one uninterrupted N-step fit ends: G, D, EMA-G, every buffer (ADA's
p and running sums, StyleGAN's path-length mean and w_avg, BigGAN's BatchNorm statistics and
spectral-norm vectors) and both optimisers' state.

Bitwise, not within a tolerance: both runs execute the same operations in the same order on the
same inputs in one process, so any difference is state the checkpoint failed to carry (weights,
optimiser moments, RNG, data position, ADA's sums) rather than rounding.

The phase intervals are chosen so that the resumed half runs every phase: ADA adjusts every 2
iterations (its sums are mid-count at the kill), R1 every 2, path length every 3 (first due at the
first resumed iteration)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import REPO, digits_data, ema_and_checkpoints, kiln, read_metrics, write_digits

K, N = 3, 6  # killed after step K, runs go to N

FAMILIES = {
    # ADA on and moving (p starts at 0.2 and follows r_t either way), every phase lazy and due
    # in both halves of the run.
    "stylegan": ("configs/stylegan/tiny.yaml", """\
model:
  init_args: {augment_p: 0.2, ada_target: 0.0, ada_interval: 2, ada_kimg: 1, d_reg_interval: 2, g_reg_interval: 3}
"""),
    # Two D steps per iteration, each on half the batch.
    "biggan": ("configs/biggan/tiny.yaml", "model:\n  init_args: {d_steps: 2}\n"),
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory, size=16, shard_size=32, limit=256)


def _config(model: str, digits: Path, kill: bool) -> str:
    return model + digits_data(digits, image_size=16, batch_size=8, val=False) + f"""\
trainer:
  max_steps: {N}
  log_every_n_steps: 1
  enable_progress_bar: false
""" + ema_and_checkpoints(every=K, kill_at=K if kill else None)


def _fit(family: str, digits: Path, run: Path, kill: bool, *extra: str):
    config, model = FAMILIES[family]
    path = run.parent / f"{run.name}{'-kill' if kill else ''}.yaml"
    path.write_text(_config(model, digits, kill))
    return kiln("fit", "-c", config, "-c", str(path), "--run_dir", str(run), *extra, env={"PYTHONPATH": str(REPO)})


def _assert_identical(a: dict, b: dict, path: str = "") -> None:
    """Every tensor equal bit for bit, every other value equal, through nested dicts and lists."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path}: max difference {(a.double() - b.double()).abs().max().item():.3e}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), (path, set(a) ^ set(b))
        for k in a:
            _assert_identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_killed_and_resumed_gan_equals_uninterrupted(family, digits, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    r = _fit(family, digits, full, False)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _fit(family, digits, resumed, True)
    assert r.returncode != 0  # SIGKILLed at the start of step K + 1
    at_kill = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert at_kill["global_step"] == K
    r = _fit(family, digits, resumed, False, "--ckpt_path", str(resumed / "checkpoints" / "last.ckpt"))
    assert r.returncode == 0, r.stderr[-3000:]

    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == N
    weights = a["state_dict"]
    assert {k.split(".")[0] for k in weights} >= {"model", "ema"}
    assert any(k.startswith("model.generator.") for k in weights) and any(k.startswith("model.discriminator.") for k in weights)
    _assert_identical(weights, b["state_dict"], "state_dict")
    g, d = a["optimizer_states"]
    assert g["state"] and d["state"]
    assert all(s["step"] > K for s in (*g["state"].values(), *d["state"].values()))  # both stepped after the kill
    _assert_identical(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    # The last step's losses, logged by the resumed process, match too.
    last = lambda run: {k: v for r in read_metrics(run) if r.get("step") == N - 1 for k, v in r.items()}  # noqa: E731
    assert last(full)["train/Gmain/loss"] == last(resumed)["train/Gmain/loss"]

    if family == "stylegan":
        kill_state = at_kill["state_dict"]
        assert kill_state["augment.signs"][1] > 0  # ADA's sums were mid-count when the process died
        assert weights["augment.p"] != 0.2 and weights["pl_mean"] > 0  # and p and the path-length mean moved
        assert not torch.equal(weights["ema.blocks.0.conv1.weight"], weights["model.generator.blocks.0.conv1.weight"])
