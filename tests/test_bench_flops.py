"""FLOP model: a hand count on a tiny config, and torch's own FLOP counter on the fused modules."""
from __future__ import annotations

import pytest

from conftest import TINY_HEAD_PARAMS

from clipfuse.runtime.methods import METHODS

from clipfuse.benchmarks.flops import VitShape, head_flops

TINY = "ViT-T-16-test"
# ViT-T-16-test: width 128, 3 layers, 4 heads, patch 16, MLP 512, embed 64 (export/model_configs)
TINY_SHAPE = VitShape(width=128, layers=3, heads=4, patch=16, mlp_width=512, embed_dim=64)


def test_shape_from_config_matches_the_tiny_model():
    assert VitShape.from_config(TINY) == TINY_SHAPE


def test_hand_count_sclip_and_clearclip_tiny_32px():
    # S=32: N=4 patches, T=5 tokens; 3 class names. Written out by hand, one product at a time.
    patch = 2 * 4 * (3 * 16 * 16) * 128                       # 786_432
    qkv = 2 * 5 * 128 * 384                                   # 491_520
    tt = 2 * 5 * 5 * 128                                      # one T x T product over all heads: 6_400
    out_proj = 2 * 5 * 128 * 128                              # 163_840
    mlp = 2 * 5 * 128 * 512 * 2                               # 1_310_720
    block = qkv + 2 * tt + out_proj + mlp                     # 1_978_880
    proj = 2 * 4 * 128 * 64                                   # 65_536
    cls = 2 * 4 * 64 * 3                                      # 1_536
    sclip_last = qkv + 3 * tt + out_proj + mlp                # qq^T, kk^T, then A v
    clear_last = qkv + 2 * tt + out_proj                      # qq^T and A v; no FFN
    assert patch + 2 * block + sclip_last + proj + cls == 6_796_544
    got = head_flops("sclip", TINY_SHAPE, 32, 3)
    assert got["total"] == 6_796_544
    assert got["trunk_blocks"] == 2 * 1_978_880
    assert head_flops("clearclip", TINY_SHAPE, 32, 3)["total"] == patch + 2 * block + clear_last + proj + cls
    # NACLIP has the same products as ClearCLIP (kk instead of qq; its Gaussian bias is element-wise)
    assert head_flops("naclip", TINY_SHAPE, 32, 3)["total"] == head_flops("clearclip", TINY_SHAPE, 32, 3)["total"]
    # RCS adds only element-wise work to NACLIP (the mean of tapped attention maps, the mix)
    assert head_flops("rcs", TINY_SHAPE, 32, 3) == head_flops("naclip", TINY_SHAPE, 32, 3)


def test_hand_count_maskclip_and_dinoiser_tiny_32px():
    value = 2 * 5 * 128 * 128
    last = value + 2 * 5 * 128 * 128 + 2 * 5 * 128 * 512 * 2  # V, out_proj, FFN; no attention
    base = 786_432 + 2 * 1_978_880 + 65_536 + 1_536
    assert head_flops("maskclip", TINY_SHAPE, 32, 3)["total"] == base + last
    # the exported graph's packed in_proj also computes Q and K
    exported = head_flops("maskclip", TINY_SHAPE, 32, 3, as_exported=True)["total"]
    assert exported - (base + last) == 2 * 5 * 128 * 256
    dino = head_flops("clip-dinoiser", TINY_SHAPE, 32, 3)
    conv3 = 2 * 4 * (9 * 128) * 256                           # obj_proj
    conv1 = 2 * 4 * 128                                       # bkg_decoder
    corr = 2 * 4 * 4 * 256                                    # P^T P
    pool = 2 * 64 * 4 * 4                                     # F A^T
    assert dino["total"] == base + last + conv3 + conv1 + corr + pool


def test_rejects_size_not_multiple_of_patch():
    with pytest.raises(ValueError):
        head_flops("sclip", TINY_SHAPE, 40, 3)


@pytest.mark.parametrize("size", [64, 96])
def test_matches_torch_flop_counter_on_fused_modules(tiny_clip, size):
    """torch.utils.flop_counter counts every matmul/conv the fused module really runs (2 per MAC)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clipfuse.export.api import ImageExportSpec, build_fused

    vocab = [["background"], ["cat", "kitty"], ["dog"]]
    assert VitShape.from_visual(tiny_clip.model.visual) == TINY_SHAPE
    for head in METHODS:
        if (size // 16) ** 2 <= METHODS[head].default_head_params().get("lof_k", 0):
            continue            # SC-CLIP's LOF needs more than lof_k patches (64 px: 16; 96 px: 36)
        build = build_fused(ImageExportSpec(head, model=TINY, pretrained="none", classes=vocab, size=size,
                                            templates="single", head_params=TINY_HEAD_PARAMS.get(head, {})),
                            clip=tiny_clip)
        image = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            build.module(image)
        per_image = counter.get_total_flops() // 2
        assert per_image == head_flops(head, TINY_SHAPE, size, 4, build.head_params, as_exported=True)["total"], head


def test_vitb16_totals_scale_as_expected():
    shape = VitShape(width=768, layers=12, heads=12, patch=16, mlp_width=3072, embed_dim=512)
    f224 = head_flops("maskclip", shape, 224, 21)
    # 12 blocks of ViT-B/16 at 197 tokens: 24*T*D^2 + 4*T^2*D each -> 11 unchanged blocks
    assert f224["trunk_blocks"] == 11 * (24 * 197 * 768 ** 2 + 4 * 197 ** 2 * 768)
    f448 = head_flops("maskclip", shape, 448, 21)
    # 4x the patches; attention is quadratic, so a bit more than 4x
    assert 4.0 < f448["total"] / f224["total"] < 4.6
