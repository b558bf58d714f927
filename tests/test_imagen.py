"""Imagen: the frozen text encoder (the packaged MiniLM, and the real T5 path on a tiny T5 the test
saves itself, from a directory and an fsspec URL) stays frozen and out of the optimizer, EMA and
checkpoints; the Efficient U-Net is built as the paper describes; noise-conditioning augmentation;
a three-stage cascade chained by checkpoints is sampled and judged stage by stage; dynamic
thresholding keeps high-guidance samples in range where static clipping saturates; the paper
configs' sizes; `kiln eval --prompts`; and a short run on digits learns (the full Fashion-MNIST
checks: tests/test_imagen_learning.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, kiln, learn_on_digits, perturbed
from kiln.modules.blocks.efficient_unet import SKIP_SCALE, EfficientUNet
from kiln.modules.blocks.unet import AttentionBlock, Downsample, ResBlock, Upsample
from kiln.modules.imagen.lit_module import ImagenModule
from kiln.modules.pretrained.text_encoders import FrozenTextEncoder
from kiln.trainers.commands.plan import plan

pytestmark = pytest.mark.usefixtures("one_thread")

MINILM = {"kind": "minilm", "max_length": 12}
TINY = dict(image_size=8, channels=1, text_encoder=MINILM,
            unet={"channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
                  "head_channels": 16}, sample_steps=4, sampler="ddim")
TINY_SR = dict(stage="sr", channels=1, text_encoder=MINILM, unet_type="efficient", sample_steps=3, sampler="ddim",
               unet={"channels": 16, "channel_mult": [1, 2], "num_res_blocks": [1, 1], "attention_levels": [],
                     "cross_attention_levels": [1], "head_channels": 16})


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> Path:
    """A T5 encoder with random weights and a tokenizer trained on a few captions, saved as a
    Hugging Face directory (config.json, model.safetensors, tokenizer.json)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(["a photo of a dress", "a pair of chinos", "a backpack", "red heart"] * 10,
                            trainers.UnigramTrainer(vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"],
                                                    unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>")
    path = tmp_path_factory.mktemp("t5-tiny")
    tokenizer.save_pretrained(path)
    config = transformers.T5Config(vocab_size=tokenizer.vocab_size, d_model=32, d_ff=64, d_kv=8, num_layers=2,
                                   num_heads=4, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0)
    torch.manual_seed(0)
    transformers.T5EncoderModel(config).save_pretrained(path)
    return path


def test_t5_from_a_directory_and_from_an_fsspec_url(tiny_t5):
    import fsspec

    encoder = FrozenTextEncoder("t5", path=str(tiny_t5), max_length=8)
    tokens, mask, pooled = encoder(["a photo of a dress", ""])
    assert tokens.shape == (2, 8, 32) and encoder.dim == 32 and pooled.shape == (2, 32)
    assert mask[1].sum() == 1 and tokens[1, 1:].abs().sum() == 0  # "" is the end token alone; padding is zero
    assert torch.allclose(pooled[0], tokens[0][mask[0]].mean(0))
    fs = fsspec.filesystem("memory")
    fs.put(f"{tiny_t5}/", "/models/t5-tiny/", recursive=True)
    again, _, _ = FrozenTextEncoder("t5", path="memory://models/t5-tiny", max_length=8)(["a photo of a dress", ""])
    assert torch.equal(again, tokens)
    with pytest.raises(FileNotFoundError, match="text encoder directory not found: memory://models/none"):
        FrozenTextEncoder("t5", path="memory://models/none")


def test_t5_imagen_stage_keeps_the_encoder_frozen_and_out_of_its_state(tiny_t5, tmp_path):
    """Frozen weights: not trainable, not in the optimizer, the module tree, the state dict (so
    neither in checkpoints nor under DDP/FSDP2/EMA), and left unchanged by a training step."""
    module = ImagenModule(**{**TINY, "text_encoder": {"kind": "t5", "path": str(tiny_t5), "max_length": 8}})
    encoder = module.text_encoder
    assert all(not p.requires_grad for p in encoder.parameters()) and not encoder.training
    own = {id(p) for p in module.parameters()}
    assert not own & {id(p) for p in encoder.parameters()}
    assert not any(k.startswith("text_encoder") for k in module.state_dict())
    import lightning as L

    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    batches = [{"image": torch.rand(4, 1, 8, 8) * 2 - 1, "caption": ["a backpack", "", "a tote", "a purse"]}] * 2
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in module.model.parameters()}
    assert all(p.grad is None for p in encoder.parameters()) and not encoder.training
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_minilm_conditions_the_unet_and_encodings_are_memoised():
    module = perturbed(ImagenModule(**TINY))
    noise = torch.randn(2, 1, 8, 8)
    a = module.sample(["a photo of a dress", "a photo of a dress"], noise, guidance_scale=3.0)
    b = module.sample(["a photo of a dress", "a backpack"], noise, guidance_scale=3.0)
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])  # batch-independent; the text matters
    assert "a backpack" in module.text_encoder._cache and module.text_encoder.dim == 384


