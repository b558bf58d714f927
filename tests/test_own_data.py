"""README's "Your own data", run as written: every `kiln data` command and `data:` block of the
section (its `/path/to/` paths put under a temporary folder), on small synthetic folders laid out
as the section says. Every block goes through its training and held-out loaders, its batches
checked against the images they came from; the blocks a family trains on run `kiln fit` with the
section's own command lines for 2 steps."""
from __future__ import annotations

import importlib
import inspect
import json
import random
import re
import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from PIL import Image

from conftest import REPO, kiln

PLACEHOLDER = "/path/to/"
# The kinds of data the section covers, by the start of their headings, and the families whose
# `kiln fit` lines each must give (the other kinds have no family yet).
FAMILIES = {"Captioned images": {"clip", "glide", "imagen"}, "Class folders": {"biggan", "stylegan"}, "Pairs": {"pix2pix"},
            "Unpaired domains": {"cyclegan", "ugatit"}, "Label maps": set()}
# Test-only overrides that keep a 2-step fit short: GLIDE and Imagen draw their 36-sample grid at the end of training.
FAST = {family: ["--model.init_args.grid_per_prompt", "1", "--model.init_args.sample_steps", "2"] for family in ("glide", "imagen")}


def own_data_section(readme: str) -> str:
    start = readme.index("\n## Your own data\n")
    return readme[start:readme.index("\n## ", start + 1)]


def parse_kinds(section: str) -> dict[str, dict]:
    """Per `### ` heading (up to " ("): its bash lines (`kiln data ...`, `kiln fit ...`) and yaml blocks."""
    kinds = {}
    for part in section.split("\n### ")[1:]:
        title, _, body = part.partition("\n")
        blocks = re.findall(r"^```(\w*)\n(.*?)^```", body, re.S | re.M)
        lines = [line.strip() for lang, code in blocks if lang == "bash" for line in code.replace("\\\n", " ").splitlines()
                 if line.strip() and not line.lstrip().startswith("#")]
        kinds[title.split(" (")[0]] = {
            "data": [line for line in lines if line.startswith("kiln data ")],
            "fit": [line for line in lines if line.startswith("kiln fit ")],
            "other": [line for line in lines if not line.startswith(("kiln data ", "kiln fit "))],
            "yaml": [code for lang, code in blocks if lang == "yaml"],
        }
    return kinds


README_KINDS = parse_kinds(own_data_section((REPO / "README.md").read_text()))


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def family(line: str) -> str:
    return option(shlex.split(line), "-c").split("/")[1]


# -- the synthetic folders, laid out as the section says; each maker returns {sample key: what the test knows} ------

