"""FID/KID against a direct computation (numpy + scipy.linalg.sqrtm) on the same features, 2-rank
evaluation against 1-rank, and the offline feature networks."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.multiprocessing as mp

from kiln.modules.eval.extractors import EfficientNetLite0, HEDVGG16, build_extractor
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


def test_bad_extractor_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="feature extractor weights not found"):
        build_extractor("efficientnet-lite0", str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match="is not an EfficientNet-Lite0 state dict"):
        build_extractor("efficientnet-lite0", str(wrong))
    with pytest.raises(ValueError, match="unknown feature extractor 'inception'"):
        build_extractor("inception")
