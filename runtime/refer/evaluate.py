"""Referring-segmentation evaluation: every sentence of every ref of a REFER split is one sample,
scored with the proposal the graphs rank first (the loop behind `clipfuse eval-refer`)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .dataset import ReferDataset
from .masks import check_proposals, generate_proposals, hard_masks, load_proposals
from .metrics import ReferMetrics
from .pipeline import ReferSegmenter

PROPOSAL_SUFFIXES = (".npz", ".npy", ".json", ".png")


def proposal_file(folder: Path, image_id: int, file_name: str) -> Optional[Path]:
    """FOLDER/<image_id>.* or FOLDER/<image file stem>.* (or a folder of PNGs of that name)."""
    stem = Path(file_name).stem
    for name in (str(image_id), stem):
        for suffix in PROPOSAL_SUFFIXES:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
        if (folder / name).is_dir():
            return folder / name
    return None


def _proposals(data: ReferDataset, image_id: int, image: np.ndarray, oracle: bool, masks_dir: Optional[Path],
               dense: Optional[str], backend: str) -> np.ndarray:
    if oracle:
        return np.asarray(data.image_masks(image_id))
    if masks_dir is not None:
        found = proposal_file(masks_dir, image_id, data.images[image_id]["file_name"])
        return np.asarray(load_proposals(found, image.shape[:2]) if found else np.zeros((0,) + image.shape[:2], bool))
    return np.asarray(generate_proposals(image, dense, backend)[0])


def evaluate_refer(seg: ReferSegmenter, data: ReferDataset, alpha: float, *, oracle: bool = False,
                   masks_dir: Optional[Path] = None, dense: Optional[str] = None, backend: str = "auto",
                   parser: str = "auto", limit: Optional[int] = None, progress: bool = True
                   ) -> Tuple[Dict[str, object], List[dict]]:
    """(summary, per-sample records). An image without proposals scores IoU 0 for each sentence
    (counted in `no_proposals`). Visual features are computed once per image, text once per sentence."""
    from tqdm import tqdm

    groups = list(data.refs_by_image())[:limit]
    metrics = ReferMetrics()
    samples: List[dict] = []
    no_proposals, text_cache = 0, {}
    for image_id, refs in tqdm(groups, desc=f"eval-refer {data.name}", unit="image", file=sys.stderr,
                               disable=not progress):
        image = data.read_image(image_id)
        proposals = _proposals(data, image_id, image, oracle, masks_dir, dense, backend)
        if proposals.ndim == 3 and len(proposals) and proposals.reshape(len(proposals), -1).any():
            masks, _ = check_proposals(proposals, image.shape[:2], source=f"proposals of image {image_id}")
            prepared = seg.prepare(image)
            f_global, f_local = seg.global_features(prepared, masks), seg.local_features(prepared, masks)
        else:
            masks = None
        for ref in refs:
            target = data.ann_mask(ref.ann_id)
            for sent in ref.sentences:
                sentence = sent.get("raw") or sent.get("sent") or ""
                if masks is None:
                    no_proposals += 1
                    iou = metrics.add(np.zeros_like(target), target)
                    samples.append({"ref_id": ref.ref_id, "sent_id": sent.get("sent_id"), "iou": iou,
                                    "best": None})
                    continue
                if sentence not in text_cache:
                    text_cache[sentence] = seg.text_feature(sentence, parser)
                text, phrase = text_cache[sentence]
                result = seg.rank(f_global, f_local, text, phrase, alpha)
                iou = metrics.add(hard_masks(masks[result.best:result.best + 1])[0], target)
                samples.append({"ref_id": ref.ref_id, "sent_id": sent.get("sent_id"), "iou": round(iou, 6),
                                "best": result.best, "score": round(float(result.scores[result.best]), 6),
                                "noun_phrase": phrase.phrase})
    summary: Dict[str, object] = {
        "dataset": data.name, "alpha": alpha,
        "proposals": "oracle" if oracle else (str(masks_dir) if masks_dir else
                                              f"generated{'+dense' if dense else ''}"),
        "images": len(groups), "no_proposals": no_proposals}
    summary.update(metrics.summary())
    return summary, samples