def save(path: Path, image: Image.Image, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def make_captioned(commands: list[list[str]]) -> dict:
    """Images of one colour each (some not square), a same-name .txt naming the colour."""
    [args] = commands
    source, rng, made = Path(option(args, "--source")), random.Random(1), {}
    for i in range(40):
        colour = tuple(rng.randrange(256) for _ in range(3))
        name = f"beach-{i:04d}" if i < 30 else f"harbour/boat-{i:02d}"
        save(source / f"{name}.png", Image.new("RGB", (48, 36) if i % 2 else (40, 40), colour))
        (source / f"{name}.txt").write_text(f"  colour {' '.join(map(str, colour))}\n")
        made[name.replace("/", "_")] = colour
    return made


def make_classes(commands: list[list[str]]) -> dict:
    """cat/, dog/ and fox/ (the section's example), 12 JPEGs each; a class is one primary colour."""
    [args] = commands
    source, rng, made = Path(option(args, "--source")), random.Random(2), {}
    for label, name in enumerate(["cat", "dog", "fox"]):
        for i in range(12):
            colour = [40, 40, 40]
            colour[label] = 200 + rng.randrange(40)
            save(source / name / f"{i:04d}.jpg", Image.new("RGB", (40, 48), tuple(colour)), quality=95)
            made[f"{name}_{i:04d}"] = label
    return made


def gradient(w: int, h: int, seed: int) -> np.ndarray:
    """(h, w, 3) uint8, smooth and left-right asymmetric: a flip shows."""
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    r = np.random.default_rng(seed).uniform(0.2, 1, 3)
    return np.round(255 * np.stack([x * r[0], y * r[1], (x * y) ** 0.5 * r[2]], -1)).astype(np.uint8)


def make_pairs(commands: list[list[str]]) -> dict:
    """PNG inputs, and as targets the inputs inverted as JPEGs, under the same relative names (two in a sub-folder)."""
    [args] = commands
    inputs, targets, made = Path(option(args, "--input")), Path(option(args, "--target")), {}
    for i in range(40):
        name = f"{i:04d}" if i < 38 else f"street/{i}"
        pixels = gradient(64, 48, i)
        save(inputs / f"{name}.png", Image.fromarray(pixels))
        save(targets / f"{name}.jpg", Image.fromarray(255 - pixels), quality=95)
        made[name.replace("/", "_")] = None
    return made


def make_domains(commands: list[list[str]]) -> dict:
    """One folder per `kiln data folder` line, 40 and 30 images named after their folder."""
    made = {}
    for n, args in zip((40, 30), commands):
        source = Path(option(args, "--source"))
        for i in range(n):
            save(source / f"{source.name}-{i:03d}.jpg", Image.fromarray(gradient(50, 40, i)), quality=90)
            made[f"{source.name}-{i:03d}"] = source.name
    return made


PALETTE = np.array([[230, 30, 30], [30, 200, 30], [30, 30, 230], [220, 220, 40]], np.uint8)  # ids 0..3


def make_label_maps(commands: list[list[str]]) -> dict:
    """Greyscale ("L") maps of ids 0..3 in four quadrants, and JPEG images painted by id (PALETTE)."""
    [args] = commands
    labels, images, made = Path(option(args, "--input")), Path(option(args, "--target")), {}
    for i in range(40):
        quadrants = np.random.default_rng(i).permutation(4).reshape(2, 2)
        ids = np.kron(quadrants, np.ones((24, 24), np.int64)).astype(np.uint8)  # 48 x 48
        save(labels / f"{i:04d}.png", Image.fromarray(ids))
        save(images / f"{i:04d}.jpg", Image.fromarray(PALETTE[ids]), quality=95)
        made[f"{i:04d}"] = None
    return made


MAKERS = {"Captioned images": make_captioned, "Class folders": make_classes, "Pairs": make_pairs,
          "Unpaired domains": make_domains, "Label maps": make_label_maps}


@pytest.fixture(scope="module")
def own_data(tmp_path_factory) -> dict[str, dict]:
    """The section with its paths under a temporary folder; every kind's folders made and its
    `kiln data` lines run (two at a time); each yaml block in `<kind>.yaml`."""
    root = tmp_path_factory.mktemp("own-data")
    section = own_data_section((REPO / "README.md").read_text()).replace(PLACEHOLDER, f"{root}/")
    kinds = parse_kinds(section)
    commands = []
    for name, kind in kinds.items():
        kind["args"] = [shlex.split(line)[1:] for line in kind["data"]]
        kind["made"] = MAKERS[name](kind["args"])
        kind["block"] = root / f"{name.lower().replace(' ', '-')}.yaml"
        kind["block"].write_text(kind["yaml"][0])
        commands += kind["args"]
    with ThreadPoolExecutor(2) as pool:
        for args, r in zip(commands, pool.map(lambda args: kiln(*args), commands)):
            assert r.returncode == 0, f"kiln {shlex.join(args)}\n{r.stderr[-3000:]}"
            assert re.fullmatch(rf"kiln data {args[1]}: \d+ items, \d+ shards -> {re.escape(option(args, '--out'))}",
                                r.stdout.strip().splitlines()[-1]), r.stdout
    return kinds


def test_the_section_has_a_builder_and_a_block_for_each_kind():
    assert list(README_KINDS) == list(FAMILIES)
    for name, kind in README_KINDS.items():
        assert kind["data"] and not kind["other"], (name, kind)
        assert len(kind["yaml"]) == 1, name
        assert {family(line) for line in kind["fit"]} == FAMILIES[name], name
        assert PLACEHOLDER in kind["yaml"][0]


# -- every block through its loaders -------------------------------------------------------------

def data_module(block: Path) -> L.LightningDataModule:
    """The block's `data:` as `kiln fit` reads it (a subclass of LightningDataModule given by
    class_path), strict, so a sample the block cannot read fails here instead of being skipped."""
    config = yaml.safe_load(block.read_text())["data"]
    config["init_args"]["strict"] = True
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
    return parser.instantiate_classes(parser.parse_object({"data": config})).data


def batches(data: L.LightningDataModule, loader) -> list[dict]:
    """The loader's batches as a model receives them (uint8 images made float in [-1, 1])."""
    out = []
    for batch in loader:
        out.append(data.on_after_batch_transfer(data.on_before_batch_transfer(batch, 0), 0))
    return out


def image_batch(images: torch.Tensor, size: int, n: int) -> None:
    assert images.shape == (n, 3, size, size) and images.dtype == torch.float32
    assert -1 <= images.min() and images.max() <= 1


def check_captioned(batch: dict, made: dict, mapper: dict) -> None:
    size = mapper["image_size"]
    image_batch(batch["image"], size, len(batch["key"]))
    for key, caption, image in zip(batch["key"], batch["caption"], batch["image"]):
        colour = made[key]
        assert caption == f"colour {' '.join(map(str, colour))}"  # the image's own .txt, stripped
        mean = ((image.mean((1, 2)) + 1) * 127.5).tolist()
        assert np.allclose(mean, colour, atol=2), (key, mean, colour)


def check_classes(batch: dict, made: dict, mapper: dict) -> None:
    image_batch(batch["image"], mapper["image_size"], len(batch["key"]))
    assert batch["label"].dtype == torch.int64
    for key, label, image in zip(batch["key"], batch["label"].tolist(), batch["image"]):
        assert label == made[key]  # the index of its class folder in sorted order
        assert image.mean((1, 2)).argmax() == label  # and the image is that folder's


def check_pairs(batch: dict, made: dict, mapper: dict) -> None:
    n = len(batch["key"])
    assert set(batch["key"]) <= set(made)
    image_batch(batch["input"], mapper["image_size"], n)
    image_batch(batch["target"], mapper["image_size"], n)
    # Each target is its own input inverted (up to JPEG's losses), through the same crop and flip.
    error = (batch["input"] + batch["target"]).abs()
    assert error.mean() < 2 / 127.5 and error.max() < 32 / 127.5, (error.mean(), error.max())


def check_domains(batch: dict, made: dict, mapper: dict, domains: dict) -> None:
    n = len(batch["key_a"])
    image_batch(batch["a"], mapper["image_size"], n)
    image_batch(batch["b"], mapper["image_size"], n)
    assert {made[k] for k in batch["key_a"]} == {domains["a"]}
    assert {made[k] for k in batch["key_b"]} == {domains["b"]}


def check_label_maps(batch: dict, made: dict, mapper: dict) -> None:
    size, n = mapper["image_size"], len(batch["key"])
    assert batch["label_map"].shape == (n, size, size) and batch["label_map"].dtype == torch.int64
    assert set(batch["label_map"].unique().tolist()) <= set(range(mapper["num_classes"]))
    image_batch(batch["image"], size, n)
    # Map and image stay aligned (one crop and flip): each id's pixels have its colour.
    palette = torch.tensor(PALETTE, dtype=torch.float32) / 127.5 - 1
    for ids, image in zip(batch["label_map"], batch["image"]):
        for k in ids.unique().tolist():
            mean = image[:, ids == k].mean(1)
            assert (mean - palette[k]).abs().max() < 0.1, (k, mean, palette[k])


CHECKS = {"Captioned images": check_captioned, "Class folders": check_classes, "Pairs": check_pairs,
          "Unpaired domains": check_domains, "Label maps": check_label_maps}


def manifest_counts(urls: str | dict) -> dict[str, int]:
    """Samples per source of `urls` (a glob, or {domain: glob}), from the manifest of their build."""
    urls = urls if isinstance(urls, dict) else {"": urls}
    counts = {}
    for name, url in urls.items():
        out, _, pattern = url.rpartition("/")[0].rpartition("/")
        manifest = json.loads(Path(out, "manifest.json").read_text())
        counts[name] = sum(s["samples"] for s in manifest["shards"][pattern])
    return counts


@pytest.mark.parametrize("name", list(FAMILIES))
def test_block_loads_batches_of_its_kind(own_data, name):
    kind = own_data[name]
    data = data_module(kind["block"])
    block = yaml.safe_load(kind["block"].read_text())["data"]["init_args"]
    mapper, size = block["mapper"]["init_args"], block["batch_size"]
    extra = {}
    if name == "Unpaired domains":  # which build each domain reads: the folder its --out came from
        sources = {option(args, "--out"): Path(option(args, "--source")).name for args in kind["args"]}
        extra["domains"] = {d: sources[url.split("/train/")[0]] for d, url in block["train_urls"].items()}
        assert set(extra["domains"].values()) == set(sources.values())  # each domain's own build
    train = manifest_counts(block["train_urls"])
    per_epoch = min(train.values()) // size
    assert per_epoch >= 1
    loader, seen = data.train_dataloader(), []
    for _ in range(2 if per_epoch >= 2 else 3):  # a few batches, into a second epoch
        epoch = batches(data, loader)
        assert len(epoch) == per_epoch  # the manifest sizes the epoch
        seen += epoch
    for batch in seen:
        CHECKS[name](batch, kind["made"], mapper, **extra)
    held_out = batches(data, data.val_dataloader())
    for batch in held_out:
        CHECKS[name](batch, kind["made"], mapper, **extra)
    keys = [k for batch in held_out for k in batch.get("key", batch.get("key_a", []))]
    assert len(keys) == min(manifest_counts(block["val_urls"]).values()) >= 1


# -- the blocks a family trains on, with the section's `kiln fit` lines --------------------------

FITS = [(name, line) for name, kind in README_KINDS.items() for line in kind["fit"]]


def defaults(cls: type) -> dict:
    return {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}


def resolve(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("name,line", FITS, ids=[family(line) for _, line in FITS])
def test_block_trains_its_family(own_data, name, line, tmp_path):
    kind = own_data[name]
    [line] = [fit for fit in kind["fit"] if family(fit) == family(line)]  # with the temporary paths
    args = shlex.split(line)[1:]
    assert args.count("my-data.yaml") == 1
    args[args.index("my-data.yaml")] = str(kind["block"])
    run = tmp_path / "run"
    args[args.index("--run_dir") + 1] = str(run)
    args += ["--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
             "--wandb.mode", "disabled", "--data.init_args.strict", "true", *FAST.get(family(line), [])]
    r = kiln(*args)
    assert r.returncode == 0, f"{line}\n{r.stderr[-3000:]}"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["kiln"]["family"] == family(line) and ckpt["global_step"] == 2

    # The run's data is the block's and nothing else: no key of the family's own data set is left
    # over (a key the block leaves out has WebDataModule's or the mapper's default), only the
    # command line's --data overrides change it (the section's, and this test's strict).
    block = yaml.safe_load(kind["block"].read_text())["data"]
    ran = yaml.safe_load((run / "config.yaml").read_text())["data"]
    mapper = block["init_args"]["mapper"]
    assert ran["class_path"] == block["class_path"] and ran["init_args"]["mapper"]["class_path"] == mapper["class_path"]
    want = defaults(resolve(block["class_path"])) | {k: v for k, v in block["init_args"].items() if k != "mapper"}
    want_mapper = defaults(resolve(mapper["class_path"])) | mapper["init_args"]
    for flag, value in zip(args, args[1:]):
        if flag.startswith("--data.init_args.mapper.init_args."):
            want_mapper[flag.rpartition(".")[2]] = yaml.safe_load(value)
        elif flag.startswith("--data.init_args."):
            want[flag.rpartition(".")[2]] = yaml.safe_load(value)
    got_mapper = ran["init_args"].pop("mapper")["init_args"]
    assert json.loads(json.dumps(ran["init_args"])) == json.loads(json.dumps(want))
    assert json.loads(json.dumps(got_mapper)) == json.loads(json.dumps(want_mapper))
    # ... and it gives the model images at the model's own size.
    model = yaml.safe_load((run / "config.yaml").read_text())["model"]["init_args"]
    assert got_mapper["image_size"] == model.get("vision", model)["image_size"]
