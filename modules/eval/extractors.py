"""The feature networks scores are computed with, by name: the pretrained ones
(`kiln.modules.pretrained`) and the data sets' judges (`kiln.modules.eval.judge`)."""
from __future__ import annotations

from torch import nn

from kiln.modules.pretrained.extractors import EfficientNetLite0, HEDVGG16


def build_extractor(name: str, weights: str | None = None) -> nn.Module:
    """`efficientnet-lite0`, `hed-vgg16`, `inception-v3-fid` (weights required), or `judge-<data set>`
    (trained and cached on first use)."""
    if name == "efficientnet-lite0":
        return EfficientNetLite0(weights)
    if name == "hed-vgg16":
        return HEDVGG16(weights)
    if name == "inception-v3-fid":
        from kiln.modules.pretrained.inception import InceptionV3FID  # imports only when asked for

        return InceptionV3FID(weights)
    if name.startswith("judge-"):
        from kiln.modules.eval.judge import get_judge, load_judge

        judge = load_judge(weights) if weights else get_judge(name[len("judge-"):])
        judge.name = name
        return judge
    raise ValueError(f"unknown feature extractor '{name}' "
                     "(efficientnet-lite0, hed-vgg16, inception-v3-fid, judge-<data set>)")
