"""Mask proposals (readers, COCO RLE, generators) and the referring-segmentation metrics."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.refer import masks as M
from clipfuse.runtime.refer.metrics import ReferMetrics, intersection_union

# counts [2, 3, 1, 6] on a 3x4 image, column-major, starting with background (hand-decoded)
SMALL = np.array([[0, 1, 1, 1],
                  [0, 1, 1, 1],
                  [1, 0, 1, 1]], dtype=bool)


def encode_rle_string(counts):
    """Independent port of pycocotools' rleToString (the encoder; the module only decodes)."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def counts_of(mask):
    flat = mask.T.ravel().astype(np.int8)          # column-major
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])))
    runs = np.diff(np.concatenate([[0], change]))
    return [int(r) for r in runs[:-1]] if flat[-1] != 2 else runs.tolist()


def test_rle_uncompressed_hand_computed():
    assert np.array_equal(M.rle_decode({"size": [3, 4], "counts": [2, 3, 1, 6]}), SMALL)


def test_rle_compressed_hand_computed():
    assert encode_rle_string([2, 3, 1, 6]) == "2313"            # worked by hand
    assert M.rle_counts_from_string("2313") == [2, 3, 1, 6]
    assert np.array_equal(M.rle_decode({"size": [3, 4], "counts": "2313"}), SMALL)
    # multi-group values and a negative delta (5 - 40), worked by hand: T3 X1 d0 mN
    assert M.rle_counts_from_string("T3X1d0mN") == [100, 40, 20, 5]


def test_rle_random_masks_round_trip():
    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (7, 5), (37, 64)):
        mask = rng.random((h, w)) < rng.random()
        flat = mask.T.ravel()
        runs, current, n = [], False, 0
        for v in flat:                                   # plain run-length, background first
            if v == current:
                n += 1
            else:
                runs.append(n)
                current, n = v, 1
        runs.append(n)
        assert sum(runs) == h * w
        assert np.array_equal(M.rle_decode({"size": [h, w], "counts": runs}), mask)
        assert np.array_equal(M.rle_decode({"size": [h, w], "counts": encode_rle_string(runs)}), mask)


def test_rle_matches_pycocotools_when_installed():
    coco_mask = pytest.importorskip("pycocotools.mask", reason="pycocotools not installed (optional)")
    rng = np.random.default_rng(1)
    mask = rng.random((23, 31)) < 0.4
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert np.array_equal(M.rle_decode({"size": rle["size"], "counts": rle["counts"].decode()}), mask)


def test_rle_bad_counts():
    with pytest.raises(ClipfuseError, match="h\\*w"):
        M.rle_decode({"size": [3, 4], "counts": [2, 3]})


def test_polygon_without_pycocotools(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)        # force the Pillow rasteriser
    mask = M.polygons_to_mask([[1, 1, 4, 1, 4, 3, 1, 3]], 5, 6)
    expected = np.zeros((5, 6), bool)
    expected[1:4, 1:5] = True
    assert np.array_equal(mask, expected)


def test_readers(tmp_path):
    rng = np.random.default_rng(2)
    stack = rng.random((3, 10, 12)) < 0.5
    # folder of PNGs, sorted by name
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, m in enumerate(stack):
        Image.fromarray(m.astype(np.uint8) * 255).save(folder / f"m{i}.png")
    assert np.array_equal(M.load_proposals(folder), stack)
    # a PNG label map: each nonzero id is one mask
    labels = np.zeros((10, 12), np.uint8)
    labels[:5] = 3
    labels[5:, :4] = 7
    Image.fromarray(labels).save(tmp_path / "labels.png")
    got = M.load_proposals(tmp_path / "labels.png")
    assert np.array_equal(got, np.stack([labels == 3, labels == 7]))
    # multi-frame TIFF: one mask per frame
    frames = [Image.fromarray(m.astype(np.uint8) * 255) for m in stack]
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    assert np.array_equal(M.load_proposals(tmp_path / "stack.tif"), stack)
    # NPZ (float, key "masks") and NPY
    np.savez(tmp_path / "m.npz", masks=stack.astype(np.float32) * 0.9, other=np.zeros(2))
    soft = M.load_proposals(tmp_path / "m.npz")           # floats stay soft (the public semantics)
    assert soft.dtype == np.float32 and np.array_equal(soft, stack.astype(np.float32) * 0.9)
    assert np.array_equal(M.hard_masks(soft), stack)
    np.savez(tmp_path / "big.npz", masks=stack.astype(np.float32) * 2)
    with pytest.raises(ClipfuseError, match=r"soft mask values must lie in \[0, 1\], found \[0, 2\]"):
        M.load_proposals(tmp_path / "big.npz")
    np.save(tmp_path / "m.npy", stack[0])
    assert np.array_equal(M.load_proposals(tmp_path / "m.npy"), stack[:1])
    # COCO JSON: RLE list, annotations dict, single RLE
    rles = [{"size": [3, 4], "counts": "2313"}, {"size": [3, 4], "counts": [2, 3, 1, 6]}]
    (tmp_path / "r.json").write_text(json.dumps(rles))
    assert np.array_equal(M.load_proposals(tmp_path / "r.json"), np.stack([SMALL, SMALL]))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [{"segmentation": rles[0]}]}))
    assert np.array_equal(M.load_proposals(tmp_path / "a.json"), SMALL[None])


