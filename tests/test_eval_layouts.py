"""Tiny datasets in each benchmark's real on-disk layout, and what the readers make of them.

The builders here are reused by test_eval_cmd.py.
"""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipfuse.runtime.errors import ClipfuseError
from clipfuse.runtime.eval import datasets as ds

# VOC-style ground truth of two images (palette indices; 255 = void boundary).
VOC_LABELS = {
    "2007_000033": np.array([[0, 0, 15], [15, 255, 1]], np.uint8),
    "2007_000042": np.array([[1, 1], [0, 255]], np.uint8),
}
VOC_PALETTE = [0, 0, 0, 128, 0, 0] + [7] * (3 * 254)


def write_rgb(path: Path, hw, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*hw, 3), value, np.uint8)).save(path)


def write_palette_png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(label.astype(np.uint8), mode="P")
    img.putpalette(VOC_PALETTE)
    img.save(path)


def write_gray_png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8), mode="L").save(path)


def make_voc(root: Path, labels=VOC_LABELS) -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    for n, (sid, lab) in enumerate(labels.items()):
        write_rgb(base / "JPEGImages" / f"{sid}.jpg", lab.shape, 40 * (n + 1))
        write_palette_png(base / "SegmentationClass" / f"{sid}.png", lab)
    write_rgb(base / "JPEGImages" / "2007_999999.jpg", (2, 2), 9)  # a train image: not listed
    split = base / "ImageSets" / "Segmentation"
    split.mkdir(parents=True)
    (split / "val.txt").write_text("\n".join(reversed(list(labels))) + "\n")  # unsorted on purpose
    return root


