"""CLIP parts against independent computations: tokenizer, towers, loss (paper sizes: test_plan.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.modules.clip.loss import clip_loss
from kiln.modules.clip.networks import CLIP, CLIPConfig, TextConfig, VisionConfig
from kiln.modules.blocks.tokenizer import EOT, PAD, SOT, ByteTokenizer


def tiny() -> CLIP:
    torch.manual_seed(0)
    return CLIP(CLIPConfig(32, VisionConfig(16, 4, 32, 2, 2), TextConfig(24, width=32, layers=2, heads=2)))


def test_tokenizer_layout_and_round_trip():
    tok = ByteTokenizer(context_length=16)
    ids = tok(["Red  Heart", "flag: Côte d’Ivoire"])
    assert ids.shape == (2, 16)
    row = ids[0].tolist()
    assert row[0] == SOT and row[len("red heart") + 1] == EOT and set(row[len("red heart") + 2:]) == {PAD}
    assert tok.decode(row) == "red heart"  # lower-cased, whitespace folded
    assert tok.decode(tok.encode("flag: côte d’ivoire")) == "flag: côte d’ivoire"  # multi-byte UTF-8 kept


def test_tokenizer_truncates_but_keeps_eot():
    ids = ByteTokenizer(context_length=8)("a very long caption indeed")[0].tolist()
    assert ids[0] == SOT and ids[-1] == EOT and PAD not in ids


def test_text_tower_pools_at_eot_and_ignores_padding():
    model = tiny().eval()
    tok = ByteTokenizer(24)
    short, longer = tok(["cat face"]), tok(["cat face", "grinning face with big eyes"])
    # Batch padding (a longer neighbour) must not change a caption's embedding.
    torch.testing.assert_close(model.encode_text(short)[0], model.encode_text(longer)[0], atol=1e-6, rtol=1e-5)
    # Tokens after EOT are invisible under the causal mask.
    noisy = short.clone()
    noisy[0, 12:] = 77
    torch.testing.assert_close(model.encode_text(short), model.encode_text(noisy), atol=1e-6, rtol=1e-5)


def test_length_buckets_are_exact():
    tok = ByteTokenizer(24)
    captions = ["a", "cat face", "grinning face with big eyes", "red heart", "ok", "flag: japan", "x", "thumbs up"]
    plain = tiny().eval()
    torch.manual_seed(0)
    bucketed = CLIP(CLIPConfig(32, VisionConfig(16, 4, 32, 2, 2),
                               TextConfig(24, width=32, layers=2, heads=2, length_buckets=3))).eval()
    bucketed.load_state_dict(plain.state_dict())
    torch.testing.assert_close(bucketed.encode_text(tok(captions)), plain.encode_text(tok(captions)), atol=1e-6, rtol=1e-5)


def test_towers_shapes_and_normalisation():
    model = tiny()
    img, txt, scale = model(torch.randn(3, 3, 16, 16), ByteTokenizer(24)(["a", "b", "c"]))
    assert img.shape == txt.shape == (3, 32)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with pytest.raises(ValueError, match="not a multiple"):
        VisionConfig(image_size=30, patch_size=4) and CLIP(CLIPConfig(8, VisionConfig(30, 4, 8, 1, 1)))


def _numpy_clip_loss(img: np.ndarray, txt: np.ndarray, scale: float) -> float:
    logits = scale * img @ txt.T

    def xent(lg):
        lg = lg - lg.max(axis=1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
        return -np.mean(np.diag(logp))

    return (xent(logits) + xent(logits.T)) / 2


def test_loss_matches_numpy():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(8, 5)); img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = rng.normal(size=(8, 5)); txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    got = clip_loss(torch.tensor(img), torch.tensor(txt), torch.tensor(7.0))
    assert got.item() == pytest.approx(_numpy_clip_loss(img, txt, 7.0), rel=1e-10)


def test_sharded_loss_and_gradient_equal_the_global_batch():
    """Two simulated ranks, each gathering the other's features with gradient: the mean loss and
    the summed gradients (what DDP averaging of per-rank mean losses gives, times world) match
    one process holding the whole batch."""
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(8, 5, dtype=torch.float64), dim=1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(8, 5, dtype=torch.float64), dim=1).requires_grad_()
    scale = torch.tensor(5.0, dtype=torch.float64)
    full = clip_loss(img, txt, scale)
    g_full = torch.autograd.grad(full, (img, txt))

    world, b = 2, 4

    def gather(local: torch.Tensor, rank: int) -> torch.Tensor:
        # An all-gather with gradient, simulated: the other rank's rows are views of the same leaves.
        rows = local._base
        return torch.cat([local if r == rank else rows[r * b:(r + 1) * b] for r in range(world)])

    per_rank = [
        clip_loss(img[r * b:(r + 1) * b], txt[r * b:(r + 1) * b], scale, lambda t, r=r: gather(t, r), rank=r)
        for r in range(world)
    ]
    mean = sum(per_rank) / world
    g_sharded = torch.autograd.grad(mean, (img, txt))
    assert mean.item() == pytest.approx(full.item(), rel=1e-12)
    for a, e in zip(g_sharded, g_full):
        torch.testing.assert_close(a, e)
