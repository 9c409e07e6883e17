"""Global-Local CLIP pipeline: numpy pre-processing vs torch, end-to-end scores vs a torch
reference of the public code, the `refer` CLI (outputs and bad input) and `eval-refer` on a tiny
synthetic RefCOCO-format dataset (refs pickle + COCO instances JSON)."""
from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
import torch.nn.functional as F  # noqa: E402

from clipfuse.runtime.cli import main  # noqa: E402
from clipfuse.runtime.refer import pipeline as P  # noqa: E402

from test_refer_graphs import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

TOL = 1e-4


# ---------------------------------------------------------------------------------------------
# Pre-processing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("src,dst", [((37, 50), (7, 7)), ((5, 9), (224, 224)), ((224, 300), (224, 224))])
def test_resize_bilinear_matches_torch(src, dst):
    x = np.random.default_rng(0).random(src + (3,), dtype=np.float32)
    ref = F.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], size=dst, mode="bilinear",
                        align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(P.resize_bilinear_torch(x, dst), ref, atol=5e-5)   # torch: float32 coordinates


def test_grid_masks_are_soft_bilinear():
    masks = np.random.default_rng(1).random((4, 61, 83)) < 0.3
    ref = F.interpolate(torch.from_numpy(masks.astype(np.float32))[:, None], size=(14, 14), mode="bilinear",
                        align_corners=False)[:, 0].numpy()
    got = P.grid_masks(masks, (14, 14))
    assert got.dtype == np.float32 and got.shape == (4, 14, 14)
    np.testing.assert_allclose(got, ref, atol=5e-5)
    assert ((got > 0) & (got < 1)).any()           # soft values survive


def test_mask_boxes_hand_computed():
    m = np.zeros((3, 6, 10), bool)
    m[0, 1:3, 2:6] = True         # cols 2..5: cx 3.5, w 4 -> x 1.5..5.5; rows 1..2: cy 1.5, h 2 -> 0.5..2.5
    m[1, 4, [0, 9]] = True        # two far columns: cx 4.5, w 2 -> 3.5..5.5 (the public rule, not the extent); row 4: 3.5..4.5
    m[2, 0, 0] = True             # single pixel at the corner: -0.5..0.5 -> 0..0
    assert P.mask_boxes(m).tolist() == [[1, 0, 5, 2], [3, 3, 5, 4], [0, 0, 0, 0]]


def public_local_crops(image: np.ndarray, masks: np.ndarray, size: int = 224) -> torch.Tensor:
    """The public code's local branch in torch, in the NORMALISED space: image*m + (1-m)*fill with
    fill = (0.485, 0.456, 0.406), FreeSOLO box, crop, bilinear resize (no antialias)."""
    img = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    img = (img - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    fill = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    out = []
    for mask in torch.from_numpy(masks):
        m = mask.to(torch.uint8)[None, None]
        masked = img * m + (1 - m) * fill
        width_proj, height_proj = mask.any(0).float(), mask.any(1).float()
        cw = (width_proj * torch.arange(len(width_proj))).sum() / width_proj.sum()
        ch = (height_proj * torch.arange(len(height_proj))).sum() / height_proj.sum()
        w, h = width_proj.sum(), height_proj.sum()
        x1, y1, x2, y2 = (int(v) for v in torch.stack([cw - w / 2, ch - h / 2, cw + w / 2, ch + h / 2]).int())
        crop = masked[:, :, y1:y2, x1:x2]
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0])
    return torch.stack(out)


