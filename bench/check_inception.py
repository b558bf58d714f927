"""One-off check that kiln's FID InceptionV3 (kiln.modules.pretrained.inception) computes what
pytorch-fid's network computes: same weights, same inputs, pool3 features compared.

A verification script, not a test: it needs pytorch-fid and torchvision, which kiln does not
depend on, so it runs in two steps in two environments:

    python3 -m venv /tmp/inc-venv
    /tmp/inc-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 scipy numpy pillow
    /tmp/inc-venv/bin/pip install --no-deps pytorch-fid
    /tmp/inc-venv/bin/python bench/check_inception.py reference /tmp/inc-check   # pytorch-fid side
    python3 bench/check_inception.py compare /tmp/inc-check                      # kiln side

`reference` builds pytorch-fid's FID network without its weight download (the download call is
patched to hand the freshly built network its own state dict), gives it random weights and
random BatchNorm statistics, and writes DIR/weights.pth (the full state dict, fc included, in the
layout of the real weights file) and DIR/reference.pt (inputs in [0, 1], pytorch-fid's pool3
features, its parameter count). `compare` loads DIR/weights.pth through
build_extractor("inception-v3-fid", ...), feeds the same inputs mapped to [-1, 1], and prints the
largest differences; it exits non-zero if one exceeds 1e-4 of the features' largest magnitude or
the parameter counts differ.

Plain random weights would make pool3 vanish or blow up over ~90 layers and hide errors, so the
BatchNorm statistics are first measured on a calibration batch and then perturbed, and gamma/beta
are drawn at random; pool3 then stays within a few hundred. The check does notice the FID quirks:
an average pool that counts the padding, or an average pool in Mixed_7c, moves pool3 by 15-30%
of its largest value.

Result (pytorch-fid 0.3.0 on torch 2.14.1 against kiln on torch 2.13.0, CPU): same parameter
count (23,850,960); 299 px inputs give bit-identical features; resized ones differ by < 1e-6 of
the largest feature, because pytorch-fid resizes [0, 1] images and then maps them to [-1, 1]
while kiln resizes [-1, 1] images (the two agree exactly when kiln is fed pytorch-fid's order).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

# (shape, grey) of each input batch: already 299, upsampled, downsampled and non-square, grey.
CASES = [((4, 3, 299, 299), False), ((3, 3, 64, 64), False), ((2, 3, 400, 320), False), ((3, 1, 28, 28), True)]


def reference(out: str) -> None:
    import pytorch_fid
    import torchvision
    from pytorch_fid import inception as pfi

    built = []

    def record(*args, **kwargs):
        net = build(*args, **kwargs)
        built.append(net)
        return net

    build, pfi._inception_v3 = pfi._inception_v3, record
    pfi.load_state_dict_from_url = lambda *args, **kwargs: built[0].state_dict()  # no download
    wrapper = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])  # resize + (0,1)->(-1,1), as fid_score
    net = built[0]

    gen = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.data = torch.randn(m.weight.shape, generator=gen) * (2 / fan_in) ** 0.5
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.weight.shape, generator=gen) + 0.5
            m.bias.data = (torch.rand(m.bias.shape, generator=gen) - 0.5) * 0.4
            m.reset_running_stats()
            m.momentum = None  # cumulative: the running stats become the calibration batch's
        elif isinstance(m, torch.nn.Linear):
            m.weight.data = torch.randn(m.weight.shape, generator=gen) * 0.02
            m.bias.data = torch.randn(m.bias.shape, generator=gen) * 0.02
    with torch.no_grad():
        wrapper.train()
        wrapper(torch.rand(8, 3, 299, 299, generator=gen))
        wrapper.eval()
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                std = m.running_var.sqrt()
                m.running_mean += 0.1 * std * torch.randn(std.shape, generator=gen)
                m.running_var *= torch.rand(std.shape, generator=gen) * 0.45 + 0.8

    inputs, features = [], []
    with torch.no_grad():
        for shape, grey in CASES:
            x = torch.rand(shape, generator=gen)
            inputs.append(x)
            features.append(wrapper(x.expand(-1, 3, -1, -1) if grey else x)[0].flatten(1))
    os.makedirs(out, exist_ok=True)
    torch.save(net.state_dict(), os.path.join(out, "weights.pth"))
    torch.save({"inputs": inputs, "features": features, "num_parameters": sum(p.numel() for p in net.parameters()),
                "versions": f"pytorch-fid {pytorch_fid.__version__}, torch {torch.__version__}, "
                            f"torchvision {torchvision.__version__}"},
               os.path.join(out, "reference.pt"))
    print(f"wrote {out}/weights.pth and {out}/reference.pt; pool3 |max| "
          f"{max(f.abs().max().item() for f in features):.4g}, {sum(p.numel() for p in net.parameters())} parameters")


def compare(out: str) -> int:
    from kiln.modules.eval.extractors import build_extractor

    ref = torch.load(os.path.join(out, "reference.pt"), weights_only=True)
    net = build_extractor("inception-v3-fid", os.path.join(out, "weights.pth"))
    count = sum(p.numel() for p in net.parameters())
    print(f"reference: {ref['versions']}; kiln: torch {torch.__version__}")
    print(f"parameters: kiln {count}, pytorch-fid {ref['num_parameters']}")
    worst = 0.0
    for (shape, _), x, expected in zip(CASES, ref["inputs"], ref["features"]):
        got = net(x * 2 - 1)
        diff = (got - expected).abs().max().item()
        scale = expected.abs().max().item()
        worst = max(worst, diff / scale)
        print(f"input {tuple(shape)}: max |diff| {diff:.3g}, max |feature| {scale:.3g}, relative {diff / scale:.3g}")
    print(f"worst relative difference {worst:.3g}")
    return 0 if worst < 1e-4 and count == ref["num_parameters"] else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("reference", "compare"))
    parser.add_argument("dir")
    args = parser.parse_args()
    torch.set_num_threads(1)  # modest CPU use; on shared cores also the fastest
    if args.step == "reference":
        reference(args.dir)
    else:
        sys.exit(compare(args.dir))
