"""RegNetY trunk: presets, golden complexity, forward/backward, activation checkpointing, bad configs."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torchvision

import seer
from seer import hardware
from seer.models.regnet import PRESETS, RegNetCfg, build_trunk, complexity, get_preset

SMALL = ["regnety_200mf", "regnety_400mf", "regnety_600mf", "regnety_800mf", "regnety_1_6gf", "regnety_3_2gf"]
LARGE = [name for name in PRESETS if name not in SMALL]

# Published SEER / pycls presets (stage widths, depths, trunk params, GMACs at 224).
GOLDEN_SEER = {
    "regnety_32gf": ([232, 696, 1392, 3712], [2, 5, 12, 1], 141.3e6, 32.3e9),
    "regnety_64gf": ([328, 984, 1968, 4920], [2, 5, 12, 1], 276.5e6, 64.1e9),
    "regnety_128gf": ([528, 1056, 2904, 7392], [2, 7, 17, 1], 637.4e6, 127.5e9),
    "regnety_256gf": ([746, 1492, 4103, 10444], [2, 7, 17, 1], 1272.2e6, 254.4e9),
    "regnety_10b": ([2020, 4040, 11110, 28280], [2, 7, 17, 1], 9.32e9, 1863e9),
}

# torchvision names of the presets it ships: an independent implementation to check widths and parameter counts.
TORCHVISION = {
    "regnety_400mf": "regnet_y_400mf",
    "regnety_800mf": "regnet_y_800mf",
    "regnety_1_6gf": "regnet_y_1_6gf",
    "regnety_3_2gf": "regnet_y_3_2gf",
    "regnety_8gf": "regnet_y_8gf",
    "regnety_16gf": "regnet_y_16gf",
}


def tiny_cfg() -> RegNetCfg:
    return RegNetCfg(depth=6, w0=16, wa=16.0, wm=2.0, group_w=8)  # widths 16, 32, 64, 128; depths 1, 1, 3, 1


@pytest.mark.parametrize("name", list(GOLDEN_SEER))
def test_golden_seer_complexity(name):
    widths, depths, params, macs = GOLDEN_SEER[name]
    c = complexity(name)
    assert c["widths"] == widths
    assert c["depths"] == depths
    assert c["params"] == pytest.approx(params, rel=0.005)
    assert c["macs"] == pytest.approx(macs, rel=0.005)


TIMM = {
    "regnety_200mf": "regnety_002", "regnety_400mf": "regnety_004", "regnety_600mf": "regnety_006",
    "regnety_800mf": "regnety_008", "regnety_1_6gf": "regnety_016", "regnety_3_2gf": "regnety_032",
    "regnety_4gf": "regnety_040", "regnety_6_4gf": "regnety_064", "regnety_8gf": "regnety_080",
    "regnety_12gf": "regnety_120", "regnety_16gf": "regnety_160", "regnety_32gf": "regnety_320",
}  # fmt: skip


@pytest.mark.parametrize("name", list(TIMM))
def test_widths_depths_params_match_timm(name):
    """timm builds pycls's widths (Python rounding in the width/group compatibility step)."""
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ref = timm.create_model(TIMM[name], num_classes=0)
    stages = [ref.get_submodule(f"s{i}") for i in range(1, 5)]
    c = complexity(name)
    assert c["widths"] == [stage.b1.conv3.conv.out_channels for stage in stages]
    assert c["depths"] == [len(list(stage.children())) for stage in stages]
    assert c["params"] == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_layouts_buildable(name):
    """torchvision rounds half-up in the compatibility step, so some of its stages differ from pycls
    (regnet_y_800mf stage 2: 144 vs 128); ``RegNetCfg.from_stages`` builds its exact layout."""
    ref = getattr(torchvision.models, TORCHVISION[name])(weights=None)  # torchvision's init fails on meta
    stages = list(ref.trunk_output.children())
    widths = [stage[-1].f.c[0].out_channels for stage in stages]
    depths = [len(stage) for stage in stages]
    group_ws = [w // stage[-1].f.b[0].groups for w, stage in zip(widths, stages)]
    ref_params = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("fc."))
    assert complexity(name)["depths"] == depths
    c = complexity(RegNetCfg.from_stages(widths, depths, group_ws))
    assert (c["widths"], c["params"]) == (widths, ref_params)