def _scene(h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    image = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    masks = np.zeros((3, h, w), bool)
    masks[0, 5:20, 3:30] = True
    masks[1, 22:38, 30:55] = True
    masks[2] = rng.random((h, w)) < 0.2
    return image, masks


def test_local_crops_match_public_code():
    image, masks = _scene()
    crops = P.local_crops(image, masks, IMAGENET_MEAN, IMAGENET_STD, fill="public")
    assert crops.shape == (3, 224, 224, 3) and crops.dtype == np.float32
    normalised = (crops / 255.0 - np.asarray(IMAGENET_MEAN)) / np.asarray(IMAGENET_STD)
    ref = public_local_crops(image, masks).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(normalised, ref, atol=TOL)
    # the fill colours normalise to the public constant / to zero
    for fill, expected in (("public", (0.485, 0.456, 0.406)), ("mean", (0.0, 0.0, 0.0))):
        px = P.fill_pixel(IMAGENET_MEAN, IMAGENET_STD, fill)
        np.testing.assert_allclose((px / 255.0 - IMAGENET_MEAN) / IMAGENET_STD, expected, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Graphs on disk: tiny refer graphs + the text graph, from one export-refer run
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graphs(tmp_path_factory, tiny_clip):
    from clipfuse.export.refer_export import export_refer

    prefix = tmp_path_factory.mktemp("refer") / "tiny"
    written = export_refer(prefix, model="ViT-T-16-test", pretrained="none", seed=tiny_clip.seed)
    assert sorted(written) == ["global", "local", "text"]
    return prefix


def test_end_to_end_scores_match_torch_reference(graphs, tiny_clip):
    import open_clip

    image, masks = _scene(seed=4)
    sentence = "The red ball on the left"
    seg = P.ReferSegmenter.open(graphs)
    try:
        result = seg.refer(image, masks, sentence, alpha=0.7, parser="heuristic")
    finally:
        seg.close()
    # reference: the public pipeline re-written in torch (tests/glclip_public_reference.py)
    import glclip_public_reference as public
    visual, model = tiny_clip.model.visual, tiny_clip.model
    f_g, f_l = public.public_features(visual, image, masks, masking_block=0)
    with torch.no_grad():
        tokens = open_clip.tokenize(["the red ball on the left", "the red ball"])
        t = model.encode_text(tokens)
    t = 0.5 * t[0] + 0.5 * t[1]
    f = 0.7 * f_g + 0.3 * f_l
    ref = (F.normalize(f, dim=-1) @ F.normalize(t, dim=0)).numpy()
    assert result.noun_phrase.phrase == "the red ball"
    np.testing.assert_allclose(result.scores, ref, atol=TOL)
    assert result.best == int(np.argmax(ref))
    assert result.ranking()[0] == result.best


def test_alpha_and_empty_mask_errors(graphs):
    from clipfuse.runtime.errors import ClipfuseError

    image, masks = _scene()
    seg = P.ReferSegmenter.open(graphs)
    try:
        with pytest.raises(ClipfuseError, match="alpha"):
            seg.refer(image, masks, "a dog", alpha=1.5)
        masks[1] = False
        with pytest.raises(ClipfuseError, match="proposal 1 is empty"):
            seg.refer(image, masks, "a dog")
        with pytest.raises(ClipfuseError, match="empty"):
            seg.refer(image, masks, "   ")
    finally:
        seg.close()


# ---------------------------------------------------------------------------------------------
# CLI: clipfuse refer
# ---------------------------------------------------------------------------------------------
def test_refer_cli_writes_mask_overlay_and_ranking(graphs, tmp_path):
    image, masks = _scene(seed=5)
    Image.fromarray(image).save(tmp_path / "photo.png")
    np.savez(tmp_path / "props.npz", masks=masks)
    out = tmp_path / "out"
    assert main(["refer", str(tmp_path / "photo.png"), "a man on the left", "-g", str(graphs),
                 "--masks", str(tmp_path / "props.npz"), "--parser", "heuristic", "-o", str(out)]) == 0
    report = json.loads((out / "photo.refer.json").read_text())
    best = report["best_proposal"]
    assert report["noun_phrase"] == "a man" and report["num_proposals"] == 3
    scores = [r["score"] for r in report["ranking"]]
    assert scores == sorted(scores, reverse=True) and report["ranking"][0]["proposal"] == best
    mask_png = np.asarray(Image.open(out / "photo.mask.png"))
    assert np.array_equal(mask_png > 0, masks[best])
    assert Image.open(out / "photo.overlay.png").size[1] == image.shape[0]


def test_refer_cli_soft_masks_score_as_the_pipeline_and_write_hard_outputs(graphs, tmp_path):
    """A float NPZ stays soft through the CLI: its scores equal the pipeline's on the soft masks
    (not on a 0.5-cut copy), and the mask PNG / area use pixels >= 0.5."""
    image, hard = _scene(seed=6)
    soft = hard.astype(np.float32) * 0.7
    soft[:, ::2] = hard[:, ::2]                        # rows of exact 1s (kept by the crop), rows of 0.7
    Image.fromarray(image).save(tmp_path / "photo.png")
    np.savez(tmp_path / "soft.npz", masks=soft)
    out = tmp_path / "out"
    assert main(["refer", str(tmp_path / "photo.png"), "the ball", "-g", str(graphs), "--masks",
                 str(tmp_path / "soft.npz"), "--parser", "heuristic", "-o", str(out)]) == 0
    report = json.loads((out / "photo.refer.json").read_text())
    seg = P.ReferSegmenter.open(graphs)
    try:
        want = seg.refer(image, soft, "the ball", parser="heuristic")
        cut = seg.refer(image, soft >= 0.5, "the ball", parser="heuristic")
    finally:
        seg.close()
    got = {r["proposal"]: r["score"] for r in report["ranking"]}
    np.testing.assert_allclose([got[i] for i in range(3)], want.scores, atol=1e-5)
    assert np.abs(want.scores - cut.scores).max() > 1e-4
    best = report["best_proposal"]
    assert np.array_equal(np.asarray(Image.open(out / "photo.mask.png")) > 0, hard[best])
    assert report["ranking"][0]["area"] == int(hard[best].sum())


def test_refer_cli_generates_proposals_without_masks(graphs, tmp_path):
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, :32] = (220, 40, 40)
    image[:, 32:] = (30, 60, 200)
    Image.fromarray(image).save(tmp_path / "two.png")
    assert main(["refer", str(tmp_path / "two.png"), "the blue half", "-g", str(graphs), "-o",
                 str(tmp_path / "o")]) == 0
    report = json.loads((tmp_path / "o" / "two.refer.json").read_text())
    assert report["proposals"] == "kmeans-colour" and report["num_proposals"] >= 2


@pytest.mark.parametrize("case,match", [
    ("empty", "referring expression is empty"),
    ("zero", "zero mask proposals"),
    ("size", "masks are 20x30 .* image is 40x56"),
])
def test_refer_cli_bad_input_is_one_line_error(case, match, graphs, tmp_path, capsys):
    import re

    image, masks = _scene()
    Image.fromarray(image).save(tmp_path / "p.png")
    sentence = "   " if case == "empty" else "a dog"
    props = {"empty": masks, "zero": np.zeros((0, 40, 56), bool), "size": np.ones((2, 20, 30), bool)}[case]
    np.savez(tmp_path / "m.npz", masks=props)
    capsys.readouterr()
    code = main(["refer", str(tmp_path / "p.png"), sentence, "-g", str(graphs), "--masks",
                 str(tmp_path / "m.npz"), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("clipfuse refer: error:")
    assert re.search(match, err), err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


# ---------------------------------------------------------------------------------------------
# eval-refer on a synthetic dataset in the REFER format
# ---------------------------------------------------------------------------------------------
def _polygon(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _write_dataset(root: Path):
    """2 images; annotations as polygons and RLE; refs with val/train splits, 5 val sentences."""
    imgdir = root / "images" / "mscoco" / "images" / "train2014"
    imgdir.mkdir(parents=True)
    rng = np.random.default_rng(9)
    images = []
    for image_id, (h, w) in ((11, (40, 56)), (12, (36, 48))):
        name = f"COCO_train2014_{image_id:012d}.png"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(imgdir / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    rle_mask = np.zeros((36, 48), bool)
    rle_mask[10:30, 20:40] = True
    flat = rle_mask.T.ravel()
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()   # starts with background
    anns = [
        {"id": 101, "image_id": 11, "category_id": 1, "iscrowd": 0, "segmentation": _polygon(3, 5, 29, 19)},
        {"id": 102, "image_id": 11, "category_id": 2, "iscrowd": 0, "segmentation": _polygon(30, 22, 54, 37)},
        {"id": 103, "image_id": 12, "category_id": 1, "iscrowd": 0,
         "segmentation": {"size": [36, 48], "counts": counts}},
        {"id": 104, "image_id": 12, "category_id": 3, "iscrowd": 0, "segmentation": _polygon(0, 0, 10, 8)},
    ]
    folder = root / "refcoco"
    folder.mkdir()
    (folder / "instances.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                       "categories": [{"id": i, "name": str(i)} for i in (1, 2, 3)]}))

    def sent(i, raw):
        return {"sent_id": i, "raw": raw, "sent": raw.lower(), "tokens": raw.lower().split()}

    refs = [
        {"ref_id": 1, "ann_id": 101, "image_id": 11, "split": "val", "category_id": 1, "sent_ids": [1, 2],
         "file_name": "x.jpg", "sentences": [sent(1, "Left man"), sent(2, "man on top left")]},
        {"ref_id": 2, "ann_id": 102, "image_id": 11, "split": "val", "category_id": 2, "sent_ids": [3],
         "file_name": "x.jpg", "sentences": [sent(3, "the dog at the bottom")]},
        {"ref_id": 3, "ann_id": 103, "image_id": 12, "split": "val", "category_id": 1, "sent_ids": [4, 5],
         "file_name": "x.jpg", "sentences": [sent(4, "big square"), sent(5, "the square in the middle")]},
        {"ref_id": 4, "ann_id": 104, "image_id": 12, "split": "train", "category_id": 3, "sent_ids": [6],
         "file_name": "x.jpg", "sentences": [sent(6, "corner thing")]},
    ]
    with open(folder / "refs(unc).p", "wb") as fh:
        pickle.dump(refs, fh, protocol=2)
    return rle_mask


def test_eval_refer_dataset_reader(tmp_path, monkeypatch):
    from clipfuse.runtime.refer.dataset import ReferDataset

    rle_mask = _write_dataset(tmp_path)
    data = ReferDataset(tmp_path, "refcoco", split="val")
    assert len(data) == 5 and [r.ref_id for r in data.refs] == [1, 2, 3]
    assert np.array_equal(data.ann_mask(103), rle_mask)
    assert data.image_masks(11).shape == (2, 40, 56)
    try:  # with pycocotools installed, polygons are COCO's own rasterisation (border excluded)
        from pycocotools import mask as coco_mask
        rle = coco_mask.frPyObjects(_polygon(0, 0, 10, 8), *data.ann_mask(104).shape)
        assert np.array_equal(data.ann_mask(104), coco_mask.decode(coco_mask.merge(rle)).astype(bool))
    except ImportError:
        pass
    monkeypatch.setitem(sys.modules, "pycocotools", None)   # the built-in rasteriser: border included
    assert data.ann_mask(104)[0:9, 0:11].all() and data.ann_mask(104).sum() == 9 * 11


def test_eval_refer_oracle_and_masks_dir(graphs, tmp_path):
    from clipfuse.runtime.refer.dataset import ReferDataset
    from clipfuse.runtime.refer.metrics import ReferMetrics

    _write_dataset(tmp_path)
    data = ReferDataset(tmp_path, "refcoco", split="val")
    # 1) proposals = the target alone -> every IoU is 1 (reader, target decoding, aggregation)
    props = tmp_path / "props"
    props.mkdir()
    np.savez(props / "11.npz", masks=np.stack([data.ann_mask(101) | data.ann_mask(102)]))
    np.savez(props / "COCO_train2014_000000000012.npz", masks=data.ann_mask(103)[None])
    out = tmp_path / "r1.json"
    assert main(["eval-refer", "-g", str(graphs), "--data", str(tmp_path), "--masks-dir", str(props),
                 "-o", str(out)]) == 0
    res = json.loads(out.read_text())
    iou_union = data.ann_mask(101).sum() / (data.ann_mask(101) | data.ann_mask(102)).sum()
    iou_union2 = data.ann_mask(102).sum() / (data.ann_mask(101) | data.ann_mask(102)).sum()
    assert [s["iou"] for s in res["samples"]] == pytest.approx([iou_union, iou_union, iou_union2, 1.0, 1.0], abs=1e-6)
    i = 2 * data.ann_mask(101).sum() + data.ann_mask(102).sum() + 2 * data.ann_mask(103).sum()
    u = 3 * (data.ann_mask(101) | data.ann_mask(102)).sum() + 2 * data.ann_mask(103).sum()
    assert res["summary"]["oIoU"] == pytest.approx(i / u)
    assert res["summary"]["mIoU"] == pytest.approx((2 * iou_union + iou_union2 + 2) / 5)
    assert res["summary"]["alpha"] == 0.95 and res["summary"]["expressions"] == 5
    # 2) a missing proposal file -> IoU 0 for that image's sentences, counted
    (props / "11.npz").unlink()
    assert main(["eval-refer", "-g", str(graphs), "--data", str(tmp_path), "--masks-dir", str(props),
                 "-o", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["summary"]["no_proposals"] == 3 and res["summary"]["mIoU"] == pytest.approx(2 / 5)
    # 3) oracle proposals: the eval equals ranking each sentence through the Python API
    assert main(["eval-refer", "-g", str(graphs), "--data", str(tmp_path), "--oracle-proposals",
                 "--parser", "heuristic", "--alpha", "0.8", "-o", str(out)]) == 0
    res = json.loads(out.read_text())
    seg = P.ReferSegmenter.open(graphs)
    expected = ReferMetrics()
    from clipfuse.runtime.imageio import read_image
    try:
        for ref in data.refs:
            image = read_image(data.image_path(ref.image_id))
            masks = data.image_masks(ref.image_id)
            for s in ref.sentences:
                r = seg.refer(image, masks, s["raw"], alpha=0.8, parser="heuristic")
                expected.add(masks[r.best], data.ann_mask(ref.ann_id))
    finally:
        seg.close()
    assert res["summary"]["mIoU"] == pytest.approx(expected.miou)
    assert res["summary"]["oIoU"] == pytest.approx(expected.oiou)
    assert all(s["iou"] in (0.0, 1.0) or 0 < s["iou"] < 1 for s in res["samples"])


def test_eval_refer_missing_annotations_is_one_line_error(graphs, tmp_path, capsys):
    code = main(["eval-refer", "-g", str(graphs), "--data", str(tmp_path), "--dataset", "refcocog"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "refs(umd).p" in err


def test_refer_cli_with_dense_model_proposals(graphs, tmp_path):
    from clipfuse.export.api import ImageExportSpec, export_image_graph
    from clipfuse.runtime.refer.masks import dense_label_map, generate_proposals

    dense = export_image_graph(ImageExportSpec("sclip", model="ViT-T-16-test", pretrained="none",
                                               classes=[["sky"], ["tree"], ["road"]], size=224, templates="single"),
                               tmp_path / "dense")
    image, _ = _scene(h=60, w=90, seed=6)
    labels = dense_label_map(dense, image)
    assert labels.max() < 3 and labels.shape[1] > labels.shape[0]
    props, source = generate_proposals(image, dense)
    assert source.startswith("dense:") and props.shape[1:] == image.shape[:2]
    # every class region of the dense label map is one of the proposals
    from PIL import Image as PILImage
    full = np.asarray(PILImage.fromarray(labels.astype(np.int32), mode="I").resize((90, 60), PILImage.NEAREST))
    for k in np.unique(labels):
        assert any(np.array_equal(p, full == k) for p in props)
    Image.fromarray(image).save(tmp_path / "d.png")
    assert main(["refer", str(tmp_path / "d.png"), "the road", "-g", str(graphs), "--dense", str(dense),
                 "-o", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "d.refer.json").read_text())["proposals"].startswith("dense:dense.onnx")


def test_text_graph_from_other_weights_is_refused(graphs, tmp_path):
    import shutil

    from clipfuse.export.text_graph import export_text_graph
    from clipfuse.runtime.errors import ClipfuseError

    for part in ("global", "local"):
        for suffix in (".onnx", ".json"):
            shutil.copy(graphs.with_name(f"tiny-{part}{suffix}"), tmp_path / f"x-{part}{suffix}")
    with pytest.raises(ClipfuseError, match="text graph not found"):
        P.ReferSegmenter.open(tmp_path / "x")
    export_text_graph(tmp_path / "x-text", model="ViT-T-16-test", pretrained="none", seed=5)
    with pytest.raises(ClipfuseError, match="other weights"):
        P.ReferSegmenter.open(tmp_path / "x")


def _save_with_orientation(path: Path, stored: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, format="PNG", exif=exif)


def test_eval_refer_reads_images_as_the_annotations_were_drawn(tmp_path):
    """COCO's height/width describe the stored pixels (the public code reads them with PIL, no
    EXIF transpose): a photo tagged 'rotate 90' keeps its stored pixels when they match the
    annotation, is turned upright only when just the upright size matches, else one-line error."""
    from clipfuse.runtime.errors import ClipfuseError
    from clipfuse.runtime.refer.dataset import ReferDataset

    _write_dataset(tmp_path)
    data = ReferDataset(tmp_path, "refcoco", split="val")
    path = data.image_path(11)                       # annotated as 40 x 56 (h x w)
    stored = (np.random.default_rng(2).random((40, 56, 3)) * 255).astype(np.uint8)
    _save_with_orientation(path, stored, 6)          # EXIF: display rotated by 90 degrees
    assert np.array_equal(data.read_image(11), stored)
    upright = np.ascontiguousarray(np.rot90(stored, 1))      # stored sideways, EXIF turns it back
    _save_with_orientation(path, upright, 6)       # Pillow turns it back clockwise
    assert np.array_equal(data.read_image(11), stored)
    Image.fromarray(stored[:30]).save(path, format="PNG")
    with pytest.raises(ClipfuseError, match=r"is 56x30 but its annotations say 56x40"):
        data.read_image(11)


def test_graphs_with_the_old_uint8_input_are_refused(graphs, tmp_path):
    import shutil

    from clipfuse.runtime.errors import ClipfuseError
    from clipfuse.runtime.manifest import manifest_path_for

    paths = P.graph_paths(graphs)
    old = tmp_path / "old-global.onnx"
    shutil.copy(paths["global"], old)
    manifest = json.loads(manifest_path_for(paths["global"]).read_text())
    manifest["inputs"][0]["dtype"] = "uint8"
    manifest_path_for(old).write_text(json.dumps(manifest))
    # `inputs` is part of the contract now, so an edited manifest is refused by the contract check
    # first; a genuinely old graph (contract without `inputs`) reaches the uint8 message.
    with pytest.raises(ClipfuseError, match="uint8 image.*re-export with `clipfuse export-refer`|disagrees with old-global.onnx on 'inputs'"):
        P.ReferSegmenter(old, paths["local"])


@pytest.mark.parametrize("hw", [(300, 451), (451, 300), (800, 1203), (860, 905), (1000, 640)])
def test_public_copy_is_torchvision_resize_800_on_pil(hw):
    T = pytest.importorskip("torchvision.transforms")
    image = (np.random.default_rng(hw[0]).random(hw + (3,)) * 255).astype(np.uint8)
    expected = np.asarray(T.Resize(800)(Image.fromarray(image)))
    got = P.public_copy(image)
    assert got.shape == expected.shape and min(got.shape[:2]) == 800
    assert np.array_equal(got, expected)


class _BatchLimited:
    """A backend wrapper that, like an engine with an optimisation profile, refuses batches over
    `max_batch` and records the batch sizes it ran."""

    def __init__(self, runner, max_batch: int, batched: str):
        self.runner, self.max_batch, self.batched, self.sizes = runner, max_batch, batched, []

    def run(self, feeds):
        size = len(feeds[self.batched])
        assert size <= self.max_batch, f"batch {size} over the profile's {self.max_batch}"
        self.sizes.append(size)
        return self.runner.run(feeds)

    def close(self):
        self.runner.close()


def test_proposals_are_chunked_by_the_backends_max_batch(graphs):
    """5 proposals through runners limited to 2 (global) and 3 (local): cut into 2+2+1 and 3+2,
    in order, with the features of one unlimited call."""
    image, masks3 = _scene(seed=6)
    masks = np.concatenate([masks3, masks3[:2, ::-1, ::-1]])   # 5 distinct proposals
    seg = P.ReferSegmenter.open(graphs)
    try:
        want_g, want_l = seg.visual_features(image, masks)
        seg.global_runner = _BatchLimited(seg.global_runner, 2, "masks")
        seg.local_runner = _BatchLimited(seg.local_runner, 3, "crops")
        got_g, got_l = seg.visual_features(image, masks)
    finally:
        seg.close()
    assert seg.global_runner.sizes == [2, 2, 1] and seg.local_runner.sizes == [3, 2]
    assert got_g.shape == want_g.shape == (5, want_g.shape[1])
    np.testing.assert_allclose(got_g, want_g, atol=1e-5)
    np.testing.assert_allclose(got_l, want_l, atol=1e-5)
    assert np.abs(want_g[0] - want_g[3]).max() > 1e-3   # rows differ: a mix-up would show


def test_the_runtime_reads_every_refer_field_of_the_manifest(graphs, tmp_path, monkeypatch):
    """export-refer writes the refer section from the runtime's constants and the segmenter reads
    each field back; a graph made for a preprocessing this runtime lacks is refused."""
    from clipfuse.export.refer_export import export_refer
    from clipfuse.runtime.errors import ClipfuseError

    seg = P.ReferSegmenter.open(graphs)
    try:
        assert seg.global_manifest["refer"] == P.refer_section(0.95, 3, "public")
        assert (seg.default_alpha, seg.alpha_for("refcocog"), seg.alpha_for("refcoco+")) == (0.95, 0.85, 0.95)
        assert seg.text_weight == P.TEXT_WEIGHT and seg.masked_blocks == 3
        assert seg.public_fill == P.PUBLIC_FILL and seg.fill == "public"
    finally:
        seg.close()
    monkeypatch.setattr(P, "PREPROCESS", "other-600")
    export_refer(tmp_path / "other", model="ViT-T-16-test", pretrained="none", text=False)
    monkeypatch.setattr(P, "PREPROCESS", "public-800")
    paths = P.graph_paths(tmp_path / "other")
    with pytest.raises(ClipfuseError, match="preprocess 'other-600'"):
        P.ReferSegmenter(paths["global"], paths["local"])
