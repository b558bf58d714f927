"""The judge classifier: trained once per data set on the real data, cached, and reporting its own
held-out accuracy beside the scores it gives."""
from __future__ import annotations

import pytest
import torch

from kiln.modules.eval.judge import DATASETS, get_judge


def test_digits_judge_learns_and_is_cached(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))  # trained here, whatever other tests cached
    judge = get_judge("digits")
    assert judge.accuracy >= 0.9  # real held-out digits (chance 10%)
    assert "held-out accuracy" in capsys.readouterr().out
    again = get_judge("digits", log=lambda *_: pytest.fail("retrained instead of loading the cache"))
    assert again.accuracy == judge.accuracy
    (_, _), (val_x, val_y), _ = DATASETS["digits"]()
    assert judge.accuracy_on(val_x, val_y) == pytest.approx(judge.accuracy)
    # Classification accuracy score of "samples": real ones score the judge's accuracy, noise ~chance.
    noise = torch.rand(360, 3, 32, 32) * 2 - 1  # RGB and another size: converted and resized
    assert judge.accuracy_on(noise, val_y) < 0.3
    assert judge.features(val_x[:4]).shape == (4, judge.num_features)


def test_unknown_data_set():
    with pytest.raises(ValueError, match="no judge for data set 'cifar'"):
        get_judge("cifar")


@pytest.mark.learning
def test_fashion_mnist_judge_reaches_91_percent():
    judge = get_judge("fashion-mnist")
    print(f"fashion-mnist judge: held-out accuracy {judge.accuracy:.4f}")
    assert judge.accuracy >= 0.91


@pytest.mark.learning
def test_emoji_category_judge():
    """The 9 Unicode emoji groups in all three styles, judged on held-out designs (all their
    skin-tone variants and styles held out together). People & Body is 57% of the emoji: the
    judge must do far better than always answering it."""
    (train_x, train_y), (val_x, val_y), _ = DATASETS["emoji"]()
    majority = torch.bincount(val_y).max().item() / len(val_y)
    judge = get_judge("emoji")
    print(f"emoji judge: held-out accuracy {judge.accuracy:.4f} (majority class {majority:.4f}, "
          f"{len(train_y)} training / {len(val_y)} held-out images)")
    assert judge.accuracy >= majority + 0.15
