"""The judge: a classifier trained on the real data, which scores conditional samples by how often
it recognises the class they were generated for ("classification accuracy score"), and whose
penultimate layer is a feature space fitted to the data set (for FID/KID on small images).

A judge is trained once per data set and cached under $KILN_CACHE/judges/ with its accuracy on
the real held-out split, which is reported beside every score it gives (a 92% judge cannot
tell a generator apart from 100%).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class JudgeConfig:
    channels: int = 1
    size: int = 28
    num_classes: int = 10
    width: int = 32
    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0


class JudgeNet(nn.Module):
    """Conv(w) x2 -> pool -> Conv(2w) x2 -> pool -> Conv(4w) -> global average -> linear; BN and
    ReLU after each conv. About 0.3M parameters at w=32."""

    def __init__(self, cfg: JudgeConfig):
        super().__init__()
        w = cfg.width

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.trunk = nn.Sequential(
            *conv(cfg.channels, w), *conv(w, w), nn.MaxPool2d(2),
            *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2),
            *conv(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(4 * w, cfg.num_classes)
        self.num_features = 4 * w

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


class Judge(nn.Module):
    """A trained `JudgeNet` with its input convention: images in [-1, 1], (N, C, H, W), any size
    (resized to the judge's), any channel count (RGB averaged to grey for a grey judge)."""

    def __init__(self, cfg: JudgeConfig, accuracy: float | None = None, name: str = "judge"):
        super().__init__()
        self.cfg, self.accuracy, self.name = cfg, accuracy, name
        self.net = JudgeNet(cfg).eval()
        self.num_features = self.net.num_features

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] != self.cfg.channels:
            x = x.mean(1, keepdim=True) if self.cfg.channels == 1 else x.expand(-1, self.cfg.channels, -1, -1)
        if x.shape[-1] != self.cfg.size or x.shape[-2] != self.cfg.size:
            x = F.interpolate(x, size=(self.cfg.size, self.cfg.size), mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(self.prepare(images))

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepare(images))

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net.features(self.prepare(images))
        return features, self.net.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # feature extractor interface
        return self.features(images)

    @torch.no_grad()
    def accuracy_on(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
        correct = 0
        for i in range(0, len(images), batch_size):
            correct += (self.logits(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
        return correct / len(images)


def to_unit(images_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) or (N, C, H, W) -> float (N, C, H, W) in [-1, 1]."""
    x = torch.as_tensor(np.array(images_u8))  # a writable copy
    if x.ndim == 3:
        x = x[:, None]
    return x.float() / 127.5 - 1.0


@contextlib.contextmanager
def reproducible(seed: int):
    """Within: the same numbers from the same seed whatever the caller's settings. One intra-op thread
    (a reduction split over k threads sums in another order, so the weights depended on the core
    count), deterministic algorithms only, and the global RNG (weight init, dropout) seeded in a
    fork of the caller's, which gets its own state, thread count and determinism setting back after.
    Bit-identical on one kind of CPU; kernels chosen by instruction set (AVX2/AVX-512) may still
    round differently on another."""
    threads = torch.get_num_threads()
    deterministic, warn_only = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_num_threads(threads)


@torch.enable_grad()  # also when asked for from inside an evaluation's no_grad
def train_judge(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                cfg: JudgeConfig, name: str = "judge", log=print) -> Judge:
    """Train on real images in [-1, 1] with random 2-pixel shifts and flips; AdamW, one-cycle. A
    function of `cfg.seed` and the data alone (see `reproducible`): on the CPU, one thread."""
    with reproducible(cfg.seed):
        return _train_judge(train_x, train_y, val_x, val_y, cfg, name, log)


def _train_judge(train_x, train_y, val_x, val_y, cfg: JudgeConfig, name: str, log) -> Judge:
    judge = Judge(cfg, name=name)
    net = judge.net.train()
    steps = cfg.epochs * (len(train_x) // cfg.batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(cfg.seed)
    start, step = time.time(), 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(train_x), generator=g)
        for i in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x = judge.prepare(train_x[idx])
            x = F.pad(x, (2, 2, 2, 2), value=-1.0)
            dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()
            x = x[..., dy:dy + cfg.size, dx:dx + cfg.size]
            if torch.rand((), generator=g) < 0.5:
                x = x.flip(-1)
            loss = F.cross_entropy(net(x), train_y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        net.eval()
        judge.accuracy = judge.accuracy_on(val_x, val_y)
        net.train()
        log(f"judge {name}: epoch {epoch + 1}/{cfg.epochs}, held-out accuracy {judge.accuracy:.4f} "
            f"({time.time() - start:.0f} s)")
    net.eval()
    return judge


def _cache_dir() -> Path:
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "judges"


def save_judge(judge: Judge, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    torch.save({"config": asdict(judge.cfg), "accuracy": judge.accuracy, "name": judge.name,
                "state_dict": judge.net.state_dict()}, tmp)
    tmp.replace(path)


def load_judge(path: str | Path) -> Judge:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    judge = Judge(JudgeConfig(**ckpt["config"]), ckpt["accuracy"], ckpt["name"])
    judge.net.load_state_dict(ckpt["state_dict"])
    return judge.eval()


# Data sets a judge is known for: name -> (train, held-out) as (images in [-1, 1], labels).
def _fashion_mnist():
    from kiln.datamodules.builders import FASHION_MNIST, read_idx

    def split(prefix: str):
        x = read_idx(f"{FASHION_MNIST}/{prefix}-images-idx3-ubyte.gz")
        y = read_idx(f"{FASHION_MNIST}/{prefix}-labels-idx1-ubyte.gz")
        return to_unit(x), torch.as_tensor(y.astype(np.int64))

    return split("train"), split("t10k"), JudgeConfig(channels=1, size=28, num_classes=10, epochs=6)


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = to_unit((d.images * 255 / 16).astype(np.uint8))
    y = torch.as_tensor(d.target.astype(np.int64))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(x))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]]), \
        JudgeConfig(channels=1, size=8, num_classes=10, epochs=30, batch_size=64)


def _render(job) -> np.ndarray:
    from kiln.datamodules.emoji import render

    return np.asarray(render(*job))


def _emoji(size: int = 32, held_out: float = 0.15):
    """Emoji categories (the 9 Unicode groups) in all three styles at 32 px. Held out: 15% of
    the designs, every skin-tone variant and style of a design on the same side, so the judge is
    measured on drawings it has not seen in any hand. The groups are unbalanced (People & Body
    is 57% of the emoji), which the held-out accuracy reflects."""
    import multiprocessing

    from kiln.datamodules.emoji import STYLES, catalogue

    emojis = catalogue()
    bases = sorted({e.base for e in emojis})
    held = set(np.random.default_rng(0).permutation(bases)[: round(held_out * len(bases))].tolist())
    jobs = [(e, style, size) for style in STYLES for e in emojis]
    with multiprocessing.Pool(2) as pool:
        pixels = np.stack(pool.map(_render, jobs, chunksize=64))
    x = to_unit(pixels.transpose(0, 3, 1, 2))
    y = torch.tensor([e.category for e, _, _ in jobs])
    test = torch.tensor([e.base in held for e, _, _ in jobs])
    num_classes = int(y.max()) + 1
    return (x[~test], y[~test]), (x[test], y[test]), \
        JudgeConfig(channels=3, size=size, num_classes=num_classes, width=48, epochs=15, batch_size=64)


DATASETS = {"fashion-mnist": _fashion_mnist, "digits": _digits, "emoji": _emoji}


def get_judge(dataset: str, log=print, **overrides) -> Judge:
    """The judge for a known data set: from the cache, or trained now (Fashion-MNIST: a few
    minutes on 2 CPU cores) and cached."""
    if dataset not in DATASETS:
        raise ValueError(f"no judge for data set '{dataset}' (known: {', '.join(DATASETS)})")
    (train_x, train_y), (val_x, val_y), cfg = DATASETS[dataset]()
    cfg = JudgeConfig(**{**asdict(cfg), **overrides})
    key = hashlib.blake2b(json.dumps(asdict(cfg), sort_keys=True).encode(), digest_size=6).hexdigest()
    path = _cache_dir() / f"{dataset}-{key}.pt"
    if path.exists():
        return load_judge(path)
    judge = train_judge(train_x, train_y, val_x, val_y, cfg, name=f"judge-{dataset}", log=log)
    save_judge(judge, path)
    return judge