def test_efficient_unet_follows_the_paper():
    """Res blocks of a level run at its lower resolution (downsample first, upsample last), skips
    enter the up path scaled by 1/sqrt(2), and a cross-attention-only level has no self-attention."""
    net = EfficientUNet(1, 1, 16, (1, 2, 4), (1, 2, 3), attention_levels=(1,), cross_attention_levels=(2,),
                        head_channels=16, context_dim=12, pooled_dim=12, augmentation_level=True)
    assert isinstance(net.down[1][0], Downsample) and isinstance(net.up[0][-1], Upsample)
    assert sum(isinstance(b, ResBlock) for b in net.down[2]) == 3 and sum(isinstance(b, ResBlock) for b in net.down[0]) == 1
    cross_only, both = net.down[2][-1], net.down[1][-1]
    assert isinstance(cross_only, AttentionBlock) and cross_only.qkv is None and cross_only.cross is not None
    assert both.qkv is not None and both.cross is not None
    sizes = {}
    for i, stage in enumerate(net.down):
        stage[-1].register_forward_hook(lambda m, a, out, i=i: sizes.__setitem__(i, out.shape[-1]))
    concatenated = []
    net.up[1][0].register_forward_pre_hook(lambda m, args: concatenated.append(args[0]))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 900])
    context, mask = torch.randn(2, 5, 12), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
        skips = []
        hooks = [s.register_forward_hook(lambda m, a, out: skips.append(out)) for s in (net.down[1][-1],)]
        out = net(x, t, context, mask, torch.randn(2, 12), augmentation_t=torch.tensor([0, 500]))
    assert out.shape == x.shape and sizes == {0: 16, 1: 8, 2: 4}
    assert torch.allclose(concatenated[0][:, -skips[0].shape[1]:], skips[0] * SKIP_SCALE)
    other = net(x, t, context, mask, torch.randn(2, 12), augmentation_t=torch.tensor([999, 999]))
    assert not torch.allclose(out, other)  # the augmentation level reaches the network
    with pytest.raises(ValueError, match="pass augmentation_t"):
        net(x, t, context, mask)
    for h in hooks:
        h.remove()


def test_noise_augmentation_noises_the_input_to_the_level_it_reports():
    module = ImagenModule(**{**TINY_SR, "image_size": 8, "low_res_size": 4})
    low = torch.rand(64, 1, 8, 8) * 2 - 1
    clean, t0 = module.augment(low, torch.zeros(64))
    noised, t1 = module.augment(low, torch.ones(64))
    assert (t0 == 0).all() and (t1 == 999).all()
    assert (clean - low).abs().mean() < 0.02 and (noised - low).abs().mean() > 0.5
    no_aug = ImagenModule(**{**TINY_SR, "image_size": 8, "low_res_size": 4, "noise_augmentation": False})
    assert no_aug.model.unet.augmentation_embed is None and module.model.unet.augmentation_embed is not None


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="uses the efficient U-Net"):
        ImagenModule(stage="sr", image_size=8, low_res_size=4, text_encoder=MINILM)
    with pytest.raises(ValueError, match="low_res_size below image_size"):
        ImagenModule(**{**TINY_SR, "image_size": 8})
    with pytest.raises(ValueError, match="unet.context_dim follows"):
        ImagenModule(**{**TINY, "unet": {**TINY["unet"], "context_dim": 3}})
    with pytest.raises(ValueError, match="text encoder kind"):
        ImagenModule(**{**TINY, "text_encoder": {"kind": "clip"}})


