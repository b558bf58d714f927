"""BigGAN: the paper's parts (spectral norm, hierarchical latents into conditional BN, projection
discriminator, orthogonal regularisation, truncation), its 128 px parameter counts, cross-replica
BatchNorm equal to one process holding the whole batch, and `kiln fit` / `sample` / `eval` end to
end on digits (2 DDP and FSDP2 ranks, whose cross-replica BatchNorm makes them train as one process:
tests/test_gan_distributed.py; the full Fashion-MNIST check: tests/test_biggan_learning.py)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from conftest import kiln, learn_on_digits, tiny_on_digits
from kiln.modules.biggan.lit_module import BigGANModule
from kiln.modules.biggan.networks import Generator, orthogonal_regularisation, truncated_normal
from kiln.modules.blocks.cross_replica_bn import CrossReplicaBatchNorm2d, convert_cross_replica
from kiln.modules.ema import attach
from kiln.trainers.commands.plan import plan

TINY = dict(num_classes=10, image_size=16, channels=1, ch_g=8, g_channel_mult=[4, 2, 1], g_attention=[8], dim_z=24,
            shared_dim=16, ch_d=8, d_channel_mult=[1, 2, 4], d_downsample=[True, True, False], d_attention=[8])


pytestmark = pytest.mark.usefixtures("one_thread")


def _module(**overrides) -> BigGANModule:
    torch.manual_seed(0)
    return BigGANModule(**{**TINY, **overrides})


def test_shapes_and_spectral_norm_everywhere_but_the_shared_embedding():
    module = _module()
    G, D = module.generator, module.discriminator
    z, y = torch.randn(5, 24), torch.arange(5)
    images = G(z, y)
    assert images.shape == (5, 1, 16, 16) and images.abs().max() <= 1
    assert D(images, y).shape == (5,)
    for net in (G, D):
        layers = [(n, m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]
        assert len(layers) > 10
        for name, m in layers:
            if name == "shared":
                assert not parametrize.is_parametrized(m)
            else:
                assert parametrize.is_parametrized(m, "weight"), name
                assert type(m.parametrizations.weight[0]).__name__ == "_SpectralNorm", name
    assert any(isinstance(m, nn.Module) and type(m).__name__ == "SelfAttention" for m in G.modules())


def test_hierarchical_latents_and_the_class_reach_every_block():
    module = _module().eval()
    G = module.generator
    z, y = torch.randn(2, 24), torch.tensor([3, 3])
    seen = []
    hooks = [b.bn1.gain.register_forward_hook(lambda m, i, o: seen.append(i[0])) for b in G.blocks]
    base = G(z, y)
    for h in hooks:
        h.remove()
    # each block's conditioning is [shared embedding of y, its own z chunk of dim_z / 3]
    assert [c.shape[1] for c in seen] == [16 + 8, 16 + 8]
    assert torch.equal(seen[0][:, 16:], z[:, 8:16]) and torch.equal(seen[1][:, 16:], z[:, 16:24])
    assert torch.equal(seen[0][:, :16], G.shared(y))
    for chunk in range(3):  # every chunk changes the image
        z2 = z.clone()
        z2[:, chunk * 8:(chunk + 1) * 8] += 1
        assert not torch.allclose(G(z2, y), base)
    assert not torch.allclose(G(z, torch.tensor([4, 4])), base)
    with pytest.raises(ValueError, match="dim_z 25 must split evenly into 3 hierarchical chunks"):
        Generator(10, 8, (4, 2, 1), 4, 25, 16, ())


def test_projection_discriminator_uses_the_class():
    module = _module().eval()
    D = module.discriminator
    x = torch.randn(4, 1, 16, 16)
    a, b = D(x, torch.tensor([0, 1, 2, 3])), D(x, torch.tensor([5, 5, 5, 5]))
    assert not torch.allclose(a, b)
    # logit = linear(h) + <embed(y), h>: the classes' logits differ by <embed(y1) - embed(y2), h>
    h = x
    for block, attention in zip(D.blocks, D.attention):
        h = attention(block(h))
    h = torch.relu(h).sum((2, 3))
    projected = (D.embed(torch.tensor([0, 1, 2, 3])) - D.embed(torch.tensor([5, 5, 5, 5]))) * h
    assert torch.allclose(a - b, projected.sum(1), atol=1e-4)


def test_orthogonal_regularisation_on_known_matrices():
    w = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # W W^T = [[1, 1], [1, 2]]: off-diagonal squares sum to 2
    assert orthogonal_regularisation([w], 1e-4).item() == pytest.approx(1e-4)  # beta / 2 * 2
    conv = w.view(2, 1, 1, 2)  # filters x fan-in, whatever the kernel layout
    assert orthogonal_regularisation([conv, 3 * torch.eye(3)], 0.5).item() == pytest.approx(0.5)
    # the norms of the filters are free: only their overlaps are penalised
    assert orthogonal_regularisation([torch.diag(torch.tensor([5.0, 0.1]))], 1.0).item() == 0.0
    module = _module()
    weights = [p for n, p in module.generator.named_parameters() if p.ndim >= 2 and not n.startswith("shared.")]
    assert module.generator_regulariser({}).item() == pytest.approx(orthogonal_regularisation(weights, 1e-4).item())


def _reference_ortho_gradient(w: torch.Tensor, strength: float) -> torch.Tensor:
    """What BigGAN-PyTorch's `utils.ortho` adds to a weight's gradient: strength * 2 (W W^T (.) (1 - I)) W."""
    flat = w.detach().flatten(1)
    off_diagonal = 1 - torch.eye(len(flat), dtype=flat.dtype)
    return (strength * 2 * ((flat @ flat.t()) * off_diagonal) @ flat).view_as(w)


def test_orthogonal_regularisation_gradient_is_the_reference_implementations():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    orthogonal_regularisation([w], 1e-4).backward()
    assert torch.allclose(w.grad, _reference_ortho_gradient(w, 1e-4), rtol=1e-10)
    # through the module: G's raw (pre-spectral-norm) weights, as the reference regularises them;
    # the shared embedding exempt
    module = _module().double()
    module.generator_regulariser({}).backward()
    raw = dict(module.generator.named_parameters())
    name = "blocks.0.conv1.parametrizations.weight.original"
    assert torch.allclose(raw[name].grad, _reference_ortho_gradient(raw[name], module.hparams.orth_reg), rtol=1e-10)
    assert raw["shared.weight"].grad is None


def test_truncation_bounds_and_seeds():
    g = torch.Generator().manual_seed(0)
    assert truncated_normal((20000,), 0.5, g).abs().max() <= 0.5
    assert truncated_normal((20000,), None, g).abs().max() > 3
    with pytest.raises(ValueError, match="truncation must be a positive"):
        truncated_normal((4,), 0.0, g)
    module = _module()
    z = module.latents([1, 2, 3], 0.7)
    assert z.abs().max() <= 0.7 and torch.equal(z[1], module.latents([2], 0.7)[0])
    module.hparams.truncation = 0.5  # a sampling setting (Spec.options): what `kiln sample --truncation` sets
    one = module.generate(num=2, seed=3, classes=[1, 7])
    assert one.shape == (4, 1, 16, 16) and torch.equal(one, module.generate(num=2, seed=3, classes=[1, 7]))
    module.hparams.truncation = 1.5
    assert not torch.equal(one, module.generate(num=2, seed=3, classes=[1, 7]))
    module.hparams.truncation = None
    images, labels = module.generate_for_eval([0, 1, 2, 13], seed=5)[""]
    alone, label = module.generate_for_eval([13], seed=5)[""]
    assert labels.tolist() == [0, 1, 2, 3] and label.tolist() == [3]
    assert torch.allclose(images[3], alone[0], atol=1e-6)
    with pytest.raises(ValueError, match="class 10 is outside"):
        module.generate(classes=[10])
    grid = module.sample_grid()
    grid, nrow, labels = grid.images, grid.per_row, grid.labels
    assert grid.shape == (80, 1, 16, 16) and nrow == 8  # 10 classes x grid_per_class
    assert labels == [f"class {c}" for c in range(10)]  # one label per row


def test_ema_averages_the_generator():
    module = _module()
    ema = attach(module, module.spec().ema_target)
    assert set(dict(ema.named_parameters())) == set(dict(module.generator.named_parameters()))


# BigGAN-PyTorch's bs256x8 config (docs/paper-sizes.md): G 70.43M, D 87.98M.
def test_paper_size():
    result = plan(["configs/biggan/paper-128.yaml"], nodes=1, gpus_per_node=8)
    assert result["components"]["generator"] == pytest.approx(70.43e6, rel=0.05)
    assert result["components"]["discriminator"] == pytest.approx(87.98e6, rel=0.05)
    assert result["parameters"] == pytest.approx(158.4e6, rel=0.05)


def _two_ranks(rank: int, world: int, init: str, x: torch.Tensor, w: torch.Tensor, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    from torch.distributed.nn.functional import all_reduce  # differentiable; training code passes its own

    bn = convert_cross_replica(nn.Sequential(nn.BatchNorm2d(3)), all_reduce)[0]
    assert isinstance(bn, CrossReplicaBatchNorm2d)
    share = x.chunk(world)[rank].clone().requires_grad_(True)
    (bn(share) * w.chunk(world)[rank]).sum().backward()
    running_var = bn.running_var.clone()
    torch.save({"y": bn(share.detach()).detach(), "grad": share.grad, "weight_grad": bn.weight.grad,
                "running_var": running_var}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_cross_replica_batchnorm_equals_one_process_with_the_whole_batch(tmp_path):
    torch.manual_seed(1)
    x, w = torch.randn(8, 3, 4, 4) * 2 + 1, torch.randn(8, 3, 4, 4)
    bn = nn.BatchNorm2d(3)
    whole = x.clone().requires_grad_(True)
    (bn(whole) * w).sum().backward()
    torch.multiprocessing.spawn(_two_ranks, args=(2, f"file://{tmp_path}/store", x, w, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.allclose(torch.cat([r["grad"] for r in ranks]), whole.grad, atol=1e-5)
    assert torch.allclose(ranks[0]["weight_grad"] + ranks[1]["weight_grad"], bn.weight.grad, atol=1e-4)
    assert torch.allclose(ranks[0]["running_var"], bn.running_var, atol=1e-5)
    # the second forward's statistics: again the whole batch's (outputs zero-mean over both ranks)
    y = torch.cat([r["y"] for r in ranks])
    assert y.mean((0, 2, 3)).abs().max() < 1e-5


def test_fit_sample_and_eval_from_the_tiny_config(digits, tmp_path):
    """configs/biggan/tiny.yaml with the digits shards as data (no Fashion-MNIST build in the suite)."""
    config = tmp_path / "digits.yaml"
    config.write_text(tiny_on_digits(digits, batch_size=32, steps=20))
    run = tmp_path / "run"
    r = kiln("fit", "-c", "configs/biggan/tiny.yaml", "-c", str(config), "--run_dir", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((run / "samples").glob("grid-step*.png"))
    ckpt = str(run / "checkpoints" / "last.ckpt")
    out = tmp_path / "samples"
    r = kiln("sample", "--ckpt", ckpt, "--class", "3", "--class", "7", "--num", "2", "--truncation", "0.5",
             "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.png")) == ["0000-3.png", "0001-3.png", "0002-7.png", "0003-7.png", "grid.png"]
    r = kiln("sample", "--ckpt", ckpt, "--prompt", "a shoe", "--out", str(out))
    assert r.returncode != 0 and "does not take --prompt (it takes: --class, --truncation)" in r.stderr, r.stderr
    m = tmp_path / "m.json"
    r = kiln("eval", "--ckpt", ckpt, "--extractor", "judge-digits", "--judge", "digits", "--num-samples", "100",
             "--truncation", "0.5", "--out", str(m))
    assert r.returncode == 0, r.stderr[-3000:]
    scores = json.loads(m.read_text())
    assert {"judge/accuracy", "judge/accuracy_untrained", "fid", "recall"} <= set(scores)
    assert scores["sampling/truncation"] == 0.5


LEARN_MODEL = """\
model:
  class_path: kiln.modules.biggan.lit_module.BigGANModule
  init_args:
    num_classes: 10
    image_size: 8
    channels: 1
    ch_g: 16
    g_channel_mult: [4, 2, 1]
    dim_z: 48
    shared_dim: 32
    ch_d: 16
    d_channel_mult: [1, 2, 4]
    d_downsample: [true, false, false]
    truncation: 1.0
    lr_g: 1.0e-3
    lr_d: 1.0e-3
    d_steps: 1
