"""Time of the class-name embeddings (classes x 80 templates) before and after batching with the
context cut to the longest prompt (clipfuse.export.text_embed), on random-weight towers.

    python -m clipfuse.benchmarks.text_embed_time --model ViT-B-16 --model ViT-L-14 \
        --out benchmarks/results/text-embed-time-cpu

"padded" is the former computation (batches of 256 prompts, all 77 positions); "cut" is what
`clipfuse export` does now. Both run in this process, one after the other, on the same tower;
the largest difference between the two results is recorded (they must agree to float rounding).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import List, Optional


def measure(model: str, classes: List[str]) -> dict:
    import open_clip
    import torch

    from clipfuse.export.text_embed import encode_names
    from clipfuse.export.weights import load_clip
    from clipfuse.runtime.templates import get_templates

    clip = load_clip(model, "none", seed=0)
    templates = get_templates("imagenet80")
    tokenizer = open_clip.get_tokenizer(model)
    t0 = time.perf_counter()
    padded = encode_names(clip.model, tokenizer, classes, templates, batch_size=256, truncate=False)
    t1 = time.perf_counter()
    cut = encode_names(clip.model, tokenizer, classes, templates)
    t2 = time.perf_counter()
    return {"model": model, "classes": len(classes), "templates": len(templates),
            "padded_seconds": round(t1 - t0, 2), "cut_seconds": round(t2 - t1, 2),
            "speedup": round((t1 - t0) / (t2 - t1), 2),
            "max_abs_difference": float((padded - cut).abs().max()), "threads": torch.get_num_threads()}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--classes", default="sky,tree,road,car")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = []
    for model in args.model:
        rows.append(measure(model, args.classes.split(",")))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        import torch
        meta = {"what": __doc__.splitlines()[0], "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs: times are "
                           "upper bounds)", "torch": torch.__version__, "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
        lines = [f"# {meta['what']}", "", f"{meta['machine']}; torch {meta['torch']}; {meta['date']}", "",
                 "| model | classes x templates | padded s | cut s | speedup | max abs diff |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['classes']} x {r['templates']} | {r['padded_seconds']} | {r['cut_seconds']} | "
                  f"{r['speedup']} | {r['max_abs_difference']:.1e} |" for r in rows]
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
