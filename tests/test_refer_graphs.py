"""Global-Local CLIP graphs: torch modules and exported ONNX vs an independent open_clip reference.

The reference runs open_clip's own VisionTransformer.forward (its nn.MultiheadAttention, its
pooling) on N copies of the image, with forward pre-hooks on the last K resblocks that multiply
the patch tokens by the soft masks: the public code's token masking, written without any clipfuse
module. Tolerance: 1e-4 absolute on raw features (random weights).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TOL = 1e-4
TINY32 = "ViT-T-32-refertest"


@pytest.fixture(scope="module")
def tiny32_clip(tmp_path_factory):
    """A tiny /32 ViT (grid 7, 4 blocks: block 0 runs unmasked) registered for this module only."""
    import open_clip
    from clipfuse.export.weights import load_clip

    folder = tmp_path_factory.mktemp("cfg")
    (folder / f"{TINY32}.json").write_text(json.dumps({
        "embed_dim": 48,
        "vision_cfg": {"image_size": 224, "layers": 4, "width": 64, "head_width": 32, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(folder)
    return load_clip(TINY32, "none", seed=3)


def normalise(pixels: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """NHWC 0..255 pixels -> NCHW float, the torchvision ToTensor + Normalize way."""
    x = pixels.permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def reference_global(visual, pixels: torch.Tensor, masks: torch.Tensor, masked_blocks: int = 3,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """open_clip forward on N copies + pre-hooks multiplying patch tokens by the masks."""
    n = masks.shape[0]
    weights = masks.reshape(n, -1)
    batch_first = getattr(visual.transformer, "batch_first", True)

    def hook(_module, args):
        x = args[0]
        if batch_first:
            scale = torch.cat([torch.ones(n, 1), weights], dim=1)[:, :, None]     # [N, T, 1]
        else:
            scale = torch.cat([torch.ones(n, 1), weights], dim=1).T[:, :, None]   # [T, N, 1]
        return (x * scale,) + tuple(args[1:])

    blocks = list(visual.transformer.resblocks)
    handles = [b.register_forward_pre_hook(hook) for b in blocks[len(blocks) - masked_blocks:]]
    try:
        with torch.no_grad():
            x = normalise(pixels, mean, std).expand(n, -1, -1, -1)
            return visual(x)
    finally:
        for h in handles:
            h.remove()


def reference_local(visual, crops_pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        x = (crops_pixels.permute(0, 3, 1, 2) / 255.0 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
            / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return visual(x)


def _inputs(grid, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand((1, 224, 224, 3), generator=gen) * 255.0     # float: never rounded
    masks = torch.rand((n, grid, grid), generator=gen)
    masks[0] = 1.0            # an all-ones mask must equal the plain image feature
    masks[1] = (masks[1] > 0.5).float()
    crops = torch.rand((n, 224, 224, 3), generator=gen) * 255.0
    return image, masks, crops


def _ort(path: Path, feeds: dict) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["features"], feeds)[0]


@pytest.mark.parametrize("which", ["tiny16", "tiny32"])
def test_torch_modules_match_hook_reference(which, tiny_clip, tiny32_clip):
    from clipfuse.export.refer_graphs import ReferGlobal, ReferLocal

    clip = tiny_clip if which == "tiny16" else tiny32_clip
    visual = clip.model.visual
    grid = 14 if which == "tiny16" else 7
    image, masks, crops = _inputs(grid, 5)
    glob = ReferGlobal(visual).eval()
    assert glob.grid == (grid, grid)
    with torch.no_grad():
        got = glob(image, masks)
        ref = reference_global(visual, image, masks)
        plain = visual(normalise(image))
    assert got.shape == (5, clip.model.visual.output_dim)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(got[0].numpy(), plain[0].numpy(), atol=TOL, rtol=0)   # mask of ones
    assert np.abs(got[2].numpy() - got[3].numpy()).max() > 1e-3                      # masks matter
    with torch.no_grad():
        np.testing.assert_allclose(ReferLocal(visual).eval()(crops).numpy(),
                                   reference_local(visual, crops).numpy(), atol=TOL, rtol=0)


def test_masked_blocks_and_clip_normalisation(tiny32_clip):
    from clipfuse.export.refer_graphs import ReferGlobal
    from clipfuse.export.trunk import CLIP_MEAN, CLIP_STD

    visual = tiny32_clip.model.visual
    image, masks, _ = _inputs(7, 3, seed=1)
    with torch.no_grad():
        got = ReferGlobal(visual, "clip", masked_blocks=2)(image, masks)
        ref = reference_global(visual, image, masks, masked_blocks=2, mean=CLIP_MEAN, std=CLIP_STD)
        other = reference_global(visual, image, masks, masked_blocks=3, mean=CLIP_MEAN, std=CLIP_STD)
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=TOL, rtol=0)
    assert np.abs(got.numpy() - other.numpy()).max() > 1e-3


def test_bad_options_are_one_line_errors(tiny_clip):
    from clipfuse.export.refer_graphs import ReferGlobal
    from clipfuse.runtime.errors import ClipfuseError

    with pytest.raises(ClipfuseError, match="masked_blocks"):
        ReferGlobal(tiny_clip.model.visual, masked_blocks=0)
    with pytest.raises(ClipfuseError, match="normalization"):
        ReferGlobal(tiny_clip.model.visual, "bogus")


def _export_and_compare(clip, prefix: Path, grid: int, n_masks: int, precision: str = "fp32"):
    from clipfuse.export.refer_export import export_refer

    written = export_refer(prefix, model=clip.model_name, pretrained="none", seed=clip.seed,
                           precision=precision, text=False)
    visual = clip.model.visual
    image, masks, crops = _inputs(grid, n_masks, seed=7)
    got_g = _ort(written["global"], {"image": image.numpy(), "masks": masks.numpy()})
    got_l = _ort(written["local"], {"crops": crops.numpy()})
    return written, got_g, reference_global(visual, image, masks).numpy(), got_l, \
        reference_local(visual, crops).numpy()


def test_export_refer_onnx_matches_reference_and_manifest(tiny32_clip, tmp_path):
    from clipfuse.runtime.fileio import sha256_file
    from clipfuse.runtime.manifest import read_manifest

    written, got_g, ref_g, got_l, ref_l = _export_and_compare(tiny32_clip, tmp_path / "r", 7, 6)
    np.testing.assert_allclose(got_g, ref_g, atol=TOL, rtol=0)
    np.testing.assert_allclose(got_l, ref_l, atol=TOL, rtol=0)
    # the masks axis is dynamic: one mask through the same graph
    image, masks, _ = _inputs(7, 2, seed=7)
    one = _ort(written["global"], {"image": image.numpy(), "masks": masks.numpy()[1:2]})
    np.testing.assert_allclose(one[0], reference_global(tiny32_clip.model.visual, image, masks)[1].numpy(),
                               atol=TOL, rtol=0)
    g, l = read_manifest(written["global"].with_suffix(".json")), read_manifest(written["local"].with_suffix(".json"))
    assert (g["kind"], l["kind"]) == ("refer-global", "refer-local")
    assert g["grid"] == [7, 7] and g["patch_size"] == 32 and g["embed_dim"] == 48
    assert g["normalization"] == {"name": "imagenet", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                                  "in_graph": True}
    assert g["refer"]["alpha"] == 0.95 and g["refer"]["alpha_by_dataset"]["refcocog"] == 0.85
    assert g["refer"]["masked_blocks"] == 3 and l["refer"]["fill"] == "public"
    assert g["inputs"][1]["shape"] == ["masks", 7, 7] and l["inputs"][0]["dtype"] == "float32"
    assert g["inputs"][0]["dtype"] == "float32" and g["refer"]["preprocess"] == "public-800"
    assert g["onnx_sha256"] == sha256_file(written["global"])
    assert not list(tmp_path.glob(".*part"))      # nothing half-written left behind


def test_export_refer_fp16(tiny_clip, tmp_path):
    pytest.importorskip("clipfuse.export.fp16")
    from clipfuse.runtime.manifest import read_manifest

    written, got_g, ref_g, got_l, ref_l = _export_and_compare(tiny_clip, tmp_path / "h", 14, 3, "fp16")
    assert read_manifest(written["global"].with_suffix(".json"))["precision"] == "fp16"
    for got, ref in ((got_g, ref_g), (got_l, ref_l)):
        assert np.isfinite(got).all()
        cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
        assert cos.min() > 0.999, cos


def test_export_refer_cli(tmp_path):
    from clipfuse.runtime.cli import main

    assert main(["export-refer", "--model", "ViT-T-16-test", "--pretrained", "none", "--no-text", "-q",
                 "--norm", "clip", "--alpha", "0.85", "-o", str(tmp_path / "cli")]) == 0
    manifest = json.loads((tmp_path / "cli-global.json").read_text())
    assert manifest["normalization"]["name"] == "clip" and manifest["refer"]["alpha"] == 0.85
    assert (tmp_path / "cli-local.onnx").is_file()
    assert main(["export-refer", "--model", "ViT-T-16-test", "--pretrained", "none", "--no-text", "-q",
                 "--alpha", "2", "-o", str(tmp_path / "bad")]) == 2
    assert not list(tmp_path.glob("bad*"))


@pytest.mark.slow
@pytest.mark.parametrize("model,grid", [("ViT-B-32", 7), ("ViT-B-16", 14)])
def test_full_size_onnx_parity(model, grid, tmp_path):
    from clipfuse.export.weights import load_clip

    clip = load_clip(model, "none", seed=0)
    _, got_g, ref_g, got_l, ref_l = _export_and_compare(clip, tmp_path / "b", grid, 4)
    err_g, err_l = np.abs(got_g - ref_g).max(), np.abs(got_l - ref_l).max()
    print(f"{model}: max|ONNX - reference| global {err_g:.2e}, local {err_l:.2e}")
    assert err_g <= TOL and err_l <= TOL