def test_from_stages_roundtrip():
    cfg = RegNetCfg.from_stages([64, 144, 320, 784], [1, 3, 8, 2], 16)
    assert cfg.widths == [64, 144, 320, 784] and cfg.depths == [1, 3, 8, 2]
    from seer.models.regnet import resolve_cfg

    assert resolve_cfg(cfg.to_dict()) == cfg
    trunk = build_trunk(cfg, device="meta")
    assert trunk.num_features == 784
    with pytest.raises(ValueError, match="multiple of group width"):
        RegNetCfg.from_stages([64, 150], [1, 1], 16)


@pytest.mark.parametrize("name", list(PRESETS))
def test_complexity_params_equal_built_model(name):
    trunk = build_trunk(name, device="meta")
    assert all(p.is_meta for p in trunk.parameters())
    assert sum(p.numel() for p in trunk.parameters()) == complexity(name)["params"]
    assert trunk.num_features == complexity(name)["widths"][-1]


def test_10b_on_meta_allocates_nothing():
    trunk = build_trunk("regnety_10b", device="meta")
    assert all(t.is_meta for t in list(trunk.parameters()) + list(trunk.buffers()))
    assert trunk.num_features == 28280
    assert sum(p.numel() for p in trunk.parameters()) == pytest.approx(9.32e9, rel=0.005)


