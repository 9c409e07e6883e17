"""Readers for the eight benchmark layouts, as the methods' mmsegmentation configs read them.

Each reader resolves its root, lists the samples of the validation split (sorted ids, so `--limit N`
is always the same N images), checks that every file exists up front, and then loads one sample at
a time: (image uint8 HxWx3 RGB, label int64 HxW with 255 = ignore, id). Nothing is cached.

Label conventions (mmseg's `reduce_zero_label` and dataset classes):
- voc21: SegmentationClass palette PNG indices as they are (0 = background, 255 = void).
- voc20: VOC without background: 0 -> 255, k -> k-1.
- context60: SegmentationClassContext PNG (0 = background, 1..59) as it is.
- context59: 0 -> 255, k -> k-1.
- coco-object: *_instanceTrainIds.png as it is (0 = background, 1..80 things, 255 ignore).
- coco-stuff164k: *_labelTrainIds.png as it is (0..170, 255 ignore).
- cityscapes: *_gtFine_labelIds.png mapped to the 19 train ids (others 255); a prepared
  *_gtFine_labelTrainIds.png (mmseg's converter) is used as it is when present.
- ade20k: 0 -> 255, k -> k-1 (150 classes).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..errors import ClipfuseError
from ..methods import METHODS

IGNORE_INDEX = 255
CLASSNAMES_DIR = Path(__file__).resolve().parent.parent / "data" / "classnames"


class Sample(NamedTuple):
    image: np.ndarray  # uint8 [H, W, 3] RGB
    label: np.ndarray  # int64 [H, W], IGNORE_INDEX where not scored
    id: str


# --- label transforms -------------------------------------------------------------------------

def _lut(mapping: dict) -> np.ndarray:
    table = np.full(256, IGNORE_INDEX, dtype=np.int64)
    for src, dst in mapping.items():
        table[src] = dst
    return table


IDENTITY_LUT = np.arange(256, dtype=np.int64)
# mmseg reduce_zero_label: 0 (background / "other") becomes ignore, every class shifts down by one.
REDUCE_ZERO_LUT = _lut({k: k - 1 for k in range(1, 255)})
# Cityscapes labelIds -> the 19 train ids (cityscapesscripts' labels.py); all other ids ignored.
CITYSCAPES_LUT = _lut({7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                       24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18})


# --- file loading -------------------------------------------------------------------------------

def load_image(path: Path) -> np.ndarray:
    """The one image reader of the runtime (size limit checked on the header, truncated and
    forged files refused); EXIF orientation is ignored, as the datasets' labels are not rotated."""
    from ..imageio import read_image

    return read_image(path, exif_transpose=False)


def load_label(path: Path, lut: np.ndarray) -> np.ndarray:
    """Class indices of a label PNG (palette or grayscale) mapped through `lut`."""
    from PIL import Image

    from ..imageio import DEFAULT_MAX_PIXELS

    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L", "I", "I;16"):
                raise ClipfuseError(
                    f"{path}: label PNG has mode {img.mode}; expected class indices (palette or "
                    f"grayscale), not a colour rendering")
            if img.size[0] * img.size[1] > DEFAULT_MAX_PIXELS:
                raise ClipfuseError(f"{path}: label PNG declares {img.size[0]}x{img.size[1]} pixels, above the "
                                    f"limit of {DEFAULT_MAX_PIXELS} (a fixed limit)")
            raw = np.asarray(img)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL: truncated/corrupt files
        raise ClipfuseError(f"{path}: cannot read label PNG ({str(exc).splitlines()[0][:100]})") from None
    if raw.max(initial=0) > 255:
        raise ClipfuseError(f"{path}: label values above 255 (max {int(raw.max())})")
    return lut[raw.astype(np.int64)]


# --- dataset ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetSpec:
    key: str            # clipfuse name, as in MethodSpec.dataset_protocol
    title: str          # as papers print it
    num_classes: int
    classes_file: str   # standard names shipped in runtime/data/classnames/
    layout: str         # one line: what the root must contain (for errors and --help)
    source: str         # where to get it (README / --help)


class EvalDataset:
    """A resolved dataset: sorted ids and the paths of their image and label files."""

    def __init__(self, spec: DatasetSpec, root: Path, items: Sequence[Tuple[str, Path, Path]],
                 lut: np.ndarray) -> None:
        self.spec = spec
        self.root = root
        self._items = list(items)
        self._lut = lut

    @property
    def ids(self) -> List[str]:
        return [item[0] for item in self._items]

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def __len__(self) -> int:
        return len(self._items)

    def load(self, index: int) -> Sample:
        sample_id, image_path, label_path = self._items[index]
        image = load_image(image_path)
        # mmseg's Cityscapes converter already wrote train ids; raw labelIds go through the map.
        prepared = label_path.name.endswith("_gtFine_labelTrainIds.png")
        label = load_label(label_path, IDENTITY_LUT if prepared else self._lut)
        if image.shape[:2] != label.shape:
            raise ClipfuseError(f"{sample_id}: image {image_path.name} is {image.shape[1]}x"
                                f"{image.shape[0]} but label {label_path.name} is "
                                f"{label.shape[1]}x{label.shape[0]}")
        return Sample(image, label, sample_id)

    def __iter__(self) -> Iterator[Sample]:
        for index in range(len(self._items)):
            yield self.load(index)


