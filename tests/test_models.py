import json

import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel

from conftest import tiny_unet
from diffseg_hf.errors import CheckpointError, RecipeError
from diffseg_hf.models import RESIDUAL_BLOCKS, DiffsegUNet2DModel, load_unet

BLOCKS = sorted(RESIDUAL_BLOCKS)


def _randomize(model):
    """Non-trivial weights everywhere (zero-initialised layers would hide wiring mistakes)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("block", BLOCKS)
def test_forward_shape_and_every_parameter_gets_a_gradient(block):
    model = tiny_unet(block)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 700])
    out = model(x, t).sample
    assert out.shape == (2, 1, 16, 16)
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_grad, no_grad


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("attn", [(), (8,), (16, 8)])
def test_save_load_round_trip_is_bit_identical(tmp_path, block, attn):
    model = _randomize(tiny_unet(block, attention_resolutions=attn, mid_attention=bool(attn),
                                 convnext_expansion=3)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "DiffsegUNet2DModel" and config["block"] == block
    loaded = load_unet(tmp_path)
    assert type(loaded) is DiffsegUNet2DModel
    as_json = lambda m: {k: v for k, v in json.loads(m.to_json_string()).items() if k != "_name_or_path"}
    assert as_json(loaded) == as_json(model)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([0, 999])
    with torch.no_grad():
        assert torch.equal(model(x, t).sample, loaded(x, t).sample)


def test_baseline_equals_stock_unet2dmodel():
    """Same config -> same parameter names, and the stock weights give the same outputs."""
    stock = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8, 16, 32),
                        layers_per_block=2, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                        attention_head_dim=8)
    ours = DiffsegUNet2DModel(sample_size=32, block_out_channels=(8, 16, 32), layers_per_block=2,
                              attention_resolutions=(8,), norm_num_groups=4, attention_head_dim=8)
    ours.load_state_dict(_randomize(stock).state_dict(), strict=True)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([5, 500])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t).sample, stock(x, t).sample, rtol=0, atol=1e-6)


def test_attention_under_bf16_autocast_uses_bf16_matmuls_and_matches_float32():
    """Under CPU autocast every attention tensor is bf16 (group norm and softmax keep float32 statistics inside
    torch's kernels: the softmax equals float32 softmax of the same scores rounded to bf16, bit for bit); the result
    equals float32 attention to bf16 tolerance. Outside autocast the processor is diffusers' SDPA computation, bit
    for bit."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from diffseg_hf.remote.diffseg_unet import FP32AttnProcessor, MixedPrecisionAttnProcessor

    ours = _randomize(DiffsegUNet2DModel(sample_size=16, block_out_channels=(8, 16), attention_resolutions=(8,),
                                         norm_num_groups=4, attention_head_dim=8))
    attn = ours.down_blocks[1].attentions[0]
    assert isinstance(attn.processor, MixedPrecisionAttnProcessor)
    seen, norm_seen = [], []
    attn.to_q.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    attn.group_norm.register_forward_hook(lambda m, i, o: norm_seen.append(o.dtype))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 500])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x, t).sample
    assert set(seen) == {torch.bfloat16} and set(norm_seen) == {torch.bfloat16}
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn.parameters())

    h = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    reference = attn.processor._fallback(attn, h)  # float32 SDPA, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = attn(h)
        attn.set_processor(FP32AttnProcessor())
        fp32 = attn(h)
    torch.testing.assert_close(fp32, reference, rtol=0, atol=1e-6)
    error = (mixed.float() - reference).abs().max() / reference.abs().max()
    assert 0 < error < 2e-2  # bf16 rounding, not a different computation

    q, k = (torch.randn(2, 3, 16, 8, generator=torch.Generator().manual_seed(s)).bfloat16() for s in (2, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = MixedPrecisionAttnProcessor.probs(attn, q, k)
    scores = torch.baddbmm(torch.empty(6, 16, 16, dtype=torch.bfloat16), q.flatten(0, 1),
                           k.flatten(0, 1).transpose(1, 2), beta=0, alpha=attn.scale)  # bf16, as the processor's
    expected = (q.float() @ k.float().transpose(-1, -2) * attn.scale).softmax(-1)
    assert probs.dtype == torch.bfloat16 and (probs.float() - expected).abs().max() < 1e-2
    assert torch.equal(probs, scores.float().softmax(-1).bfloat16().unflatten(0, (2, 3)))

    attn.set_processor(MixedPrecisionAttnProcessor())
    plain = attn(h)
    attn.set_processor(AttnProcessor2_0())
    assert torch.equal(plain, attn(h))


def test_recipe_can_build_the_stock_unet2dmodel():
    from diffseg_hf.build import build_unet
    from diffseg_hf.recipe import load_recipe

    stock = build_unet(load_recipe("fashion-cpu", ["model.implementation=diffusers"]))
    ours = build_unet(load_recipe("fashion-cpu"))
    assert type(stock) is UNet2DModel and stock.config.down_block_types[-1] == "AttnDownBlock2D"
    assert sorted(stock.state_dict()) == sorted(ours.state_dict())
    with pytest.raises(RecipeError, match="model.implementation=diffusers .* model.block=resnet"):
        load_recipe("fashion-cpu", ["model.implementation=diffusers", "model.block=convnext"])


def test_attention_placement_and_noattn():
    model = tiny_unet(attention_resolutions=(8,))
    assert model.down_blocks[0].attentions is None and model.down_blocks[1].attentions is not None
    assert model.up_blocks[0].attentions is not None and model.up_blocks[1].attentions is None
    none = tiny_unet(attention_resolutions=(), mid_attention=False)
    assert not any("attention" in n for n, _ in none.named_parameters())


def test_adagn_uses_scale_shift_and_keeps_mid_attention_norm():
    model = tiny_unet("adagn")
    resnet = model.down_blocks[0].resnets[0]
    # scale and shift: the time projection emits 2x the channels
    assert resnet.time_emb_proj.out_features == 2 * resnet.out_channels
    assert model.mid_block.attentions[0].group_norm is not None  # diffusers' scale_shift quirk avoided


def test_convnext_expansion_sets_width():
    model = tiny_unet("convnext", convnext_expansion=4)
    block = model.down_blocks[0].resnets[0]
    assert block.pw_expand.out_channels == 4 * 8 and block.depthwise.groups == 8


def test_gradient_checkpointing_matches_plain_backward():
    model = _randomize(tiny_unet("convnext"))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    model(x, t).sample.sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(x, t).sample.sum().backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_unknown_block_and_bad_groups():
    with pytest.raises(RecipeError, match="unknown block type 'foo'.*choose from"):
        tiny_unet("foo")
    with pytest.raises(RecipeError, match="not divisible by model.norm_num_groups"):
        tiny_unet(block_out_channels=(6, 16))


def test_loading_with_unset_parameters_is_an_error(tmp_path):
    model = tiny_unet()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["layers_per_block"] = 2  # the weights file lacks the second layer's parameters
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unset|size mismatch|cannot load"):
        load_unet(tmp_path)


def test_missing_and_corrupted_folders(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_unet(tmp_path)
    tiny_unet().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot load"):
        load_unet(tmp_path)
    tiny_unet().save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot load"):
        load_unet(tmp_path / "b")


def test_plugs_into_ddpm_pipeline(tmp_path):
    from diffseg_hf.schedule import make_scheduler

    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=make_scheduler("cosine", num_train_timesteps=10))
    images = pipe(batch_size=2, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 16, 16, 1)


def test_every_block_option_is_an_explicit_unet_argument():
    """register_to_config saves only explicit arguments: each declared option must be one, with its default."""
    import inspect

    from diffseg_hf.models import BLOCK_OPTIONS

    signature = inspect.signature(DiffsegUNet2DModel.__init__).parameters
    for key, default in BLOCK_OPTIONS.items():
        assert key in signature and signature[key].default == default, key
    assert tiny_unet("convnext", convnext_kernel_size=3).down_blocks[0].resnets[0].depthwise.kernel_size == (3, 3)


def test_depthwise_kernel_gradients_pass_gradcheck():
    from diffseg_hf.remote.diffseg_unet import _DepthwiseConv2d

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.double, requires_grad=True)
    for k, bias in ((3, True), (7, False)):  # a 7x7 kernel wider than the 5-px map: padding does the work
        w = torch.randn(3, 1, k, k, generator=g, dtype=torch.double, requires_grad=True)
        b = torch.randn(3, generator=g, dtype=torch.double, requires_grad=True) if bias else None
        assert torch.autograd.gradcheck(lambda x, w, b: _DepthwiseConv2d.apply(x, w, b, k // 2), (x, w, b))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_depthwise_kernel_matches_the_library_conv(channels_last, bf16):
    """Same outputs bit for bit, gradients within float tolerance (bf16: closer to fp64 than the library's)."""
    from diffseg_hf.remote.diffseg_unet import _DepthwiseConv2d

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 7, padding=3, groups=16)
    x = torch.randn(4, 16, 12, 12)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    conv64 = torch.nn.Conv2d(16, 16, 7, padding=3, groups=16).double()
    conv64.load_state_dict(conv.state_dict())
    x64 = x.detach().double().requires_grad_()
    conv64(x64).square().sum().backward()
    results = {}
    for fast in (True, False):
        x.grad, conv.weight.grad, conv.bias.grad = None, None, None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = _DepthwiseConv2d.apply(x, conv.weight, conv.bias, 3) if fast else conv(x)
        y.float().square().sum().backward()
        results[fast] = (y.detach(), x.grad, conv.weight.grad, conv.bias.grad)
    (y, gx, gw, gb), (y_lib, gx_lib, gw_lib, gb_lib) = results[True], results[False]
    assert y.dtype == y_lib.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert torch.equal(y, y_lib)
    assert gx.dtype == gw.dtype == gb.dtype == torch.float32
    truths = (x64.grad, conv64.weight.grad, conv64.bias.grad)
    for ours, lib, truth in zip((gx, gw, gb), (gx_lib, gw_lib, gb_lib), truths):
        if not bf16:
            assert (ours - lib).abs().max() <= 1e-5 * lib.abs().max()
            continue
        # bf16: the two kernels round in different places, and how far apart they land depends on the CPU's bf16
        # kernels (1.5% of the largest gradient on one AMD EPYC); what must hold is that ours is no further from
        # the fp64 truth than the library's (or within two bf16 ulps of it)
        def err(a):
            return ((a.double() - truth).abs().max() / truth.abs().max()).item()
        assert err(ours) <= max(1.1 * err(lib), 2 ** -7), (err(ours), err(lib))


def test_convnext_unet_is_the_same_function_with_either_depthwise_backward(monkeypatch):
    from diffseg_hf.remote.diffseg_unet import ConvNeXtBlock2D

    model = _randomize(tiny_unet("convnext"))
    x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor([5, 600])
    runs = []
    for fast in (True, False):
        monkeypatch.setattr(ConvNeXtBlock2D, "cpu_depthwise_kernel", fast)
        model.zero_grad()
        out = model(x, t).sample
        out.square().mean().backward()
        runs.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert torch.equal(runs[0][0], runs[1][0])
    for name, grad in runs[0][1].items():
        torch.testing.assert_close(grad, runs[1][1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_depthwise_dispatch_takes_the_kernel_except_where_torch_is_as_fast(monkeypatch):
    from diffseg_hf.remote import diffseg_unet

    calls = []
    monkeypatch.setattr(diffseg_unet._DepthwiseConv2d, "apply",
                        lambda *a: calls.append(1) or torch.nn.functional.conv2d(a[0], a[1], a[2], padding=3, groups=4))
    conv = torch.nn.Conv2d(4, 4, 7, padding=3, groups=4)
    x = torch.randn(2, 4, 8, 8)

    def takes_kernel(x, autocast=False):
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            diffseg_unet.depthwise_conv2d(conv, x)
        return bool(calls)

    assert takes_kernel(x) and takes_kernel(x, autocast=True)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    assert takes_kernel(nhwc, autocast=True) and not takes_kernel(nhwc)  # fp32 NHWC: torch's backward is as fast
    with torch.no_grad():
        assert not takes_kernel(x, autocast=True)
    monkeypatch.setattr(diffseg_unet.ConvNeXtBlock2D, "cpu_depthwise_kernel", False)
    assert not takes_kernel(x, autocast=True)