"""


@pytest.mark.slow
def test_short_run_on_digits_draws_the_asked_class(digits, tmp_path):
    """The in-suite learning check: 400 steps (under two minutes) on the 1,497 training digits, then
    the digits judge's accuracy on EMA-G samples at truncation 1.0, far above chance (10%), and FID
    on the judge's features far below the untrained generator's."""
    config = tmp_path / "biggan-digits.yaml"
    config.write_text(learn_on_digits(LEARN_MODEL, digits, image_size=8, batch_size=64, steps=400, ema_decay=0.99))
    run = tmp_path / "run"
    r = kiln("fit", "-c", str(config), "--run_dir", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    m = tmp_path / "m.json"
    r = kiln("eval", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--extractor", "judge-digits", "--judge", "digits",
             "--metrics", "judge,fid", "--num-samples", "300", "--out", str(m))
    assert r.returncode == 0, r.stderr[-3000:]
    scores = json.loads(m.read_text())
    print(json.dumps(scores, indent=1, sort_keys=True))
    assert scores["judge/accuracy"] >= 0.8 and scores["judge/accuracy_untrained"] <= 0.25, scores  # seen: 1.0, 0.1
    assert scores["fid"] < scores["fid_untrained"] / 5, scores  # seen: 4.4 vs 281