def _find_base(root: Path, candidates: Sequence[str], marker: str, spec: DatasetSpec) -> Path:
    """The first of root/candidate that contains `marker`; else a ClipfuseError naming the layout."""
    if not root.is_dir():
        raise ClipfuseError(f"{spec.title} root {root} is not a directory (expected {spec.layout})")
    for cand in candidates:
        base = root / cand if cand else root
        if (base / marker).exists():
            return base
    tried = ", ".join(str(root / c / marker) if c else str(root / marker) for c in candidates)
    raise ClipfuseError(f"{spec.title}: {root} does not look like the dataset root: none of {tried} "
                        f"exists (expected {spec.layout})")


def _require(paths: Sequence[Path], what: str) -> None:
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise ClipfuseError(f"{what}: {len(missing)} missing, e.g. {missing[0]}")


def _from_split(spec: DatasetSpec, base: Path, split: str, image_dir: str, label_dir: str
                ) -> List[Tuple[str, Path, Path]]:
    split_file = base / split
    _require([split_file, base / image_dir, base / label_dir],
             f"{spec.title} under {base} (expected {spec.layout})")
    try:
        text = split_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ClipfuseError(f"{split_file} is not UTF-8 text (byte {exc.start}); expected one image id a line") from None
    ids = sorted({line.strip() for line in text.splitlines() if line.strip()})
    if not ids:
        raise ClipfuseError(f"{split_file} lists no image ids")
    items = [(i, base / image_dir / f"{i}.jpg", base / label_dir / f"{i}.png") for i in ids]
    _require([it[1] for it in items], f"{spec.title} images listed in {split_file}")
    _require([it[2] for it in items], f"{spec.title} label PNGs listed in {split_file}")
    return items


def _from_glob(spec: DatasetSpec, image_dir: Path, label_dir: Path, image_suffix: str,
               label_name: Callable[[str], str]) -> List[Tuple[str, Path, Path]]:
    """Every image_dir/**/ID{image_suffix} (one folder level at most), with label_dir/label_name(ID)."""
    _require([image_dir, label_dir], f"{spec.title} (expected {spec.layout})")
    images = sorted([*image_dir.glob(f"*{image_suffix}"), *image_dir.glob(f"*/*{image_suffix}")])
    if not images:
        raise ClipfuseError(f"{spec.title}: no *{image_suffix} images in {image_dir}")
    items = []
    for path in images:
        sample_id = path.relative_to(image_dir).as_posix()[: -len(image_suffix)]
        items.append((sample_id, path, label_dir / label_name(sample_id)))
    _require([it[2] for it in items], f"{spec.title} label PNGs in {label_dir}")
    return items


def _voc(spec: DatasetSpec, root: Path) -> List[Tuple[str, Path, Path]]:
    base = _find_base(root, ["", "VOC2012", "VOCdevkit/VOC2012"], "ImageSets/Segmentation", spec)
    return _from_split(spec, base, "ImageSets/Segmentation/val.txt", "JPEGImages", "SegmentationClass")


def _context(spec: DatasetSpec, root: Path) -> List[Tuple[str, Path, Path]]:
    base = _find_base(root, ["", "VOC2010", "VOCdevkit/VOC2010"], "SegmentationClassContext", spec)
    return _from_split(spec, base, "ImageSets/SegmentationContext/val.txt", "JPEGImages",
                       "SegmentationClassContext")


def _coco(suffix: str):
    def items(spec: DatasetSpec, root: Path) -> List[Tuple[str, Path, Path]]:
        base = _find_base(root, ["", "coco_stuff164k"], "annotations/val2017", spec)
        return _from_glob(spec, base / "images/val2017", base / "annotations/val2017", ".jpg",
                          lambda sample_id: sample_id + suffix)
    return items


def _cityscapes_items(spec: DatasetSpec, root: Path) -> List[Tuple[str, Path, Path]]:
    base = _find_base(root, ["", "cityscapes"], "gtFine/val", spec)
    label_dir = base / "gtFine/val"

    def label_name(sample_id: str) -> str:
        # mmseg's converter writes *_labelTrainIds.png beside the raw *_labelIds.png; prefer it
        prepared = f"{sample_id}_gtFine_labelTrainIds.png"
        return prepared if (label_dir / prepared).exists() else f"{sample_id}_gtFine_labelIds.png"

    return _from_glob(spec, base / "leftImg8bit/val", label_dir, "_leftImg8bit.png", label_name)


def _ade(spec: DatasetSpec, root: Path) -> List[Tuple[str, Path, Path]]:
    base = _find_base(root, ["", "ADEChallengeData2016"], "annotations/validation", spec)
    return _from_glob(spec, base / "images/validation", base / "annotations/validation", ".jpg",
                      lambda sample_id: sample_id + ".png")


