"""A judge is a function of its data and seed: trained afresh in an empty cache (as on a fresh
machine, or in every test session's private cache), it comes out bit for bit the same whatever
thread count or RNG state the caller had, and leaves those as it found them. Learning assertions
that score on a judge's features (tests/test_stylegan.py, test_glide.py) rely on this."""
from __future__ import annotations

import torch

from kiln.modules.eval.judge import get_judge

SHORT = dict(epochs=2)  # the digits judge's training, shortened (its 30 epochs: about 12 s on one core)


def _fresh_judge(monkeypatch, cache, threads: int, **overrides):
    monkeypatch.setenv("KILN_CACHE", str(cache))
    torch.set_num_threads(threads)
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    judge = get_judge("digits", log=lambda *_: None, **{**SHORT, **overrides})
    assert list((cache / "judges").glob("digits-*.pt")), "trained, not found in a cache"
    # the caller's settings come back as they were
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng)
    assert not torch.are_deterministic_algorithms_enabled()
    return judge


def test_digits_judge_is_bit_identical_from_fresh_caches(monkeypatch, tmp_path):
    threads = torch.get_num_threads()
    try:
        one = _fresh_judge(monkeypatch, tmp_path / "a", threads=2)
        two = _fresh_judge(monkeypatch, tmp_path / "b", threads=1)
        other_seed = _fresh_judge(monkeypatch, tmp_path / "c", threads=1, seed=1)
    finally:
        torch.set_num_threads(threads)
    a, b = one.net.state_dict(), two.net.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert one.accuracy == two.accuracy
    # ... and the seed is what fixes it: another seed trains other weights
    c = other_seed.net.state_dict()
    assert not torch.equal(a["head.weight"], c["head.weight"])
