"""`kiln plan`: paper-size configs built on the meta device give the papers' parameter counts,
and the memory model and FLOP count hold up against direct computations."""
from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import kiln
from kiln.modules.blocks.tokenizer import EOT
from kiln.trainers.commands.plan import GIB, measure, plan

# docs/paper-sizes.md (open_clip's model profile).
PAPER = {"vit-b-32": (151.28e6, {"image": 87.85e6, "text": 63.43e6}), "vit-b-16": (149.62e6, {}),
         "vit-l-14": (427.62e6, {"image": 303.97e6, "text": 123.65e6})}


def test_plan_json_on_the_command_line():
    r = kiln("plan", "-c", "configs/clip/vit-b-32.yaml", "--nodes", "2", "--gpus-per-node", "8", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    assert result["parameters"] == pytest.approx(151.28e6, rel=0.05)
    assert result["global_batch"] == 16 * result["micro_batch"]
    assert set(result["memory_per_gpu_gb"]) == {"ddp", "zero2", "zero3", "fsdp"} and result["fits"]["fsdp"]
    assert result["memory_per_gpu_gb"]["fsdp"] == pytest.approx(result["memory_per_gpu"]["fsdp"]["total"] / 1e9, abs=1e-3)


def test_plan_reads_a_config_as_kiln_fit_does():
    """`-c` composition and `--key value` overrides through kiln fit's own jsonargparse parser: an
    override changes the plan, and a key the model does not have is refused in one line."""
    base = json.loads(kiln("plan", "-c", "configs/clip/tiny.yaml", "-c", "configs/trainer/fsdp.yaml", "--json").stdout)
    r = kiln("plan", "-c", "configs/clip/tiny.yaml", "-c", "configs/trainer/fsdp.yaml", "--json",
             "--model.init_args.embed_dim", "32", "--data.init_args.batch_size", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    smaller = json.loads(r.stdout)
    assert base["strategy"] == smaller["strategy"] == "fsdp" and smaller["micro_batch"] == 8
    assert smaller["parameters"] < base["parameters"]
    r = kiln("plan", "-c", "configs/clip/tiny.yaml", "--model.init_args.embed_dims", "32")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "kiln plan: error: unknown option 'embed_dims' of kiln.modules.clip.lit_module.CLIPModule"]


@pytest.mark.parametrize("config", list(PAPER))
def test_paper_sizes(config):
    result = plan([f"configs/clip/{config}.yaml"], nodes=1, gpus_per_node=8)
    total, parts = PAPER[config]
    assert result["parameters"] == pytest.approx(total, rel=0.05)
    for name, count in parts.items():
        assert result["components"][name] == pytest.approx(count, rel=0.05)


def test_memory_model():
    r = plan(["configs/clip/vit-b-32.yaml"], nodes=2, gpus_per_node=4, micro_batch=32)
    p, unit, m = r["parameters"], r["largest_shard_unit"], r["memory_per_gpu"]
    # One ViT-B block: q, k, v and out projections with biases, the MLP, two LayerNorms.
    assert unit == 4 * 768 * 768 + 4 * 768 + 2 * 768 * 3072 + 3072 + 768 + 2 * 2 * 768
    assert m["ddp"]["parameters"] == 4 * p and m["ddp"]["optimizer"] == 8 * p
    assert m["zero2"]["parameters"] == 4 * p and m["zero2"]["gradients"] == 4 * p / 8
    # FSDP2: this rank's shard, plus the gathered largest unit (four buffers: tests/test_plan_measured.py)
    assert m["fsdp"]["parameters"] == pytest.approx(4 * p / 8) and m["fsdp"]["gathered"] >= 16 * unit
    assert m["fsdp"]["total"] < m["zero2"]["total"] < m["ddp"]["total"]
    assert m["ddp"]["activations"] == r["activation_bytes_per_sample"] * 32 > 0.01 * GIB


def test_meta_flops_equal_real_flops():
    """The meta-device count is the one a real forward + backward gives, on a small CLIP. (The
    real pass runs attention as plain matmuls: the counter has no formula for the CPU flash
    kernel and would miss attention's FLOPs, about 8% of this model's.)"""
    import lightning as L
    import yaml

    from kiln.trainers.checkpoints.checkpoint import _instantiate

    section = yaml.safe_load(open("configs/clip/tiny.yaml"))["model"]
    with torch.device("meta"):
        meta = measure(_instantiate(section, L.LightningModule), 4)
    module = _instantiate(section, L.LightningModule)
    images, tokens = module.plan_inputs(4)
    tokens[:, -1] = EOT  # full-length captions, as the plan assumes
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        image, text, scale = module.model(images, tokens)
        (image.sum() + text.sum() + scale).backward()
    assert meta["flops_per_sample"] == counter.get_total_flops() / 4
