"""Strategies on 2 CPU processes (gloo): DDP, FSDP2 and DeepSpeed ZeRO-3 each train, shard,
checkpoint, get killed and resume to the same weights as an uninterrupted run; checkpoints move
between strategies and world sizes where that is possible and are refused clearly where not."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from conftest import EMA_CALLBACK, REPO, kiln, read_metrics, small_clip_config
from kiln.trainers.checkpoints.checkpoint import CheckpointError
from kiln.trainers.checkpoints.sharded import consolidate, consolidate_dcp

N = 3  # steps before the kill; the runs go to 2N
STRATEGIES = {"ddp": "configs/trainer/ddp.yaml", "fsdp": "configs/trainer/fsdp.yaml", "zero3": "configs/trainer/zero3.yaml"}
# Sharded and replicated runs add the same gradients in a different order (reduce-scatter vs
# all-reduce buckets): float32 sums agree to about 1e-6 after 2N steps, not bit for bit.
ACROSS_STRATEGIES_ATOL = 5e-5


def _fit(config: Path, strategy: str, run: Path, *extra: str):
    return kiln("fit", "-c", "configs/clip/tiny.yaml", "-c", STRATEGIES.get(strategy, strategy), "-c", str(config),
                "--run_dir", str(run), *extra, env={"PYTHONPATH": str(REPO)})


def _kill_at(tmp_path: Path, step: int) -> Path:
    path = tmp_path / "kill.yaml"
    path.write_text(f"trainer:\n  callbacks:\n{EMA_CALLBACK}    - class_path: tests.killer.KillAt\n"
                    f"      init_args: {{step: {step}}}\n")
    return path


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = consolidate(str(run / "checkpoints" / "last.ckpt"))
    return ckpt["state_dict"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, emoji_shards):
    """For each strategy: an uninterrupted 2N-step run, and one SIGKILLed after step N and resumed."""
    tmp = tmp_path_factory.mktemp("strategies")
    config = small_clip_config(tmp / "small.yaml", emoji_shards, steps=2 * N, every=N)
    kill = _kill_at(tmp, N)
    out = {}
    for name in STRATEGIES:
        full, resumed = tmp / f"{name}-full", tmp / f"{name}-resumed"
        r = _fit(config, name, full)
        assert r.returncode == 0, r.stderr[-3000:]
        r = _fit(config, name, resumed, "-c", str(kill))
        assert r.returncode != 0  # killed
        step = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
        assert step == N
        shutil.copytree(resumed / "checkpoints", tmp / f"{name}-at-n")  # kept for the moves below
        r = _fit(config, name, resumed, "--ckpt_path", str(resumed / "checkpoints" / "last.ckpt"))
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = (full, resumed)
    single = tmp / "single"
    r = _fit(config, "configs/trainer/cpu.yaml", single, "--trainer.devices", "1", "--data.init_args.batch_size", "32")
    assert r.returncode == 0, r.stderr[-3000:]
    out["single"] = (single, None)
    return tmp, config, out


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_kill_and_resume_matches_uninterrupted_run(runs, strategy):
    _, _, out = runs
    full, resumed = out[strategy]
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2 * N
    # Same data order, same RNG, same optimizer and scheduler state: the same weights, bit for bit.
    assert _max_diff(_weights(full), _weights(resumed)) == 0.0
    losses = lambda run: {r["step"]: r["train/loss"] for r in read_metrics(run) if "train/loss" in r}  # noqa: E731
    assert losses(full)[2 * N - 1] == losses(resumed)[2 * N - 1]


def test_strategies_agree_with_gradient_clipping(runs):
    """DDP, FSDP2 and ZeRO-3 reach the same weights with clipping on (a global norm over the
    shards, not a per-rank one: a per-shard norm would clip differently and drift apart)."""
    _, _, out = runs
    ddp = _weights(out["ddp"][0])
    for name in ("fsdp", "zero3"):
        assert _max_diff(ddp, _weights(out[name][0])) < ACROSS_STRATEGIES_ATOL, name


def test_ema_under_sharding_equals_one_process(runs):
    """The EMA each rank keeps of its shard (FSDP2, ZeRO-3) or of the whole model (DDP), gathered,
    is the EMA one process computes over the same global batches; and it is not the live weights."""
    _, _, out = runs
    single = {k: v for k, v in _weights(out["single"][0]).items() if k.startswith("ema.")}
    assert len(single) == 62
    for name in STRATEGIES:
        weights = _weights(out[name][0])
        assert _max_diff(single, {k: weights[k] for k in single}) < ACROSS_STRATEGIES_ATOL, name
        live = {k.replace("ema.", "model.", 1): v for k, v in single.items()}
        assert _max_diff(live, {k: weights[k] for k in live}) > 1e-4  # it lags the live weights


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharded_strategies_store_about_one_half_per_rank(runs, strategy):
    _, _, out = runs
    [row] = [r for r in read_metrics(out[strategy][0]) if "dist/params_total" in r]
    assert row["dist/world_size"] == 2
    share = row["dist/params_local_max"] / row["dist/params_total"]
    assert 0.5 <= share < 0.55, share  # 1/world, plus padding of odd-sized shards
    [row] = [r for r in read_metrics(out["ddp"][0]) if "dist/params_total" in r]
    assert row["dist/params_local_max"] == row["dist/params_total"]


def test_checkpoints_move_between_strategies_and_world_sizes(runs, tmp_path):
    """FSDP2's DCP reshards to 1 rank and gathers for DDP; DDP's single file shards for FSDP2.
    Each continuation matches the uninterrupted run to the cross-strategy tolerance."""
    tmp, config, out = runs
    target = _weights(out["ddp"][0])
    cases = {
        "fsdp-2-to-1": ("fsdp", tmp / "fsdp-at-n", ["--trainer.devices", "1", "--data.init_args.batch_size", "32"]),
        "fsdp-to-ddp": ("ddp", tmp / "fsdp-at-n", []),
        "ddp-to-fsdp": ("fsdp", tmp / "ddp-at-n", []),
    }
    for name, (strategy, ckpt, extra) in cases.items():
        run = tmp_path / name
        r = _fit(config, strategy, run, "--ckpt_path", str(ckpt / "last.ckpt"), *extra)
        assert r.returncode == 0, (name, r.stderr[-3000:])
        if name != "fsdp-2-to-1":  # a new world size starts a new data epoch (other samples)
            assert _max_diff(target, _weights(run)) < ACROSS_STRATEGIES_ATOL, name
        else:
            assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2 * N


def test_deepspeed_refuses_other_checkpoints(runs, tmp_path):
    tmp, config, out = runs
    r = _fit(config, "zero3", tmp_path / "z", "--ckpt_path", str(out["fsdp"][0] / "checkpoints" / "last.ckpt"))
    assert r.returncode != 0
    assert "is an FSDP2 (DCP) checkpoint sharded over 2 ranks; DeepSpeed resumes only its own" in r.stderr
    r = _fit(config, "ddp", tmp_path / "d", "--ckpt_path", str(out["zero3"][0] / "checkpoints" / "last.ckpt"))
    assert r.returncode != 0
    assert "is a DeepSpeed ZeRO checkpoint sharded over 2 ranks; resume it with the same strategy" in r.stderr


class _Exploit:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('ran')",))


def test_tampered_sharded_checkpoints_are_refused(runs, tmp_path):
    """Pickled code in a DCP `.metadata` or a DeepSpeed shard is refused; the code never runs."""
    import shutil

    _, config, out = runs
    for name, victim in (("fsdp", ".metadata"), ("zero3", "checkpoint/zero_pp_rank_0_mp_rank_00_model_states.pt")):
        copy = tmp_path / name
        shutil.copytree(out[name][0] / "checkpoints", copy)
        [shard_dir] = list((copy / "last.ckpt.shards").iterdir())
        (shard_dir / victim).write_bytes(pickle.dumps({"x": _Exploit()}))
        r = _fit(config, name, tmp_path / f"{name}-run", "--ckpt_path", str(copy / "last.ckpt"))
        assert r.returncode != 0
        assert "refusing to load" in r.stderr, r.stderr[-2000:]
        assert not (REPO / "PWNED").exists() and not (tmp_path / "PWNED").exists()
        with pytest.raises(CheckpointError, match="refusing to load"):
            consolidate(str(copy / "last.ckpt"))


def test_sharded_checkpoints_on_s3(runs, s3_bucket, tmp_path):
    """FSDP2 and ZeRO-3 write their shards and pointer straight to object storage; a run killed
    there resumes from there to the same weights as the local uninterrupted run."""
    _, config, out = runs
    run = f"{s3_bucket}/fsdp"
    r = _fit(config, "fsdp", run, "-c", str(_kill_at(tmp_path, N)))
    assert r.returncode != 0
    r = _fit(config, "fsdp", run, "--ckpt_path", f"{run}/checkpoints/last.ckpt")
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = consolidate(f"{run}/checkpoints/last.ckpt")
    assert resumed["global_step"] == 2 * N
    assert _max_diff(_weights(out["fsdp"][0]), resumed["state_dict"]) == 0.0

    run = f"{s3_bucket}/zero3"
    r = _fit(config, "zero3", run, "-c", str(_kill_at(tmp_path, N)))
    assert r.returncode != 0
    local = consolidate(str(out["zero3"][0].parent / "zero3-at-n" / "last.ckpt"))["state_dict"]
    assert _max_diff(local, consolidate(f"{run}/checkpoints/last.ckpt")["state_dict"]) == 0.0


def test_interrupted_save_leaves_last_loadable(runs, tmp_path):
    """What a crash mid-save leaves behind: a newer shard directory without DCP's `.metadata`
    (ranks still writing) and a temporary pointer never moved into place. `last.ckpt` still names
    the previous complete shards, so resuming from it works, and the next save removes the
    unfinished shards."""
    tmp, config, out = runs
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(tmp / "fsdp-at-n", ckpts)
    [complete] = list((ckpts / "last.ckpt.shards").iterdir())
    partial = ckpts / "last.ckpt.shards" / "000000004-deadbeef"
    shutil.copytree(complete, partial)
    (partial / ".metadata").unlink()
    (ckpts / "last.ckpt.tmp-4242").write_bytes(b"\x80\x02half a pointer")
    with pytest.raises(CheckpointError, match="incomplete sharded checkpoint"):
        consolidate_dcp(str(partial))
    r = _fit(config, "fsdp", tmp_path, "--ckpt_path", str(ckpts / "last.ckpt"))  # the same run directory
    assert r.returncode == 0, r.stderr[-3000:]
    assert _max_diff(_weights(out["fsdp"][0]), _weights(tmp_path)) == 0.0
    assert [p.name for p in (ckpts / "last.ckpt.shards").iterdir()] != [partial.name]
    assert not partial.exists() and not complete.exists()  # replaced by the new step's shards


def test_world_size_that_does_not_divide_the_batch(runs, tmp_path):
    _, config, _ = runs
    r = _fit(config, "fsdp", tmp_path / "run", "--data.init_args.global_batch_size", "15")
    assert r.returncode != 0
    errors = {line for line in r.stderr.splitlines() if line.startswith("kiln fit: error:")}
    assert errors == {"kiln fit: error: data.global_batch_size 15 does not split evenly over 2 rank(s) x 1 "
                      "accumulation step(s)"}, r.stderr[-2000:]
