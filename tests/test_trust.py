"""A checkpoint's stored config names no code outside kiln (or KILN_TRUSTED_PACKAGES) at any
depth, and such a name is refused in one line before its module is imported.

The foreign module here records its own import in a marker file: that is how each test knows
whether its top-level code ran."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import kiln
from kiln.trainers.checkpoints.checkpoint import CheckpointError
from kiln.trainers.checkpoints.trust import UntrustedConfig, check_config
from test_cli_errors import assert_one_line_error

FOREIGN = """\
import os
open(os.environ["FOREIGN_MARKER"], "w").write("imported")

class Mapper:
    def __init__(self, image_size: int = 8):
        self.image_size = image_size

    def __call__(self, sample):
        return sample

def mapper(sample):
    return sample
"""

CLIP = {
    "model": {"class_path": "kiln.modules.clip.lit_module.CLIPModule",
              "init_args": {"embed_dim": 16, "vision": {"image_size": 8, "patch_size": 4, "width": 16, "layers": 1, "heads": 2},
                            "text": {"context_length": 16, "width": 16, "layers": 1, "heads": 2}}},
    "data": {"class_path": "kiln.datamodules.datasets.EmojiDataModule",
             "init_args": {"mapper": {"class_path": "kiln.datamodules.mappers.ImageText", "init_args": {"image_size": 8}}}},
    "trainer": {"accelerator": "cpu", "callbacks": [{"class_path": "kiln.trainers.callbacks.ema.EMA"}], "logger": False},
}

# Where a foreign name can hide in a stored config, as jsonargparse would import it.
PLACES = {
    "nested class_path (the data mapper)": (("data", "init_args", "mapper", "class_path"), "foreign_code.Mapper"),
    "Callable as a dotted string (the data mapper)": (("data", "init_args", "mapper"), "foreign_code.mapper"),
    "trainer callback": (("trainer", "callbacks", 0, "class_path"), "foreign_code.Mapper"),
    "trainer logger": (("trainer", "logger"), {"class_path": "foreign_code.Mapper"}),
}


def _config_with(place: str) -> dict:
    config = yaml.safe_load(yaml.safe_dump(CLIP))
    path, value = PLACES[place]
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return config


def _checkpoint(path: Path, config: dict, family: str = "clip") -> Path:
    torch.save({"kiln": {"family": family, "config": yaml.safe_dump(config), "version": "0.1.0"},
                "state_dict": {}}, path)
    return path


@pytest.fixture
def foreign(tmp_path, monkeypatch) -> dict:
    """An importable foreign module `foreign_code` and the environment that finds it."""
    (tmp_path / "foreign_code.py").write_text(FOREIGN)
    marker = tmp_path / "imported.txt"
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FOREIGN_MARKER", str(marker))
    return {"env": {"PYTHONPATH": str(tmp_path), "FOREIGN_MARKER": str(marker)}, "marker": marker}


@pytest.mark.parametrize("place", list(PLACES))
def test_kiln_eval_refuses_a_foreign_name_anywhere_without_importing_it(tmp_path, foreign, place):
    ckpt = _checkpoint(tmp_path / "foreign.ckpt", _config_with(place))
    r = kiln("eval", "--ckpt", str(ckpt), "--out", str(tmp_path / "m.json"), env=foreign["env"])
    assert_one_line_error(r, "foreign_code.", "KILN_TRUSTED_PACKAGES")
    assert not foreign["marker"].exists(), "the foreign module was imported"
    assert not (tmp_path / "m.json").exists()


def test_kiln_sample_refuses_a_foreign_mapper_without_importing_it(tmp_path, foreign):
    ckpt = _checkpoint(tmp_path / "foreign.ckpt", _config_with("nested class_path (the data mapper)"))
    r = kiln("sample", "--ckpt", str(ckpt), "--prompt", "x", "--out", str(tmp_path / "out"), env=foreign["env"])
    assert_one_line_error(r, "data.init_args.mapper.class_path", "foreign_code.Mapper")
    assert not foreign["marker"].exists() and not (tmp_path / "out").exists()


def test_the_check_can_see_an_import(tmp_path, foreign):
    """The control: trusted, the same checkpoint does import the module (so the marker works)."""
    ckpt = _checkpoint(tmp_path / "foreign.ckpt", _config_with("nested class_path (the data mapper)"))
    env = {**foreign["env"], "KILN_TRUSTED_PACKAGES": "foreign_code"}
    kiln("eval", "--ckpt", str(ckpt), "--out", str(tmp_path / "m.json"), env=env)
    assert foreign["marker"].exists()


def test_glide_base_ckpt_with_a_foreign_name_is_refused_before_import(tmp_path, foreign):
    from kiln.modules.glide.lit_module import GLIDEModule

    base = _config_with("Callable as a dotted string (the data mapper)")
    base["model"] = {"class_path": "kiln.modules.glide.lit_module.GLIDEModule", "init_args": {"stage": "base"}}
    bad = _checkpoint(tmp_path / "base.ckpt", base, family="glide")
    upsampler = GLIDEModule(stage="upsampler", image_size=16, low_res_size=8, base_ckpt=str(bad),
                            text={"context_length": 8, "width": 16, "layers": 1, "heads": 2},
                            unet={"channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [],
                                  "head_channels": 8})
    with pytest.raises(CheckpointError, match=r"data\.init_args\.mapper: 'foreign_code\.mapper'"):
        upsampler.base()
    assert not foreign["marker"].exists() and "foreign_code" not in sys.modules


def test_strings_that_name_no_importable_module_pass():
    check_config({"ckpt": "last.ckpt", "prompt": "flag: Japan", "lr": "1.0e-3", "x": "no_such_module_here.Thing",
                  "mapper": {"class_path": "kiln.datamodules.mappers.ImageText"}})
    with pytest.raises(UntrustedConfig, match="'os.system'"):
        check_config({"model": {"init_args": {"hook": "os.system"}}})
    with pytest.raises(UntrustedConfig, match="class_path"):
        check_config({"model": {"class_path": "CLIPModule"}})  # a bare name: looked up among imported classes
