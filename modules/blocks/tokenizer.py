"""Byte-level tokenizer for the CLIP text tower.

CLIP (Radford et al. 2021) uses a 49,152-merge lower-cased BPE. Its merges file is not
shipped by any package on the offline machines kiln is tested on, so kiln's default is a
byte-level vocabulary: every UTF-8 byte is a token, plus pad / start / end markers. It needs
no file, never produces an unknown token, and keeps captions such as emoji names ("flag:
Côte d'Ivoire") exact. A text tower sized for BPE (vocab 49,408) accepts these ids unchanged.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch

PAD, SOT, EOT = 0, 1, 2
_OFFSET = 3  # byte b is token b + 3
VOCAB_SIZE = 256 + _OFFSET


class ByteTokenizer:
    """Lower-cased, whitespace-normalised UTF-8 bytes between SOT and EOT, padded with PAD."""

    vocab_size = VOCAB_SIZE

    def __init__(self, context_length: int = 77):
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3, got {context_length}")
        self.context_length = context_length

    def encode(self, text: str) -> list[int]:
        text = re.sub(r"\s+", " ", text).strip().lower()
        return [b + _OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(i - _OFFSET for i in ids if i >= _OFFSET)
        return data.decode("utf-8", errors="replace")

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids of shape (len(texts), context_length); over-long texts are cut, keeping EOT last."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [SOT, *self.encode(text)[: self.context_length - 2], EOT]
            out[row, : len(ids)] = torch.tensor(ids)
        return out