@pytest.mark.parametrize("name", SMALL)
def test_forward_backward_small_presets(name):
    torch.manual_seed(0)
    trunk = build_trunk(name)
    x = torch.randn(2, 3, 64, 64)
    feats = trunk(x)
    assert feats.shape == (2, trunk.num_features)
    feats.square().mean().backward()
    grads = [p.grad for p in trunk.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(feats).all()


def test_forward_stages_shapes_and_api():
    trunk = build_trunk("regnety_400mf").eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        stages = trunk.forward_stages(x)
        pooled = trunk(x)
    assert list(stages) == ["res2", "res3", "res4", "res5"]
    widths = complexity("regnety_400mf")["widths"]
    for (name, feat), width, stride in zip(stages.items(), widths, (4, 8, 16, 32)):
        assert feat.shape == (1, width, 96 // stride, 96 // stride), name
    torch.testing.assert_close(stages["res5"].mean((2, 3)), pooled)


def test_forward_stages_until_stops_after_that_stage():
    trunk = build_trunk(RegNetCfg.from_stages([8, 16, 24, 32], [1, 1, 2, 1], [8, 8, 8, 8])).eval()
    x = torch.randn(2, 3, 32, 32)
    ran = []
    for name, stage in zip(trunk.stage_names, trunk.stages):
        stage.blocks[0].register_forward_hook(lambda *_, name=name: ran.append(name))
    with torch.no_grad():
        full = trunk.forward_stages(x)
        ran.clear()
        part = trunk.forward_stages(x, until="res3")
    assert list(part) == ["res2", "res3"] and ran == ["res2", "res3"]  # res4 / res5 never computed
    torch.testing.assert_close(part["res3"], full["res3"])
    assert list(trunk.forward_stages(x, until="res5")) == list(full)
    with pytest.raises(ValueError, match="res9"):
        trunk.forward_stages(x, until="res9")


def test_matches_timm_regnety():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("regnety_004", pretrained=False, num_classes=0).eval()
    trunk = build_trunk("regnety_400mf").eval()
    trunk.load_state_dict(ref.state_dict(), strict=True)  # same module names as timm
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(trunk(x), ref(x), rtol=1e-4, atol=1e-5)


def test_eval_bn_folding_equals_conv_then_bn():
    torch.manual_seed(0)
    trunk = build_trunk(tiny_cfg())
    # give the batch norms non-trivial statistics
    trunk.train()
    with torch.no_grad():
        for _ in range(3):
            trunk(torch.randn(4, 3, 64, 64) * 2 + 0.5)
    trunk.eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        folded = trunk(x)
        for m in trunk.modules():
            if hasattr(m, "fold_bn"):
                m.fold_bn = False
        plain = trunk(x)
    torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", [True, "stage", [[1], [1], [1, 3], []]])
def test_activation_checkpointing_equivalence(spec):
    torch.manual_seed(0)
    ref = build_trunk(tiny_cfg())
    ckpt = copy.deepcopy(ref)
    ckpt.set_grad_checkpointing(spec)
    assert ckpt.grad_checkpointing
    x = torch.randn(4, 3, 64, 64)
    out_ref, out_ck = ref(x), ckpt(x)
    torch.testing.assert_close(out_ck, out_ref, rtol=0, atol=0)
    out_ref.square().sum().backward()
    out_ck.square().sum().backward()
    for (name, p_ref), p_ck in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p_ck.grad, p_ref.grad, rtol=1e-5, atol=1e-6, msg=name)
    # recomputation must not update the batch-norm running statistics a second time
    for (name, b_ref), b_ck in zip(ref.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(b_ck, b_ref, rtol=1e-6, atol=1e-7, msg=name)


def test_build_trunk_activation_checkpointing_switch():
    trunk = build_trunk("regnety_400mf", activation_checkpointing=[[1], [3], [3, 6], []])
    assert trunk.grad_checkpointing
    assert not build_trunk("regnety_400mf").grad_checkpointing
    with pytest.raises(ValueError, match="stage 2"):
        build_trunk("regnety_400mf", activation_checkpointing=[[1], [4], [6], []])  # stage 2 has 3 blocks
    with pytest.raises(ValueError, match="one list per stage"):
        build_trunk("regnety_400mf", activation_checkpointing=[[1]])


def test_channels_last_and_contiguous_inputs_agree():
    torch.manual_seed(0)
    trunk = build_trunk(tiny_cfg()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = trunk(x)
        b = trunk(x.contiguous(memory_format=torch.channels_last))
        slow = build_trunk(tiny_cfg(), channels_last=False).eval()
        slow.load_state_dict(trunk.state_dict())
        c = slow(x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)


def test_zero_init_last_bn():
    trunk = build_trunk(tiny_cfg(), zero_init_last_bn=True)
    assert all(b.conv3.bn.weight.abs().sum() == 0 for b in trunk.blocks())
    assert all(b.conv1.bn.weight.eq(1).all() for b in trunk.blocks())


def test_init_is_classyvision_style():
    torch.manual_seed(0)
    trunk = build_trunk("regnety_800mf")
    w = trunk.s3.b2.conv1.conv.weight  # 1x1, fan_out = out_channels
    assert w.std().item() == pytest.approx((2.0 / w.shape[0]) ** 0.5, rel=0.05)
    assert trunk.s3.b2.conv1.bn.weight.eq(1).all()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(depth=10, w0=30, wa=10.0, wm=2.0, group_w=8), "w0"),
        (dict(depth=10, w0=32, wa=10.0, wm=1.0, group_w=8), "wm"),
        (dict(depth=10, w0=32, wa=10.0, wm=0.5, group_w=8), "wm"),
        (dict(depth=0, w0=32, wa=10.0, wm=2.0, group_w=8), "depth"),
        (dict(depth=10, w0=32, wa=-1.0, wm=2.0, group_w=8), "wa"),
        (dict(depth=10, w0=32, wa=10.0, wm=2.0, group_w=0), "group_w"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"RegNetCfg\.{field}\b"):
        RegNetCfg(**kwargs)


def test_unknown_preset_lists_close_matches():
    with pytest.raises(ValueError, match="regnety_800mf") as info:
        get_preset("regnety_800gf")
    assert "unknown RegNet preset 'regnety_800gf'" in str(info.value)
    with pytest.raises(ValueError, match="unknown RegNet preset"):
        build_trunk("resnet50")


def test_preset_aliases():
    assert get_preset("regnet_y_1_6gf") is PRESETS["regnety_1_6gf"]
    assert get_preset("regnety_016") is PRESETS["regnety_1_6gf"]
    assert get_preset("regnety_1.6gf") is PRESETS["regnety_1_6gf"]
    assert get_preset("RG-256") is PRESETS["regnety_256gf"]


def test_bad_input_shapes():
    trunk = build_trunk(tiny_cfg())
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        trunk(torch.randn(3, 64, 64))
    with pytest.raises(TypeError, match="floating-point"):
        trunk(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_public_api_names():
    assert seer.PRESETS is PRESETS
    assert set(seer.complexity("regnety_400mf")) >= {"params", "macs", "widths", "depths"}
    assert seer.RegNetCfg is RegNetCfg


def test_cli_presets_table_and_custom_cfg():
    out = subprocess.run([sys.executable, "-m", "seer.cli", "presets"], capture_output=True, text=True, check=True)
    assert "regnety_10b" in out.stdout and "2020, 4040, 11110, 28280" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "seer.cli", "presets", "--cfg", "depth=13", "w0=24", "wa=36.44", "wm=2.49", "group_w=8"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "| custom | 24, 56, 152, 368 |" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "seer.cli", "presets", "--cfg", "depth=13", "w0=30", "wa=1", "wm=2", "group_w=8"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "RegNetCfg.w0" in bad.stderr


def test_inference_fast_path_matches_and_tracks_weight_changes():
    """inference_mode uses cached folded weights and fused oneDNN post-ops; results equal the plain path, and
    the cache follows in-place weight and running-statistic updates."""
    torch.manual_seed(0)
    trunk = build_trunk(tiny_cfg()).eval()
    x = torch.randn(2, 3, 64, 64)

    def plain():
        with torch.enable_grad():  # autograd on: no cache, no fused kernels
            return trunk(x).detach()

    with torch.inference_mode():
        fast = trunk(x)
    torch.testing.assert_close(fast, plain(), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        trunk.s2.b1.conv2.conv.weight.mul_(1.5)
        trunk.s3.b1.conv3.bn.running_var.mul_(2.0)
    with torch.inference_mode():
        fast = trunk(x)
    torch.testing.assert_close(fast, plain(), rtol=1e-4, atol=1e-5)


def test_cpu_bf16_autocast_runs_the_fused_path_in_bf16(fused_conv_spy):
    """Where oneDNN has bf16 kernels (forced, on any CPU), the folded convs run in bf16 under CPU bf16 autocast
    (they are not autocast ops, so without the cast they would silently stay fp32): the output is bf16 and close to
    the fp32 one; the bf16 fold is cached apart from the fp32 one; fp32 inference is unchanged after."""
    torch.manual_seed(0)
    trunk = build_trunk(tiny_cfg()).eval()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = trunk(x)
        with hardware.force("cpu_bf16", True), torch.autocast("cpu", dtype=torch.bfloat16):
            fused_conv_spy.clear()
            out = trunk(x)
            stages = trunk.forward_stages(x)
        folded, seen = trunk.s1.b1.conv1.__dict__["_fold_cache"][1], set(fused_conv_spy)
        again = trunk(x)
    assert seen == {torch.bfloat16}
    assert folded.dtype == torch.bfloat16
    assert out.dtype == torch.bfloat16 and all(v.dtype == torch.bfloat16 for v in stages.values())
    assert torch.nn.functional.cosine_similarity(out.float(), ref).min() > 0.999
    assert again.dtype == torch.float32
    torch.testing.assert_close(again, ref)  # the bf16 fold is cached apart from the fp32 one


def test_cpu_bf16_autocast_without_onednn_bf16_keeps_the_folded_convs_fp32(fused_conv_spy):
    """Where oneDNN has no bf16 kernels (forced, on any CPU; AVX2-only CPUs for real) nothing bf16 reaches the fused
    convolution, which would raise there: the folded convs and their cache stay fp32 and the result is close."""
    torch.manual_seed(0)
    trunk = build_trunk(tiny_cfg()).eval()
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = trunk(x)
        with hardware.force("cpu_bf16", False), torch.autocast("cpu", dtype=torch.bfloat16):
            fused_conv_spy.clear()
            out = trunk(x)
            stages = trunk.forward_stages(x)
            folded = trunk.s1.b1.conv1.__dict__["_fold_cache"][1]
            seen = set(fused_conv_spy)
            direct = trunk(x.to(torch.bfloat16))  # a bf16 tensor passed in by hand takes the unfused path too
    assert seen == {torch.float32} and set(fused_conv_spy) == {torch.float32}
    assert folded.dtype == torch.float32
    assert out.dtype == torch.float32 and set(stages) == {"res2", "res3", "res4", "res5"}
    assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.999
    assert torch.isfinite(direct).all() and torch.nn.functional.cosine_similarity(direct.float(), ref).min() > 0.99


def test_inference_in_place_se_gate_spares_hooked_outputs():
    """Without autograd the SE gate multiplies conv2's output in place, except when a hook on conv2 holds it."""
    torch.manual_seed(0)
    trunk = build_trunk(tiny_cfg()).eval()
    x = torch.randn(2, 3, 64, 64)
    kept = {}
    handle = trunk.s2.b1.conv2.register_forward_hook(lambda m, i, o: kept.update(out=o, copy=o.clone()))
    with torch.inference_mode():
        hooked = trunk(x)
    handle.remove()
    torch.testing.assert_close(kept["out"], kept["copy"], rtol=0, atol=0)  # the hooked output was not gated
    with torch.inference_mode():
        torch.testing.assert_close(trunk(x), hooked, rtol=0, atol=0)  # in place or not, the same features
    kept.clear()
    conv2 = trunk.s2.b1.conv2
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: kept.update(out=o, copy=o.clone()) if m is conv2 else None
    )
    try:
        with torch.inference_mode():
            trunk(x)
    finally:
        handle.remove()
    torch.testing.assert_close(kept["out"], kept["copy"], rtol=0, atol=0)  # global hooks are respected too


def test_bf16_strided_conv_on_tiny_inputs_runs_in_fp32():
    """oneDNN's bf16 backward of a stride-2 3x3 conv on a 1x1 input returns non-finite weight gradients now and then
    (measured 6-23 of 50 passes); ConvBN computes exactly those convs in fp32."""
    from seer.models.regnet import ConvBN, _bf16_tiny_strided

    block = ConvBN(16, 16, kernel_size=3, stride=2, groups=2)
    tiny, big = torch.randn(4, 16, 1, 1), torch.randn(4, 16, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _bf16_tiny_strided(tiny, block.conv) and not _bf16_tiny_strided(big, block.conv)
        with torch.no_grad():
            assert not _bf16_tiny_strided(tiny, block.conv)  # inference has no backward to get wrong
    assert not _bf16_tiny_strided(tiny, block.conv)  # fp32
    assert _bf16_tiny_strided(tiny.bfloat16(), block.conv)  # bf16 parameters (FSDP's bf16 policy)
    assert not _bf16_tiny_strided(tiny, ConvBN(16, 16, kernel_size=3, stride=1).conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(tiny)
    assert out.dtype == torch.bfloat16 and out.shape == (4, 16, 1, 1)


@pytest.mark.skipif(not hardware.cpu_bf16_kernels(), reason="needs oneDNN bf16 kernels (bf16 training is fp32 without)")
def test_bf16_multicrop_training_on_small_crops_keeps_gradients_finite():
    from seer.models.regnet import RegNetCfg

    torch.manual_seed(0)
    trunk = build_trunk(RegNetCfg(depth=6, w0=16, wa=16.0, wm=2.0, group_w=8))
    trunk.train()
    for it in range(12):  # without the fp32 path, a non-finite gradient showed up by iteration 3
        trunk.zero_grad()
        for res in (32, 16):  # a 16 px crop reaches the last stage at 1x1
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = trunk(torch.randn(64, 3, res, res))
            out.float().square().mean().backward()
        bad = [n for n, p in trunk.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert not bad, (it, bad)


def test_image_norm_makes_the_trunk_blind_to_per_image_brightness_and_colour_cast():
    torch.manual_seed(0)
    cfg = RegNetCfg(depth=2, w0=16, wa=0.0, wm=2.0, group_w=16, se_ratio=0.0, image_norm=True)
    trunk = build_trunk(cfg).eval()
    x = torch.randn(3, 3, 32, 32)
    # a different gain and offset per image and channel: what a colour cast or an exposure change does
    gain, offset = torch.rand(3, 3, 1, 1) * 2 + 0.5, torch.randn(3, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(trunk(x), trunk(x * gain + offset), atol=1e-3)  # eps: not exactly invariant
        plain = build_trunk(RegNetCfg(**{**cfg.to_dict(), "image_norm": False})).eval()
        plain.load_state_dict(trunk.state_dict())
        assert not torch.allclose(plain(x), plain(x * gain + offset), atol=1e-2)  # the switch is what does it
    std = seer.models.regnet.standardize_images(x * gain + offset)
    assert torch.allclose(std.mean((2, 3)), torch.zeros(3, 3), atol=1e-5)
    assert torch.allclose(std.std((2, 3), correction=0), torch.ones(3, 3), atol=1e-3)
    flat = seer.models.regnet.standardize_images(torch.full((1, 3, 8, 8), 0.7))  # a constant crop stays finite
    assert torch.equal(flat, torch.zeros_like(flat))
    assert seer.models.regnet.standardize_images(x.bfloat16()).dtype == torch.bfloat16


def test_image_norm_in_to_dict_only_when_on():
    off = RegNetCfg(depth=2, w0=16, wa=0.0, wm=2.0, group_w=16)
    assert "image_norm" not in off.to_dict()  # files written before the field existed read the same
    on = RegNetCfg(**{**off.to_dict(), "image_norm": True})
    assert on.to_dict()["image_norm"] is True and RegNetCfg(**on.to_dict()) == on
    with pytest.raises(ValueError, match="image_norm"):
        RegNetCfg(**{**off.to_dict(), "image_norm": "yes"})