def _stage_config(tmp_path: Path, digits: Path, name: str, model: str, steps: int = 2) -> Path:
    config = tmp_path / f"{name}.yaml"
    config.write_text(learn_on_digits(model, digits, image_size=16, batch_size=8, steps=steps, ema_decay=0.9,
                                      mapper="ImageText"))
    return config


CASCADE = {
    "base": """\
model:
  class_path: kiln.modules.imagen.lit_module.ImagenModule
  init_args:
    image_size: 4
    channels: 1
    text_encoder: {kind: minilm, max_length: 12}
    unet: {channels: 16, channel_mult: [1, 2], num_res_blocks: 1, attention_levels: [1], head_channels: 16}
    sample_steps: 3
    eval_prompts: ["a handwritten digit 0", "a handwritten digit 1"]
""",
    "sr": """\
model:
  class_path: kiln.modules.imagen.lit_module.ImagenModule
  init_args:
    stage: sr
    name: sr{size}
    image_size: {size}
    low_res_size: {low}
    channels: 1
    text_encoder: {{kind: minilm, max_length: 12}}
    unet_type: efficient
    unet: {{channels: 16, channel_mult: [1, 2], num_res_blocks: [1, 1], attention_levels: [],
            cross_attention_levels: [1], head_channels: 16}}
    sample_steps: 3
    eval_prompts: ["a handwritten digit 0", "a handwritten digit 1"]
    previous_ckpt: {previous}
""",
}


