"""FID/KID against a direct computation (numpy + scipy.linalg.sqrtm) on the same features, 2-rank
evaluation against 1-rank, and the offline feature networks."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.multiprocessing as mp

from kiln.modules.eval.extractors import build_extractor
from kiln.modules.pretrained.extractors import EfficientNetLite0, HEDVGG16
from kiln.modules.eval.metrics import FidKid


class _Fixed(torch.nn.Module):
    name, num_features = "fixed", 16

    def forward(self, x):
        return x


def _features(seed: int, n: int = 200, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(16, 16, generator=g) / 4
    return torch.randn(n, 16, generator=g, dtype=torch.float64) @ mix.double() + shift


def _direct(real: np.ndarray, fake: np.ndarray) -> tuple[float, float]:
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    fid = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    d, m = real.shape[1], len(real)
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(real, real), k(fake, fake), k(real, fake)
    kid = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    return fid, float(kid)


def test_fid_and_kid_equal_a_direct_computation():
    real, fake = _features(0), _features(1, shift=0.3)
    metric = FidKid(_Fixed())
    for chunk in real.split(64):
        metric.update_features(chunk, real=True)
    for chunk in fake.split(64):
        metric.update_features(chunk, real=False)
    result = metric.compute()
    fid, kid = _direct(real.numpy(), fake.numpy())
    assert result["fid"] == pytest.approx(fid, abs=1e-3) and result["fid"] > 0.5
    assert result["kid"] == pytest.approx(kid, abs=1e-3) and result["kid"] > 0.01
    assert result["extractor"] == "fixed"


def _rank(rank: int, world: int, port: int, out) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    real, fake = _features(0), _features(1, shift=0.3)
    metric = FidKid(_Fixed())
    metric.update_features(real[rank::world], real=True)  # each rank scores its share
    metric.update_features(fake[rank::world], real=False)
    result = metric.compute()
    if rank == 0:
        out.put(result)
    torch.distributed.destroy_process_group()


def test_two_ranks_equal_one_rank():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    two = out.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    one = FidKid(_Fixed())
    one.update_features(_features(0), real=True)
    one.update_features(_features(1, shift=0.3), real=False)
    one = one.compute()
    assert two["fid"] == pytest.approx(one["fid"], abs=1e-6)
    assert two["kid"] == pytest.approx(one["kid"], abs=1e-6)


@pytest.mark.parametrize("cls", [EfficientNetLite0, HEDVGG16])
def test_offline_extractors_tell_images_apart(cls):
    """Real pretrained features: two flips of the same photo are closer than two photos."""
    from sklearn.datasets import load_sample_images

    photos = [torch.as_tensor(p[:400, :400].copy()).permute(2, 0, 1).float() / 127.5 - 1 for p in load_sample_images().images]
    net = cls()
    torch.manual_seed(0)
    with torch.no_grad():
        a, b = net(torch.stack(photos)), net(torch.stack([photos[0].flip(-1)]))
    assert a.shape == (2, net.num_features)
    flipped, other = (a[0] - b[0]).norm().item(), (a[0] - a[1]).norm().item()
    assert flipped < 0.5 * other, (flipped, other)


def test_features_in_chunks_equal_the_whole_batch(monkeypatch):
    """On CPU EfficientNet-Lite0 runs a few images at a time (its activations stay below glibc's
    mmap threshold); the features are the batch's, in order."""
    from kiln.modules.pretrained import extractors

    net = EfficientNetLite0()
    images = torch.rand(5, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    whole = net(images)
    monkeypatch.setattr(extractors, "CPU_ACTIVATION_BYTES", 2 * 96 * 112 * 112 * 4)  # 2 images a chunk
    assert torch.allclose(net(images), whole, atol=1e-5, rtol=1e-5)


def test_bad_extractor_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="feature extractor weights not found"):
        build_extractor("efficientnet-lite0", str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match="is not an EfficientNet-Lite0 state dict"):
        build_extractor("efficientnet-lite0", str(wrong))
    with pytest.raises(ValueError, match="unknown feature extractor 'inception'"):
        build_extractor("inception")