def make_context(root: Path, label: np.ndarray) -> Path:
    base = root / "VOCdevkit" / "VOC2010"
    write_rgb(base / "JPEGImages" / "2008_000002.jpg", label.shape, 10)
    write_gray_png(base / "SegmentationClassContext" / "2008_000002.png", label)
    (base / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (base / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n")
    return root


def make_coco(root: Path, label: np.ndarray, suffix: str) -> Path:
    write_rgb(root / "images" / "val2017" / "000000000139.jpg", label.shape, 10)
    write_gray_png(root / "annotations" / "val2017" / f"000000000139{suffix}", label)
    return root


def make_cityscapes(root: Path, label_ids: np.ndarray) -> Path:
    stem = "frankfurt/frankfurt_000000_000294"
    write_rgb(root / "leftImg8bit" / "val" / f"{stem}_leftImg8bit.png", label_ids.shape, 10)
    write_gray_png(root / "gtFine" / "val" / f"{stem}_gtFine_labelIds.png", label_ids)
    return root


def make_ade(root: Path, label: np.ndarray) -> Path:
    base = root / "ADEChallengeData2016"
    write_rgb(base / "images" / "validation" / "ADE_val_00000001.jpg", label.shape, 10)
    write_gray_png(base / "annotations" / "validation" / "ADE_val_00000001.png", label)
    return root


def only_label(dataset) -> np.ndarray:
    (sample,) = list(dataset)
    assert sample.image.dtype == np.uint8 and sample.image.shape == (*sample.label.shape, 3)
    return sample.label


def test_voc21_and_voc20_labels(tmp_path):
    make_voc(tmp_path)
    voc21 = ds.open_dataset("VOC21", tmp_path)  # root above VOCdevkit is accepted
    assert voc21.ids == ["2007_000033", "2007_000042"] and voc21.num_classes == 21
    samples = list(voc21)
    np.testing.assert_array_equal(samples[0].label, [[0, 0, 15], [15, 255, 1]])
    np.testing.assert_array_equal(samples[1].label, [[1, 1], [0, 255]])
    # VOC20: background (0) becomes ignore, every class shifts down by one, void stays void
    voc20 = ds.open_dataset("voc20", tmp_path / "VOCdevkit" / "VOC2012")
    np.testing.assert_array_equal(voc20.load(0).label, [[255, 255, 14], [14, 255, 0]])
    np.testing.assert_array_equal(voc20.load(1).label, [[0, 0], [255, 255]])


def test_context60_and_context59_labels(tmp_path):
    make_context(tmp_path, np.array([[0, 1, 59], [33, 255, 0]]))
    np.testing.assert_array_equal(only_label(ds.open_dataset("context60", tmp_path)),
                                  [[0, 1, 59], [33, 255, 0]])
    np.testing.assert_array_equal(only_label(ds.open_dataset("Context59", tmp_path / "VOCdevkit")),
                                  [[255, 0, 58], [32, 255, 255]])


def test_coco_object_and_stuff_labels(tmp_path):
    make_coco(tmp_path / "obj", np.array([[0, 1, 80], [255, 0, 7]]), "_instanceTrainIds.png")
    np.testing.assert_array_equal(only_label(ds.open_dataset("coco_object", tmp_path / "obj")),
                                  [[0, 1, 80], [255, 0, 7]])
    make_coco(tmp_path / "stuff", np.array([[0, 170, 255], [91, 3, 0]]), "_labelTrainIds.png")
    stuff = ds.open_dataset("coco-stuff164k", tmp_path / "stuff")
    assert stuff.ids == ["000000000139"] and stuff.num_classes == 171
    np.testing.assert_array_equal(only_label(stuff), [[0, 170, 255], [91, 3, 0]])


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    # road 7->0, car 26->13, unlabeled 0->255, person 24->11, bicycle 33->18, ego vehicle 1->255,
    # guard rail 14 (no train id) -> 255
    make_cityscapes(tmp_path, np.array([[7, 26, 0, 24], [33, 1, 14, 23]]))
    city = ds.open_dataset("cityscapes", tmp_path)
    assert city.ids == ["frankfurt/frankfurt_000000_000294"]
    np.testing.assert_array_equal(only_label(city), [[0, 13, 255, 11], [18, 255, 255, 10]])
    # mmseg's converter output beside it is taken as train ids already
    prepared = np.array([[0, 18, 255, 5], [1, 2, 3, 4]])
    write_gray_png(tmp_path / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png",
                   prepared)
    np.testing.assert_array_equal(only_label(ds.open_dataset("cityscapes", tmp_path)), prepared)


def test_ade20k_reduce_zero_label(tmp_path):
    make_ade(tmp_path, np.array([[0, 1, 150], [12, 0, 2]]))
    np.testing.assert_array_equal(only_label(ds.open_dataset("ade20k", tmp_path)),
                                  [[255, 0, 149], [11, 255, 1]])


def test_wrong_root_names_what_is_missing(tmp_path):
    with pytest.raises(ClipfuseError, match=r"ImageSets/Segmentation.*VOCdevkit/VOC2012"):
        ds.open_dataset("voc21", tmp_path)
    with pytest.raises(ClipfuseError, match="not a directory"):
        ds.open_dataset("ade20k", tmp_path / "nope")
    with pytest.raises(ClipfuseError, match="unknown dataset 'voc99'.*voc21"):
        ds.open_dataset("voc99", tmp_path)
    # COCO layout with the annotations of the other benchmark: the expected suffix is named
    make_coco(tmp_path / "c", np.zeros((2, 2)), "_labelTrainIds.png")
    with pytest.raises(ClipfuseError, match=r"1 missing, e.g. .*000000000139_instanceTrainIds\.png"):
        ds.open_dataset("coco-object", tmp_path / "c")


def test_incomplete_root_names_the_missing_file(tmp_path):
    make_voc(tmp_path)
    (tmp_path / "VOCdevkit/VOC2012/SegmentationClass/2007_000042.png").unlink()
    with pytest.raises(ClipfuseError, match=r"label PNGs listed in .*val\.txt: 1 missing, e\.g\. "
                                            r".*SegmentationClass/2007_000042\.png"):
        ds.open_dataset("voc21", tmp_path)
    (tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(ClipfuseError, match=r"missing, e\.g\. .*ImageSets/Segmentation/val\.txt"):
        ds.open_dataset("voc20", tmp_path)


def test_colour_label_png_is_refused(tmp_path):
    make_ade(tmp_path, np.zeros((2, 2)))
    ann = tmp_path / "ADEChallengeData2016/annotations/validation/ADE_val_00000001.png"
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(ann)
    with pytest.raises(ClipfuseError, match="mode RGB"):
        list(ds.open_dataset("ade20k", tmp_path))


@pytest.mark.parametrize("name", ds.DATASET_NAMES)
def test_shipped_class_files_match_class_counts(name):
    spec = ds.dataset_spec(name)
    for head in (None, "sclip"):
        path = ds.classes_file(name, head)
        assert path.parent.name == "classnames"
        assert len(ds.first_names(path)) == spec.num_classes, path
    if name in ("voc21", "context60", "coco-object"):
        assert ds.first_names(ds.classes_file(name))[0] == "background"
    if name in ("voc21", "coco-object"):  # SCLIP's expanded background synonyms
        first = ds.classes_file(name, "sclip").read_text().splitlines()[0].split(", ")
        assert first[:3] == ["sky", "wall", "tree"] and len(first) == 26