def test_reader_errors(tmp_path):
    with pytest.raises(ClipfuseError, match="not found"):
        M.load_proposals(tmp_path / "nope.npz")
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 3, 3)), b=np.zeros((2, 3, 3)))
    with pytest.raises(ClipfuseError, match="key 'masks'"):
        M.load_proposals(tmp_path / "two.npz")
    np.save(tmp_path / "bad.npy", np.zeros((2, 2, 2, 2)))
    with pytest.raises(ClipfuseError, match="\\[N, H, W\\]"):
        M.load_proposals(tmp_path / "bad.npy")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ClipfuseError, match="not valid JSON"):
        M.load_proposals(tmp_path / "bad.json")


def test_check_proposals():
    masks = np.zeros((3, 4, 5), bool)
    masks[0, 1, 1] = masks[2, 3, 4] = True
    kept, idx = M.check_proposals(masks, (4, 5))
    assert idx.tolist() == [0, 2] and np.array_equal(kept, masks[[0, 2]])
    with pytest.raises(ClipfuseError, match="zero mask proposals"):
        M.check_proposals(np.zeros((0, 4, 5), bool), (4, 5))
    with pytest.raises(ClipfuseError, match="masks are 4x5 .* image is 8x10"):
        M.check_proposals(masks, (8, 10))
    with pytest.raises(ClipfuseError, match="all 2 masks are empty"):
        M.check_proposals(np.zeros((2, 4, 5), bool), (4, 5))


def test_check_proposals_keeps_soft_masks_soft():
    soft = np.zeros((3, 4, 5), np.float64)
    soft[0, 1, 1], soft[0, 2, 2], soft[2, 3, 4] = 0.25, 1.0, 0.5
    kept, idx = M.check_proposals(soft, (4, 5))
    assert idx.tolist() == [0, 2] and kept.dtype == np.float32
    np.testing.assert_array_equal(kept, soft[[0, 2]].astype(np.float32))
    soft[1, 0, 0] = np.nan
    with pytest.raises(ClipfuseError, match="NaN or infinite"):
        M.check_proposals(soft, (4, 5))
    soft[1, 0, 0] = -0.1
    with pytest.raises(ClipfuseError, match=r"must lie in \[0, 1\]"):
        M.check_proposals(soft, (4, 5))


def test_connected_components_against_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(3)
    for _ in range(5):
        mask = rng.random((30, 41)) < 0.45
        ours, n = M.connected_components(mask)
        ref, n_ref = ndimage.label(mask)              # 4-connectivity by default
        assert n == n_ref
        # same partition: a one-to-one map between the two labelings
        pairs = set(zip(ours[mask].tolist(), ref[mask].tolist()))
        assert len(pairs) == n
        assert (ours[~mask] == 0).all()


def test_proposals_from_label_map_hand_example():
    labels = np.zeros((6, 8), np.int32)
    labels[:, 6:] = 1          # class 1: a right strip (12 px) ...
    labels[0:2, 0:2] = 1       # ... and a top-left blob (4 px), not connected
    out = M.proposals_from_label_maps([labels], (12, 16), min_area_fraction=0.0)
    # class 0 (32 px), class 1 union (16), right strip (12), blob (4); upsampled x2 (nearest)
    assert out.shape == (4, 12, 16)
    assert [int(m.sum()) for m in out] == [128, 64, 48, 16]
    assert np.array_equal(out[3][::2, ::2], labels.astype(bool) & (np.arange(8) < 2)[None])


def test_color_proposals_find_the_halves():
    image = np.zeros((60, 80, 3), np.uint8)
    image[:, :40] = (200, 30, 30)
    image[:, 40:] = (20, 40, 220)
    props = M.color_proposals(image)
    left = np.zeros((60, 80), bool)
    left[:, :40] = True
    ious = [(p & left).sum() / (p | left).sum() for p in props]
    assert max(ious) > 0.95
    assert len(props) <= M.MAX_PROPOSALS


def test_metrics_hand_computed():
    m = ReferMetrics()
    gt = np.zeros((2, 4), bool)
    gt[0, :2] = gt[1, :1] = True                     # 3 px
    pred = np.zeros((2, 4), bool)
    pred[0, 1:3] = True                              # I = 1, U = 4
    assert m.add(pred, gt) == pytest.approx(0.25)
    assert m.add(gt, gt) == pytest.approx(1.0)       # I = U = 3
    assert m.add(np.zeros_like(gt), np.zeros_like(gt)) == 0.0   # U = 0 counts as IoU 0
    pred2 = np.ones((2, 4), bool)                    # I = 3, U = 8
    m.add(pred2, gt)
    assert m.oiou == pytest.approx((1 + 3 + 0 + 3) / (4 + 3 + 0 + 8))
    assert m.miou == pytest.approx((0.25 + 1.0 + 0.0 + 0.375) / 4)
    p = m.precision_at((0.3, 0.9))
    assert p == {"P@0.3": pytest.approx(0.5), "P@0.9": pytest.approx(0.25)}
    s = m.summary()
    assert s["expressions"] == 4 and s["oIoU"] == m.oiou
    assert intersection_union(pred, gt) == (1, 4)
    with pytest.raises(ClipfuseError, match="differ in size"):
        m.add(np.zeros((2, 3), bool), gt)
