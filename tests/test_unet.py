"""Unit tests for the shared diffusion U-Net (modules/blocks/unet.py): shapes, conditioning,
masking, gradients, activation checkpointing, the attention block's optional GEGLU feed-forward
and the papers' parameter counts on the meta device."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kiln.modules.blocks.transformer import Transformer
from kiln.modules.blocks.unet import AttentionBlock, ResBlock, UNet


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors here are tiny: on busy shared cores intra-op threads cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), head_channels=8)


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter: the zero-initialised output layers would otherwise hide every
    path into the output (an untrained U-Net outputs zeros whatever its inputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _count(**kwargs) -> int:
    with torch.device("meta"):
        model = UNet(**kwargs)
    assert all(p.is_meta for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kwargs, size", [
    (TINY, 16),
    (dict(TINY, channel_mult=(1, 2, 2)), 28),  # 28 -> 14 -> 7 needs no padding
    (dict(TINY, channel_mult=(1, 1, 2, 2), attention_levels=(2, 3)), 28),  # 7 -> 3 would not: padded
    (dict(TINY, channels=32, num_res_blocks=(1, 2), resblock_updown=False, scale_shift_norm=False), 12),
    (dict(TINY, channels=24, groups=32, attention_levels=(0, 1)), 10),  # 24 and 48 channels: divisor groups
    (dict(TINY, ff_mult=2), 16),
])
def test_output_shape_equals_input_shape(kwargs, size):
    model = _randomise(UNet(**kwargs))
    x = torch.randn(2, 3, size, size + 2)
    out = model(x, torch.tensor([3, 999]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_untrained_output_is_zero_and_learned_variance_doubles_channels():
    model = UNet(in_channels=6, out_channels=6, **TINY)  # GLIDE upsampler: low-res image concatenated
    out = model(torch.randn(2, 6, 16, 16), torch.tensor([0.5, 17.25]))  # fractional timesteps too
    assert out.shape == (2, 6, 16, 16)
    assert torch.equal(out, torch.zeros_like(out))
    x = torch.randn(2, 3, 16, 16)
    assert UNet(out_channels=6, **TINY)(x, torch.tensor([1, 2])).shape == (2, 6, 16, 16)


@pytest.mark.parametrize("mode", ["concat_kv", "cross"])
def test_padded_context_tokens_do_not_affect_output(mode):
    torch.manual_seed(0)
    model = _randomise(UNet(context_dim=12, context_mode=mode, **TINY)).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 500])
    context = torch.randn(2, 6, 12)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 2 + [False] * 4])
    out = model(x, t, context, mask)

    changed_padding = context.clone()
    changed_padding[~mask] = torch.randn(int((~mask).sum()), 12) * 100
    torch.testing.assert_close(model(x, t, changed_padding, mask), out, rtol=0, atol=1e-6)

    changed_token = context.clone()
    changed_token[:, 0] += 1.0
    assert not torch.allclose(model(x, t, changed_token, mask), out, atol=1e-4)
    # without the mask the padding is attended to
    assert not torch.allclose(model(x, t, changed_padding), model(x, t, context), atol=1e-4)


def test_cross_attention_with_no_real_token_is_finite_and_ignores_context():
    model = _randomise(UNet(context_dim=12, context_mode="cross", **TINY)).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 500])
    none_real = torch.zeros(2, 6, dtype=torch.bool)
    out = model(x, t, torch.randn(2, 6, 12), none_real)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, model(x, t), rtol=0, atol=1e-6)


def test_pooled_and_class_conditioning_change_output():
    model = _randomise(UNet(pooled_dim=10, num_classes=5, **TINY)).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 500])
    pooled, y = torch.randn(2, 10), torch.tensor([1, 3])
    out = model(x, t, pooled=pooled, y=y)
    assert not torch.allclose(model(x, t, pooled=pooled + 1, y=y), out, atol=1e-4)
    assert not torch.allclose(model(x, t, pooled=pooled, y=torch.tensor([2, 4])), out, atol=1e-4)
    assert not torch.allclose(model(x, t * 0 + 900, pooled=pooled, y=y), out, atol=1e-4)


@pytest.mark.parametrize("mode, ff_mult", [("concat_kv", 0), ("cross", 0), ("concat_kv", 2), ("cross", 3)])
def test_gradient_reaches_every_parameter(mode, ff_mult):
    model = UNet(context_dim=12, context_mode=mode, pooled_dim=10, num_classes=5, dropout=0.1,
                 ff_mult=ff_mult, **TINY)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 500])
    cond = dict(context=torch.randn(2, 6, 12), context_mask=torch.tensor([[1, 1, 0, 0, 0, 0]] * 2).bool(),
                pooled=torch.randn(2, 10), y=torch.tensor([1, 3]))

    # at init only the zero-initialised output conv can learn; one step opens the way in
    (model(x, t, **cond) - x).square().mean().backward()
    zero_grad = [n for n, p in model.named_parameters() if not p.grad.abs().sum()]
    assert "out.2.weight" not in zero_grad and "down.0.0.conv_in.weight" in zero_grad
    model.zero_grad()

    _randomise(model)  # stands in for training having moved every zero-initialised layer
    (model(x, t, **cond) - x).square().mean().backward()
    zero_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert zero_grad == []


def test_checkpoint_gives_same_output_and_gradients():
    kwargs = dict(TINY, context_dim=12, pooled_dim=10, dropout=0.2)
    plain = _randomise(UNet(**kwargs))
    ckpt = UNet(checkpoint=True, **kwargs)
    ckpt.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 500])
    cond = dict(context=torch.randn(2, 6, 12), context_mask=torch.tensor([[1, 1, 1, 0, 0, 0]] * 2).bool(),
                pooled=torch.randn(2, 10))
    outs = []
    for model in (plain, ckpt):
        torch.manual_seed(7)  # same dropout masks; checkpoint recomputation must replay them
        out = model(x, t, **cond)
        out.square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_shard_units_cover_the_blocks():
    model = UNet(context_dim=12, **TINY)
    units = [m for m in model.modules() if isinstance(m, UNet.shard_units)]
    assert {type(m) for m in units} == {ResBlock, AttentionBlock}
    in_units = sum(p.numel() for m in units for p in m.parameters())
    assert in_units > 0.9 * sum(p.numel() for p in model.parameters())


def test_meta_build_matches_cpu_count():
    kwargs = dict(TINY, context_dim=12, pooled_dim=10, num_classes=5)
    assert _count(**kwargs) == sum(p.numel() for p in UNet(**kwargs).parameters())


def test_invalid_configs_raise():
    for bad in (dict(num_res_blocks=(1, 2, 3)), dict(attention_levels=(2,)), dict(context_mode="add"),
                dict(ff_mult=-1)):
        with pytest.raises(ValueError):
            UNet(**dict(TINY, **bad))


# ------------------------------------------------------------------ the feed-forward

@pytest.mark.parametrize("kwargs, params, tensors", [
    (TINY, 208_947, 144),
    (dict(TINY, context_dim=12), 212_275, 152),
    (dict(TINY, context_dim=12, context_mode="cross"), 220_979, 176),
])
def test_default_has_no_feed_forward_and_unchanged_parameters(kwargs, params, tensors):
    # counts taken before ff_mult existed: configs and checkpoints from then still fit exactly
    for model in (UNet(**kwargs), UNet(ff_mult=0, **kwargs)):
        state = model.state_dict()
        assert sum(p.numel() for p in model.parameters()) == params and len(state) == tensors
        assert not any(".ff." in key for key in state)
        assert all(block.ff is None for block in model.modules() if isinstance(block, AttentionBlock))


@pytest.mark.parametrize("mode", ["concat_kv", "cross"])
@pytest.mark.parametrize("ff_mult", [1, 4])
def test_feed_forward_parameter_count(mode, ff_mult):
    # per attention block of width C: LayerNorm 2C, value and gate C x 2mC + 2mC, out mC x C + C
    kwargs = dict(TINY, channel_mult=(1, 2, 3), attention_levels=(1, 2), context_dim=12, context_mode=mode)
    widths = [block.norm.num_channels for block in UNet(**kwargs).modules() if isinstance(block, AttentionBlock)]
    assert sorted(set(widths)) == [32, 48]  # levels 1 and 2, and the middle block
    extra = sum(3 * ff_mult * c * c + 2 * ff_mult * c + 3 * c for c in widths)
    assert _count(ff_mult=ff_mult, **kwargs) - _count(**kwargs) == extra


@pytest.mark.parametrize("mode", ["concat_kv", "cross"])
def test_feed_forward_is_pre_norm_geglu_starting_as_identity(mode):
    torch.manual_seed(0)
    plain = _randomise(AttentionBlock(16, 8, context_dim=12, context_mode=mode)).eval()
    block = AttentionBlock(16, 8, context_dim=12, context_mode=mode, ff_mult=3).eval()
    missing, unexpected = block.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and sorted(missing) == sorted(f"ff.{k}" for k in block.ff.state_dict())
    x, context = torch.randn(2, 16, 5, 6), torch.randn(2, 4, 12)
    mask = torch.tensor([[True, True, False, False], [True] * 4])
    before = plain(x, context, mask)
    # the zero-initialised output layer: the untrained feed-forward adds nothing
    torch.testing.assert_close(block(x, context, mask), before, rtol=0, atol=0)

    _randomise(block.ff, seed=1)
    ff = block.ff
    tokens = before.flatten(2).transpose(1, 2)  # (N, H*W, C)
    value, gate = ff["proj"](F.layer_norm(tokens, (16,), ff["norm"].weight, ff["norm"].bias)).chunk(2, dim=-1)
    assert value.shape[-1] == 3 * 16
    expected = before + ff["out"](value * F.gelu(gate)).transpose(1, 2).reshape(before.shape)
    out = block(x, context, mask)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, before, atol=1e-3)


def test_feed_forward_with_checkpoint_gives_same_output_and_gradients():
    kwargs = dict(TINY, context_dim=12, context_mode="cross", ff_mult=2)
    plain = _randomise(UNet(**kwargs))
    ckpt = UNet(checkpoint=True, **kwargs)
    ckpt.load_state_dict(plain.state_dict())
    x, t, context = torch.randn(2, 3, 8, 8), torch.tensor([5, 500]), torch.randn(2, 6, 12)
    outs = [model(x, t, context) for model in (plain, ckpt)]
    for out in outs:
        out.square().mean().backward()
    torch.testing.assert_close(outs[1], outs[0])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


# ------------------------------------------------------------------ the papers' sizes

ADM_64 = dict(in_channels=3, out_channels=6, channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
              attention_levels=(1, 2, 3), head_channels=64)


def test_adm_imagenet64_parameter_count():
    # ADM's class-conditional 64x64 ImageNet model has 296M parameters (Dhariwal & Nichol 2021):
    # checks the block layout against a published count before widening it to GLIDE's.
    assert _count(**ADM_64, num_classes=1000) == pytest.approx(296e6, rel=0.01)


def test_glide_base_unet_parameter_count():
    # GLIDE 4.1: ADM-64 widened to 512 channels, text transformer of width 2048 whose tokens feed
    # every attention layer and whose final token is added to the timestep embedding;
    # 3.5B in all, about 2.3B of it the U-Net (the transformer's 24 x 2048 blocks are 1.2B).
    count = _count(**dict(ADM_64, channels=512), context_dim=2048, pooled_dim=2048)
    assert count == pytest.approx(2.3e9, rel=0.05)


def test_glide_upsampler_parameter_count():
    # GLIDE 4.1: the 64 -> 256 upsampler is 1.5B with its text encoder; 384 channels and text width
    # 1024 are the paper's. The rest is the released upsampler's layout, which the paper widens:
    # mult 1,1,2,2,4,4, 2 res blocks, attention at 32, 16 and 8 px, a 16-block text transformer
    # with a 50,257-token vocabulary and 128 positions.
    unet = _count(in_channels=6, out_channels=6, channels=384, channel_mult=(1, 1, 2, 2, 4, 4),
                  num_res_blocks=2, attention_levels=(3, 4, 5), head_channels=64,
                  context_dim=1024, pooled_dim=1024)
    with torch.device("meta"):
        text = nn.ModuleList([Transformer(1024, 16, 16), nn.Embedding(50257, 1024), nn.LayerNorm(1024)])
    text_count = sum(p.numel() for p in text.parameters()) + 128 * 1024
    assert unet + text_count == pytest.approx(1.5e9, rel=0.05)
