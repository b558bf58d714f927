"""GLIDE: the text encoder conditions the U-Net as the paper does, guidance and seeds behave,
the paper-size configs have the paper's parameter counts, and a short run on digits learns to
draw the digit its caption names (the full Fashion-MNIST check is tests/test_glide_learning.py)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, kiln, learn_on_digits, perturbed
from kiln.modules.blocks.tokenizer import PAD, ByteTokenizer
from kiln.modules.glide.lit_module import GLIDEModule
from kiln.trainers.commands.plan import plan

TINY = dict(image_size=8, channels=1, text={"context_length": 24, "width": 32, "layers": 1, "heads": 2},
            unet={"channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
                  "head_channels": 16}, sample_steps=5)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_text_reaches_the_unet_and_padding_does_not():
    module = perturbed(GLIDEModule(**TINY))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    a = module.model(x, t, module.tokenize(["a handwritten digit 3"] * 2))
    b = module.model(x, t, module.tokenize(["a handwritten digit 7"] * 2))
    assert not torch.allclose(a, b)
    # The same caption with no padding at all (23 tokens) and with padding (24): the same output.
    unpadded = ByteTokenizer(23)(["a handwritten digit 3"] * 2)
    assert (unpadded != PAD).all() and torch.allclose(module.model(x, t, unpadded), a, atol=1e-5)
    assert a.shape == (2, 2, 8, 8)  # learned variance: mean and variance channels


def test_guidance_seeds_and_deterministic_ddim():
    module = perturbed(GLIDEModule(**TINY))
    module.hparams.sampler, module.hparams.guidance_scale = "ddim", 3.0  # sampling settings (Spec.options)
    one = module.generate(num=2, seed=3, prompts=["a handwritten digit 3"])
    again = module.generate(num=2, seed=3, prompts=["a handwritten digit 3"])
    assert one.shape == (2, 1, 8, 8) and torch.equal(one, again)  # DDIM, eta 0: noise fixes the sample
    assert not torch.equal(one[0], one[1])  # each image its own noise
    other = module.generate(num=2, seed=4, prompts=["a handwritten digit 3"])
    module.hparams.guidance_scale = 1.0
    unguided = module.generate(num=2, seed=3, prompts=["a handwritten digit 3"])
    assert not torch.equal(one, other) and not torch.equal(one, unguided)
    # generate_for_eval: sample i depends on (seed, i) only, whatever batch it is drawn in
    module.hparams.eval_prompts = [f"a handwritten digit {d}" for d in range(10)]
    images, labels = module.generate_for_eval([0, 1, 2, 13], seed=5)[""]
    alone, label = module.generate_for_eval([13], seed=5)[""]
    assert labels.tolist() == [0, 1, 2, 3] and label.tolist() == [3]
    assert torch.allclose(images[3], alone[0], atol=1e-5)


def test_upsampler_takes_the_low_resolution_image():
    module = perturbed(GLIDEModule(**{**TINY, "stage": "upsampler", "image_size": 8, "low_res_size": 4}))
    low = torch.rand(2, 1, 4, 4) * 2 - 1
    out = module.generate(num=1, seed=0, prompts=["a", "b"], inputs=low)
    assert out.shape == (2, 1, 8, 8)
    real, out, bicubic = module.super_resolution(torch.rand(2, 3, 8, 8) * 2 - 1, ["a", "b"])
    assert real.shape == out.shape == bicubic.shape == (2, 1, 8, 8)
    assert torch.equal(bicubic, module.upsampled(module.low_res(real)))
    with pytest.raises(ValueError, match="names no base_ckpt"):
        module.generate(num=1, seed=0, prompts=["a"])
    with pytest.raises(ValueError, match="needs low_res_size below image_size"):
        GLIDEModule(**{**TINY, "stage": "upsampler"})


def test_upsampler_is_judged_on_real_inputs_beside_bicubic(digits, tmp_path):
    """An upsampler without a base checkpoint: `evaluate_generative` feeds it the held-out images
    brought down to its input size and scores its output and bicubic upsampling side by side."""
    from kiln.datamodules.mappers import ImageText
    from kiln.datamodules.webdataset import WebDataModule
    from kiln.trainers.commands.evaluate import evaluate_generative

    data = WebDataModule(f"{digits}/train/*.tar", ImageText(image_size=8), val_urls=f"{digits}/test/*.tar",
                         batch_size=16, num_workers=0)
    module = perturbed(GLIDEModule(**{**TINY, "stage": "upsampler", "image_size": 8, "low_res_size": 4}))
    [m] = evaluate_generative([module], data, ["l1", "fid", "kid"], extractor="judge-digits", num_samples=32,
                              batch_size=16)
    assert set(m) == {"heldout/images", "l1", "l1_baseline", "fid", "fid_baseline", "kid", "kid_baseline"}, m
    assert m["heldout/images"] == 32 and all(v == v and v >= 0 for v in m.values())
    base = perturbed(GLIDEModule(**TINY))
    with pytest.raises(ValueError, match="l1 is for upsamplers"):
        evaluate_generative([base], data, ["l1"], extractor="judge-digits", num_samples=16, batch_size=16)


def test_upsampler_without_a_base_trains_past_the_sample_grid(digits, tmp_path):
    """The upsampler alone has nothing to draw a grid from (`sample_grid()` is None): the
    SampleGrid callback skips it instead of ending the run (it once did, at step 500)."""
    import lightning as L

    from kiln.datamodules.mappers import ImageText
    from kiln.datamodules.webdataset import WebDataModule
    from kiln.trainers.callbacks.samples import SampleGrid

    data = WebDataModule(f"{digits}/train/*.tar", ImageText(image_size=8), batch_size=8, num_workers=0)
    module = GLIDEModule(**{**TINY, "stage": "upsampler", "image_size": 8, "low_res_size": 4, "warmup_steps": 1})
    trainer = L.Trainer(max_steps=2, callbacks=[SampleGrid(str(tmp_path / "run"), every_n_steps=1)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert trainer.global_step == 2 and not (tmp_path / "run" / "samples").exists()


# Nichol et al. 2022, section 4.1 (docs/paper-sizes.md): base 3.5B (U-Net ~2.3B + text ~1.2B), upsampler 1.5B.
@pytest.mark.parametrize("config,total", [("paper-base", 3.5e9), ("paper-upsampler", 1.5e9)])
def test_paper_sizes(config, total):
    result = plan([f"configs/glide/{config}.yaml"], nodes=1, gpus_per_node=8)
    assert result["parameters"] == pytest.approx(total, rel=0.05)
    if config == "paper-base":
        assert result["components"]["unet"] == pytest.approx(2.3e9, rel=0.05)


LEARN_MODEL = """\
model:
  class_path: kiln.modules.glide.lit_module.GLIDEModule
  init_args:
    image_size: 8
    channels: 1
    text: {{context_length: 24, width: 48, layers: 1, heads: 4}}
    unet: {{channels: 32, channel_mult: [1, 2], num_res_blocks: 1, attention_levels: [1], head_channels: 32}}
    lr: 2.0e-3
    warmup_steps: 50
    sample_steps: 25
    guidance_scale: 3.0
    grid_prompts: ["a handwritten digit 0", "a handwritten digit 1", "a handwritten digit 2"]
    eval_prompts: [{prompts}]
