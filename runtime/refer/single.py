"""One image, one sentence: proposals -> the graphs' ranking -> mask, overlay and JSON report
(the pipeline behind `clipfuse refer`)."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .pipeline import ReferResult, ReferSegmenter, mask_boxes


def _log(message: str) -> None:
    print(f"clipfuse refer: {message}", file=sys.stderr)


@dataclass
class ReferOutcome:
    result: ReferResult
    kept: np.ndarray           # original index of each checked proposal
    num_proposals: int
    mask_path: Path
    report: dict


def refer_image(graphs: "str | Path", image_path: "str | Path", sentence: str, out: "str | Path", *,
                masks: Optional[str] = None, dense: Optional[str] = None, text_graph: Optional[str] = None,
                backend: str = "auto", parser: str = "auto", fill: Optional[str] = None,
                alpha: Optional[float] = None, log: Callable[[str], None] = _log) -> ReferOutcome:
    """Score every proposal of `image_path` (from `masks`, or generated, with `dense` regions)
    against `sentence` and write OUT/STEM.mask.png, .overlay.png and .refer.json."""
    from ..fileio import atomic_path, write_text_atomic
    from ..imageio import read_image
    from ..outputs import save_overlay_png
    from .masks import check_proposals, generate_proposals, hard_masks, load_proposals
    from .nounphrase import extract_noun_phrase

    extract_noun_phrase(sentence, parser)        # bad sentence: fail before any heavy work
    image = read_image(image_path)
    if masks:
        raw = load_proposals(masks, image.shape[:2])
        source = str(masks)
    else:
        log(f"generating proposals ({'dense model + ' if dense else ''}colour clusters)")
        raw, source = generate_proposals(image, dense, backend)
    checked, kept = check_proposals(raw, image.shape[:2], source=f"--masks {masks}" if masks else source)
    if len(kept) < len(raw):
        log(f"dropped {len(raw) - len(kept)} empty mask(s)")

    seg = ReferSegmenter.open(graphs, backend=backend, text=text_graph)
    try:
        text, phrase = seg.text_feature(sentence, parser)
        prepared = seg.prepare(image)
        f_global = seg.global_features(prepared, checked)
        f_local = seg.local_features(prepared, checked, fill)
        result = seg.rank(f_global, f_local, text, phrase, alpha)
    finally:
        seg.close()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(image_path).stem
    best = hard_masks(checked[result.best:result.best + 1])[0]
    from PIL import Image
    mask_path = out / f"{stem}.mask.png"
    with atomic_path(mask_path) as tmp:
        Image.fromarray(best.astype(np.uint8) * 255, mode="L").save(tmp, format="PNG")
    save_overlay_png(out / f"{stem}.overlay.png", image, best.astype(np.int64), ["background", phrase.phrase])
    boxes = mask_boxes(checked)
    ranked = [{"rank": r, "proposal": int(kept[i]), "score": round(float(result.scores[i]), 6),
               "area": int(hard_masks(checked[i:i + 1]).sum()), "box_xyxy": [int(v) for v in boxes[i]]}
              for r, i in enumerate(result.ranking())]
    report = {"image": str(image_path), "height": int(image.shape[0]), "width": int(image.shape[1]),
              "sentence": sentence, "encoded_sentence": phrase.sentence, "noun_phrase": phrase.phrase,
              "parser": phrase.parser, "alpha": result.alpha, "proposals": source,
              "num_proposals": len(checked), "best_proposal": int(kept[result.best]), "ranking": ranked}
    write_text_atomic(out / f"{stem}.refer.json", json.dumps(report, indent=2) + "\n")
    return ReferOutcome(result=result, kept=np.asarray(kept), num_proposals=len(checked), mask_path=mask_path,
                        report=report)
