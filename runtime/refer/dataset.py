"""RefCOCO / RefCOCO+ / RefCOCOg annotations in the REFER toolkit's own layout, read without it.

    ROOT/refcoco/refs(unc).p        pickle: list of refs {ref_id, ann_id, image_id, split, category_id,
    ROOT/refcoco/instances.json                   sentences: [{sent_id, raw, sent, tokens}], ...}
    ROOT/refcocog/refs(umd).p       COCO json: images {id, file_name, height, width},
    ROOT/images/mscoco/images/train2014/*.jpg     annotations {id, image_id, segmentation, ...}
The target of a ref is its annotation's mask (polygon parts merged, as REFER.getMask).

Orientation: COCO's `height`/`width` (and so every polygon) describe the JPEG's stored pixels,
which is also what the public code reads (PIL without EXIF transpose). A photo whose EXIF
orientation swaps its sides would be misaligned with its masks after an EXIF transpose, so
`read_image` keeps the stored order whenever its size matches the annotation, and transposes only
when just the transposed size matches (a file re-saved upright).
"""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np

from ..errors import ClipfuseError
from .masks import segmentation_to_mask

DATASETS = ("refcoco", "refcoco+", "refcocog")
DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
SPLIT_BYS = ("unc", "umd", "google")


@dataclass
class Ref:
    ref_id: int
    ann_id: int
    image_id: int
    split: str
    sentences: List[dict]          # {"sent_id", "raw", ...}


class ReferDataset:
    def __init__(self, root: "str | Path", dataset: str = "refcoco", split_by: Optional[str] = None,
                 split: str = "val", images: Optional["str | Path"] = None) -> None:
        if dataset not in DATASETS:
            raise ClipfuseError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
        split_by = split_by or DEFAULT_SPLIT_BY[dataset]
        if split_by not in SPLIT_BYS:
            raise ClipfuseError(f"unknown split-by {split_by!r}; choose one of: {', '.join(SPLIT_BYS)}")
        root = Path(root)
        folder = root / dataset
        refs_path = folder / f"refs({split_by}).p"
        instances_path = folder / "instances.json"
        for path in (refs_path, instances_path):
            if not path.is_file():
                raise ClipfuseError(f"{path} not found (expected the REFER layout ROOT/{dataset}/refs({split_by}).p "
                                    f"and ROOT/{dataset}/instances.json)")
        refs = _load_pickle(refs_path)
        try:
            instances = json.loads(instances_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ClipfuseError(f"{instances_path}: not valid JSON ({exc})") from None
        self.images: Dict[int, dict] = {int(im["id"]): im for im in instances.get("images", [])}
        self.anns: Dict[int, dict] = {int(a["id"]): a for a in instances.get("annotations", [])}
        self.anns_by_image: Dict[int, List[int]] = {}
        for ann_id, ann in self.anns.items():
            self.anns_by_image.setdefault(int(ann["image_id"]), []).append(ann_id)
        self.refs = [Ref(int(r["ref_id"]), int(r["ann_id"]), int(r["image_id"]), str(r["split"]), list(r["sentences"]))
                     for r in refs if split in ("all", str(r["split"]))]
        if not self.refs:
            splits = sorted({str(r["split"]) for r in refs})
            raise ClipfuseError(f"{refs_path}: no refs in split {split!r} (splits: {', '.join(splits)})")
        self.image_dir = Path(images) if images else root / "images" / "mscoco" / "images" / "train2014"
        self.name = f"{dataset}({split_by})/{split}"

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.images[image_id]["file_name"]

    def read_image(self, image_id: int) -> np.ndarray:
        """The image in the orientation its annotations were drawn on (see the module docstring)."""
        from ..imageio import read_image

        info = self.images[image_id]
        hw = (int(info["height"]), int(info["width"]))
        path = self.image_path(image_id)
        image = read_image(path, max_pixels=None, exif_transpose=False)
        if image.shape[:2] == hw:
            return image
        upright = read_image(path, max_pixels=None)
        if upright.shape[:2] == hw:
            return upright
        raise ClipfuseError(f"{path} is {image.shape[1]}x{image.shape[0]} but its annotations say "
                            f"{hw[1]}x{hw[0]} (WxH); is --images the COCO train2014 folder?")

    def ann_mask(self, ann_id: int) -> np.ndarray:
        ann = self.anns[ann_id]
        info = self.images[int(ann["image_id"])]
        return segmentation_to_mask(ann["segmentation"], int(info["height"]), int(info["width"]))

    def image_masks(self, image_id: int) -> np.ndarray:
        """All instance masks of an image (oracle proposals) -> bool [N, H, W]."""
        return np.stack([self.ann_mask(a) for a in sorted(self.anns_by_image.get(image_id, []))])

    def refs_by_image(self) -> Iterator["tuple[int, List[Ref]]"]:
        grouped: Dict[int, List[Ref]] = {}
        for ref in self.refs:
            grouped.setdefault(ref.image_id, []).append(ref)
        yield from grouped.items()

    def __len__(self) -> int:
        return sum(len(r.sentences) for r in self.refs)


def _load_pickle(path: Path) -> list:
    """refs(*.p) files were written by Python 2; latin-1 decodes their byte strings.
    (A pickle can run code: only open annotation files from a source you trust.)"""
    data = None
    for encoding in ("ASCII", "latin1"):
        try:
            with open(path, "rb") as fh:
                data = pickle.load(fh, encoding=encoding)
            break
        except UnicodeDecodeError:
            continue
        except Exception as exc:
            raise ClipfuseError(f"{path}: not a refs pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, list) or (data and not isinstance(data[0], dict)):
        raise ClipfuseError(f"{path}: expected a list of ref dicts")
    return data