"""


@pytest.mark.slow
def test_short_run_on_digits_draws_the_named_digit(digits, tmp_path):
    """The in-suite learning check: a minute of training on the 1,497 training digits, then
    `kiln eval` (judge accuracy of guided samples, FID on the judge's features vs untrained) and
    `kiln sample` from the checkpoint."""
    prompts = ", ".join(f'"a handwritten digit {d}"' for d in range(10))
    config = tmp_path / "glide-digits.yaml"
    config.write_text(learn_on_digits(LEARN_MODEL.format(prompts=prompts), digits, image_size=8, batch_size=64,
                                      steps=300, ema_decay=0.995, mapper="ImageText"))
    run = tmp_path / "run"
    r = kiln("fit", "-c", str(config), "--run_dir", str(run), env={"PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((run / "samples").glob("grid-step*.png"))
    ckpt = str(run / "checkpoints" / "last.ckpt")
    out = tmp_path / "m.json"
    r = kiln("eval", "--ckpt", ckpt, "--extractor", "judge-digits", "--judge", "digits", "--num-samples", "300",
             "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(out.read_text())
    print(json.dumps(m, indent=1))
    assert m["judge/accuracy"] >= 0.6 and m["judge/accuracy_untrained"] <= 0.25
    assert m["fid"] < m["fid_untrained"] / 3
    r = kiln("sample", "--ckpt", ckpt, "--prompt", "a handwritten digit 4", "--num", "3", "--steps", "10",
             "--sampler", "dpmpp_2m", "--out", str(tmp_path / "samples"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((tmp_path / "samples").glob("000*-a-handwritten-digit-4.png"))) == 3
    r = kiln("sample", "--ckpt", ckpt, "--class", "4", "--out", str(tmp_path / "samples"))
    assert r.returncode != 0 and "does not take --class (it takes: --prompt, --guidance-scale, --steps, " \
                                 "--sampler)" in r.stderr, r.stderr


def test_text_encoder_is_causal_and_pools_the_end_token():
    """As README says kiln's text transformer differs from the released GLIDE's (bidirectional,
    pooled at the last of its 128 positions, padding attended everywhere): attention is causal,
    the pooled vector is the end token's output, and the mask marks padding for the U-Net."""
    from kiln.modules.blocks.tokenizer import EOT

    module = perturbed(GLIDEModule(**TINY))
    tokens = module.tokenize(["a handwritten digit 3", "a handwritten digit 7"])
    out, pooled, mask = module.model.text(tokens)
    first = (tokens[0] != tokens[1]).nonzero()[0].item()  # the captions' first (and only) differing byte
    assert torch.allclose(out[0, :first], out[1, :first], atol=1e-6) and not torch.allclose(out[0, first], out[1, first])
    end = (tokens == EOT).nonzero()
    assert end[:, 0].tolist() == [0, 1] and torch.equal(pooled, out[end[:, 0], end[:, 1]])
    assert torch.equal(mask, tokens != PAD)