_VOC_LAYOUT = "VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation/val.txt}"
_CTX_LAYOUT = ("VOCdevkit/VOC2010/{JPEGImages,SegmentationClassContext,"
               "ImageSets/SegmentationContext/val.txt}")
_VOC_SRC = ("PASCAL VOC 2012 (host.robots.ox.ac.uk/pascal/VOC/voc2012, VOCtrainval_11-May-2012); "
            "SegmentationClass as shipped")
_CTX_SRC = ("PASCAL VOC 2010 images + PASCAL-Context trainval labels (cs.stanford.edu/~roozbeh/"
            "pascal-context), converted by mmsegmentation's tools/dataset_converters/pascal_context.py")
_COCO_SRC = ("COCO 2017 val images + COCO-Stuff 164k stuffthingmaps (github.com/nightrome/cocostuff), "
             "converted by mmsegmentation's tools/dataset_converters/coco_stuff164k.py")

# name -> (spec, item lister, label lut)
_DATASETS = {
    "voc21": (DatasetSpec("voc21", "VOC21", 21, "voc21.txt", _VOC_LAYOUT, _VOC_SRC), _voc, IDENTITY_LUT),
    "voc20": (DatasetSpec("voc20", "VOC20", 20, "voc20.txt", _VOC_LAYOUT, _VOC_SRC), _voc, REDUCE_ZERO_LUT),
    "context60": (DatasetSpec("context60", "Context60", 60, "context60.txt", _CTX_LAYOUT, _CTX_SRC),
                  _context, IDENTITY_LUT),
    "context59": (DatasetSpec("context59", "Context59", 59, "context59.txt", _CTX_LAYOUT, _CTX_SRC),
                  _context, REDUCE_ZERO_LUT),
    "coco-object": (DatasetSpec(
        "coco-object", "COCO-Object", 81, "coco_object.txt",
        "images/val2017/*.jpg + annotations/val2017/*_instanceTrainIds.png",
        _COCO_SRC + ", then to COCO-Object (background + 80 things) by CLIP-DINOiser's or SCLIP's "
        "convert_coco_object.py"), _coco("_instanceTrainIds.png"), IDENTITY_LUT),
    "coco-stuff164k": (DatasetSpec(
        "coco-stuff164k", "COCO-Stuff164k", 171, "coco_stuff164k.txt",
        "images/val2017/*.jpg + annotations/val2017/*_labelTrainIds.png", _COCO_SRC),
        _coco("_labelTrainIds.png"), IDENTITY_LUT),
    "cityscapes": (DatasetSpec(
        "cityscapes", "Cityscapes", 19, "cityscapes.txt",
        "leftImg8bit/val/CITY/*_leftImg8bit.png + gtFine/val/CITY/*_gtFine_labelIds.png",
        "cityscapes-dataset.com (leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip)"),
        _cityscapes_items, CITYSCAPES_LUT),
    "ade20k": (DatasetSpec(
        "ade20k", "ADE20K", 150, "ade20k.txt",
        "ADEChallengeData2016/{images,annotations}/validation/",
        "ADEChallengeData2016.zip of the MIT Scene Parsing benchmark (sceneparsing.csail.mit.edu)"),
        _ade, REDUCE_ZERO_LUT),
}

DATASET_NAMES = tuple(_DATASETS)


def canonical_name(name: str) -> str:
    """'VOC21', 'coco_object', 'COCO-Stuff164k' -> the clipfuse key; ClipfuseError if unknown."""
    key = name.strip().lower().replace("_", "-")
    key = {"coco-stuff": "coco-stuff164k", "ade": "ade20k", "city": "cityscapes",
           "city-scapes": "cityscapes", "voc": "voc21"}.get(key, key)
    if key not in _DATASETS:
        raise ClipfuseError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    return key


def dataset_spec(name: str) -> DatasetSpec:
    return _DATASETS[canonical_name(name)][0]


def open_dataset(name: str, root: "str | Path") -> EvalDataset:
    """Resolve `root` for dataset `name` and list its validation samples (no pixels read yet)."""
    spec, lister, lut = _DATASETS[canonical_name(name)]
    root = Path(root).expanduser()
    return EvalDataset(spec, root, lister(spec, root), lut)


# --- class-name files ---------------------------------------------------------------------------

# Heads whose published numbers used SCLIP's name files (expanded background, synonyms);
# ClearCLIP and NACLIP evaluate with SCLIP's code and files (MethodSpec.class_names).
SCLIP_NAMES_HEADS = frozenset(name for name, m in METHODS.items() if m.class_names == "sclip")


def classes_file(dataset: str, head: Optional[str] = None) -> Path:
    """The shipped class-name file for `dataset` (SCLIP's variant for heads that used it)."""
    spec = dataset_spec(dataset)
    name = spec.classes_file
    if head in SCLIP_NAMES_HEADS:
        name = "sclip_" + name
    path = CLASSNAMES_DIR / name
    if not path.is_file():
        raise ClipfuseError(f"class-name file {path} is missing from the installation")
    return path


def first_names(path: Path) -> List[str]:
    """The first name of every class line (duplicates across lines allowed, as in SCLIP's files)."""
    return [line.split(",")[0].strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