def test_precision_recall_equal_brute_force():
    from kiln.modules.eval.metrics import precision_recall

    real, fake = _features(0, n=120).float(), _features(1, n=90, shift=0.4).float()

    def brute(a: np.ndarray, b: np.ndarray, k: int = 3) -> float:  # share of b inside a's k-NN balls
        da = np.linalg.norm(a[:, None] - a[None], axis=-1)
        radii = np.sort(da, axis=1)[:, k]
        db = np.linalg.norm(b[:, None] - a[None], axis=-1)
        return float((db <= radii[None]).any(axis=1).mean())

    result = precision_recall(real, fake)
    assert result["precision"] == pytest.approx(brute(real.numpy(), fake.numpy()), abs=1e-9)
    assert result["recall"] == pytest.approx(brute(fake.numpy(), real.numpy()), abs=1e-9)
    same = precision_recall(real, real)
    assert same == {"precision": 1.0, "recall": 1.0}
    assert 0 < result["precision"] < 1


def test_class_spread_is_the_mean_per_class_variance():
    from kiln.modules.eval.metrics import class_spread

    g = torch.Generator().manual_seed(0)
    # Class 0 spread with std 2, class 1 with std 0.5, around different centres; class 2 has one
    # sample (no variance to measure: left out).
    a = torch.randn(4000, 8, generator=g) * 2 + 5
    b = torch.randn(4000, 8, generator=g) * 0.5 - 3
    features = torch.cat([a, b, torch.zeros(1, 8)])
    labels = torch.cat([torch.zeros(4000), torch.ones(4000), torch.full((1,), 2)]).long()
    expected = (a.double().var(0).mean() + b.double().var(0).mean()).item() / 2
    assert class_spread(features, labels) == pytest.approx(expected, rel=1e-12)
    assert class_spread(features, labels) == pytest.approx((4 + 0.25) / 2, rel=0.05)
    # Collapsing every class onto one point (what truncation tends towards) gives 0; the class
    # centres being far apart does not count as spread.
    assert class_spread(torch.cat([a.mean(0).expand(10, 8), b.mean(0).expand(10, 8)]),
                        torch.arange(2).repeat_interleave(10)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="at least 2 samples"):
        class_spread(torch.zeros(3, 8), torch.arange(3))


def test_inception_score_bounds():
    from kiln.modules.eval.metrics import inception_score

    confident = torch.eye(10).repeat(50, 1) * 30  # 10 classes, each predicted with certainty
    assert inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-6)
    assert 9.0 < inception_score(confident, splits=5)[0] < 10.0  # random splits hold uneven classes
    assert inception_score(torch.zeros(500, 10), splits=5)[0] == pytest.approx(1.0)


def test_clip_score_needs_a_clip_model():
    from kiln.modules.clip.lit_module import CLIPModule
    from kiln.modules.eval.metrics import clip_score

    with pytest.raises(ValueError, match="clip_score needs a CLIP model"):
        clip_score(None, torch.zeros(2, 3, 16, 16), ["a", "b"])
    clip = CLIPModule(embed_dim=16, vision={"image_size": 16, "patch_size": 4, "width": 16, "layers": 1, "heads": 2},
                      text={"context_length": 16, "width": 16, "layers": 1, "heads": 2}).eval()
    score = clip_score(clip, torch.rand(4, 3, 32, 32) * 2 - 1, ["red", "blue", "a cat", "a dog"])
    assert 0.0 <= score <= 100.0


def test_prompt_ranking_counts_the_images_whose_own_prompt_ranks_first():
    from kiln.modules.clip.lit_module import CLIPModule
    from kiln.modules.eval.metrics import prompt_ranking

    torch.manual_seed(0)
    clip = CLIPModule(embed_dim=16, vision={"image_size": 16, "patch_size": 4, "width": 16, "layers": 1, "heads": 2},
                      text={"context_length": 16, "width": 16, "layers": 1, "heads": 2}).eval()
    images, prompts = torch.rand(8, 3, 32, 32) * 2 - 1, ["red heart", "pizza", "rocket"]
    with torch.no_grad():
        image = clip.model.encode_image(torch.nn.functional.interpolate(images, size=16, mode="bilinear", antialias=True))
        best = (image @ clip.model.encode_text(clip.tokenize(prompts)).T).argmax(1).tolist()
    assert prompt_ranking(clip, images, best, prompts) == 1.0
    wrong = [(b + 1) % 3 for b in best]
    assert prompt_ranking(clip, images, wrong, prompts) == 0.0
    assert prompt_ranking(clip, images, best[:4] + wrong[4:], prompts) == 0.5