@pytest.mark.slow
def test_three_stage_cascade_is_sampled_and_judged_stage_by_stage(digits, tmp_path):
    """base 4 px -> sr 8 px -> sr 16 px, each trained on its own (two steps) and chained by its
    checkpoint: `kiln sample` writes every stage, `kiln eval` judges every stage under its name and
    the last one against bicubic; `--augmentation-level` is a sampling override."""
    env = {"PYTHONPATH": str(REPO)}
    ckpt = None
    for name, model in (("base", CASCADE["base"]),
                        ("sr8", CASCADE["sr"].format(size=8, low=4, previous="{previous}")),
                        ("sr16", CASCADE["sr"].format(size=16, low=8, previous="{previous}"))):
        config = _stage_config(tmp_path, digits, name, model.replace("{previous}", str(ckpt)))
        r = kiln("fit", "-c", str(config), "--run_dir", str(tmp_path / name), env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        ckpt = tmp_path / name / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert not any("text_encoder" in k for k in saved["state_dict"])
    out = tmp_path / "samples"
    r = kiln("sample", "--ckpt", str(ckpt), "--prompt", "a handwritten digit 7", "--num", "2",
             "--augmentation-level", "0.3", "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    from PIL import Image

    sizes = {stage: Image.open(next((out / stage).glob("*.png"))).size for stage in ("base", "sr8", "sr16")}
    assert sizes == {"base": (4, 4), "sr8": (8, 8), "sr16": (16, 16)}
    metrics = tmp_path / "m.json"
    r = kiln("eval", "--ckpt", str(ckpt), "--extractor", "judge-digits", "--num-samples", "16", "--no-untrained",
             "--augmentation-level", "0.5", "--out", str(metrics), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(metrics.read_text())
    for stage in ("base", "sr8", "sr16"):
        assert m[f"{stage}/samples"] == 16 and m[f"{stage}/fid"] >= 0, m
    assert m["l1"] >= 0 and m["l1_baseline"] >= 0 and m["sampling/augmentation_level"] == 0.5


def test_eval_prompts_file_errors_are_one_line(tmp_path):
    from kiln.trainers.commands.evaluate import read_labelled_prompts

    good = tmp_path / "p.tsv"
    good.write_text("# class\tprompt\n3\tan evening gown\n\n8\ta tote\n")
    assert read_labelled_prompts(str(good)) == [(3, "an evening gown"), (8, "a tote")]
    bad = tmp_path / "bad.tsv"
    bad.write_text("3\tan evening gown\nan evening gown\n")
    with pytest.raises(ValueError, match=r"bad.tsv:2: expected `class index<TAB>prompt`"):
        read_labelled_prompts(str(bad))
    with pytest.raises(FileNotFoundError, match="prompts file not found"):
        read_labelled_prompts(str(tmp_path / "none.tsv"))
    repo_set = read_labelled_prompts(str(REPO / "configs" / "imagen" / "fashion-mnist-unseen.tsv"))
    assert len(repo_set) >= 30 and {y for y, _ in repo_set} == set(range(10))
    training = {f"a photo of a {c}" for c in ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal",
                                               "shirt", "sneaker", "bag")} | {"a photo of an ankle boot"}
    assert not {p for _, p in repo_set} & training


def test_labelled_prompts_choose_the_prompt_and_the_label():
    module = perturbed(ImagenModule(**{**TINY, "eval_prompts": ["a handwritten digit 0", "a handwritten digit 1"]}))
    module.use_labelled_prompts([(7, "seven"), (2, "two")])
    out = module.generate_for_eval([0, 1, 2], seed=0)
    assert out[""][1].tolist() == [7, 2, 7]
    module.use_labelled_prompts(None)
    assert module.generate_for_eval([0, 1, 2], seed=0)[""][1].tolist() == [0, 1, 0]


LEARN_MODEL = """\
model:
  class_path: kiln.modules.imagen.lit_module.ImagenModule
  init_args:
    image_size: 8
    channels: 1
    text_encoder: {{kind: minilm, max_length: 12}}
    unet: {{channels: 32, channel_mult: [1, 2], num_res_blocks: 1, attention_levels: [1], head_channels: 32}}
    dynamic_threshold: null
    lr: 2.0e-3
    warmup_steps: 50
    sample_steps: 25
    guidance_scale: 3.0
    eval_prompts: [{prompts}]
"""


@pytest.fixture(scope="module")
def short_run(digits, tmp_path_factory) -> Path:
    """The in-suite learning check's run: 300 steps on the 1,497 training digits."""
    prompts = ", ".join(f'"a handwritten digit {d}"' for d in range(10))
    tmp = tmp_path_factory.mktemp("imagen-digits")
    config = tmp / "imagen-digits.yaml"
    config.write_text(learn_on_digits(LEARN_MODEL.format(prompts=prompts), digits, image_size=8, batch_size=64,
                                      steps=300, ema_decay=0.995, mapper="ImageText"))
    r = kiln("fit", "-c", str(config), "--run_dir", str(tmp / "run"), env={"PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp / "run" / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_short_run_on_digits_draws_the_named_digit(short_run, tmp_path):
    """`kiln eval`: judge accuracy of guided samples and FID on the judge's features vs untrained."""
    out = tmp_path / "m.json"
    r = kiln("eval", "--ckpt", str(short_run), "--extractor", "judge-digits", "--judge", "digits", "--num-samples",
             "300", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(out.read_text())
    print(json.dumps(m, indent=1))
    assert m["judge/accuracy"] >= 0.6 and m["judge/accuracy_untrained"] <= 0.25
    assert m["fid"] < m["fid_untrained"] / 3


@pytest.mark.slow
def test_dynamic_thresholding_keeps_high_guidance_samples_in_range(short_run):
    """At guidance 10 the x0 estimates overshoot [-1, 1]: static clipping pins them to the ends,
    dynamic thresholding (p = 0.995) rescales each sample so that few pixels end saturated."""
    from kiln.trainers.checkpoints.checkpoint import open_run

    module = open_run(str(short_run), "sample from")[1].eval()
    prompts = [f"a handwritten digit {d}" for d in range(10)] * 4
    noise = torch.randn(len(prompts), 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def saturated(threshold):
        images = module.sample(prompts, noise, guidance_scale=10.0, dynamic_threshold=threshold)
        return (images.abs() >= 0.999).float().mean().item()

    static, dynamic = saturated(None), saturated(0.995)
    print({"saturated_static": static, "saturated_dynamic": dynamic})
    # measured on 2026-12-08: 15.5% static, 0.23% dynamic
    assert static >= 0.1 and dynamic <= static / 10, (static, dynamic)


# The paper (Saharia et al. 2022, Section 4.1): a 2B base, 600M 64 -> 256 and 400M 256 -> 1024 U-Nets; the count
# compared is the trainable network (the U-Net with its cross-attention projections, and the text LayerNorm),
# T5-XXL's frozen encoder apart. The shapes the paper's text describes build 2.50B / 0.477B / 0.469B: 25% over,
# 20% under and 17% over, short of the 5% (RESULTS.md, docs/paper-sizes.md); strict, so that a config
# brought within 5% fails here until the test says so.
PAPER = [("paper-base", 2.0e9, 2_502_014_979), ("paper-sr256", 6.0e8, 477_015_043), ("paper-sr1024", 4.0e8, 468_614_147)]


@pytest.mark.xfail(strict=True, reason="the paper's stated shapes miss its stated counts by 17-25% (RESULTS.md)")
@pytest.mark.parametrize("config,paper,built", PAPER)
def test_paper_sizes_within_5_percent(config, paper, built):
    assert plan([f"configs/imagen/{config}.yaml"], nodes=64, gpus_per_node=8)["parameters"] == pytest.approx(paper, rel=0.05)


@pytest.mark.parametrize("config,paper,built", PAPER)
def test_paper_configs_plan_with_t5_xxl_frozen(config, paper, built):
    """`kiln plan` builds T5-XXL's encoder from its config on the meta device (no weights), counts
    it as frozen, and holds it whole on every rank."""
    result = plan([f"configs/imagen/{config}.yaml"], nodes=64, gpus_per_node=8)
    assert result["parameters"] == built and result["components"]["unet"] < built
    t5_xxl = result["frozen_networks"]["text_encoder"]
    assert t5_xxl == pytest.approx(4.76e9, rel=0.01) and result["frozen_parameters"] == t5_xxl
    for name, gpu in result["memory_per_gpu"].items():
        assert gpu["parameters"] >= 4 * t5_xxl, name


def test_sr_stage_upsamples_given_images_and_trains_on_crops():
    """An sr stage alone draws from input images (`kiln sample --input`) at its output size, each
    output independent of the batch; `train_crop` trains on crops with matching low-resolution crops."""
    module = perturbed(ImagenModule(**{**TINY_SR, "image_size": 16, "low_res_size": 8}))
    inputs = torch.rand(3, 1, 8, 8) * 2 - 1
    out = module.generate(2, seed=1, prompts=["a", "b", "c"], inputs=inputs)
    assert out.shape == (6, 1, 16, 16)
    alone = module.generate(2, seed=1, prompts=["a"], inputs=inputs[:1])
    assert torch.allclose(out[:2], alone, atol=1e-5)
    with pytest.raises(ValueError, match="2 prompts for 3 input images"):
        module.generate(1, prompts=["a", "b"], inputs=inputs)
    cropped = ImagenModule(**{**TINY_SR, "image_size": 16, "low_res_size": 8, "train_crop": 8})
    x0 = cropped._crop(torch.rand(4, 1, 16, 16))
    assert x0.shape == (4, 1, 8, 8) and cropped.low_res(x0).shape == (4, 1, 4, 4)
    assert cropped.upsampled(cropped.low_res(x0)).shape == (4, 1, 8, 8)
    with pytest.raises(ValueError, match="train_crop"):
        ImagenModule(**{**TINY_SR, "image_size": 16, "low_res_size": 8, "train_crop": 5})
