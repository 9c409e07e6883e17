"""`clipfuse heads`: the dense heads, their defaults and protocols (torch-free: runtime.methods)."""
from __future__ import annotations

import argparse
import json

ORDER = 10  # place in `clipfuse --help`
HELP = "list the dense heads with their default weights, export size and protocol"
DESCRIPTION = """\
List every dense head clipfuse can export, with the open_clip weights its method was published
with, the default export size (= sliding-window size) and the inference protocol the runtime
applies (short side, window, stride, logit scale, thresholds) plus per-dataset overrides.

example:
  clipfuse heads
  clipfuse heads --json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _backbones(method: str) -> dict:
    from clipfuse.runtime.backbones import BACKBONES, protocol_for, setting

    out = {}
    for model, backbone in BACKBONES.items():
        s, window = setting(method, model), protocol_for(method, model).window
        out[model] = {"published": s.published, "note": s.note, "window": window,
                      "grid": window // backbone.patch, "head_params": dict(s.head_params)}
    return out


def run(args: argparse.Namespace) -> int:
    from clipfuse.runtime.methods import METHODS

    rows = []
    for name, spec in METHODS.items():
        rows.append({
            "head": name,
            "summary": spec.summary,
            "default_pretrained": spec.default_pretrained,
            "default_size": spec.default_size,
            "block": spec.default_head_params(),
            "pos_embed_rule": spec.pos_rule,
            "takes_heads_checkpoint": spec.takes_heads_checkpoint,
            "protocol": spec.protocol.to_dict(),
            "dataset_overrides": spec.dataset_protocol,
            "dataset_head_params": spec.dataset_head_params,
            "published_miou": spec.published_miou,
            "backbones": _backbones(name),
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        p = row["protocol"]
        print(f"{row['head']}")
        print(f"  {row['summary']}")
        print(f"  weights: --pretrained {row['default_pretrained']}   export size: {row['default_size']}"
              f"   pos-embed rule: {row['pos_embed_rule']}")
        if row["block"]:
            print("  block:   " + ", ".join(f"{k}={v}" for k, v in row["block"].items()))
        long_cap = f", long side <= {p['long_side_max']}" if p["long_side_max"] else ""
        print(f"  protocol: short side {p['short_side']}{long_cap}, window {p['window']}, stride {p['stride']}, "
              f"scores {p['score_type']}, logit_scale {p['logit_scale']}, prob_thd {p['prob_thd']}, "
              f"area_thd {p['area_thd']}")
        for ds, over in row["dataset_overrides"].items():
            print(f"    {ds}: " + ", ".join(f"{k}={v}" for k, v in over.items()))
        print("  backbones (window in pixels, patch grid; runtime/backbones.py):")
        for model, b in row["backbones"].items():
            print(f"    {model}: window {b['window']} ({b['grid']}x{b['grid']} grid), "
                  f"{'published' if b['published'] else 'stated default'}: {b['note']}")
        if row["dataset_head_params"]:
            print("  baked per dataset (export one graph per setting; eval warns on a mismatch):")
            for ds, over in row["dataset_head_params"].items():
                print(f"    {ds}: " + ", ".join(f"{k}={v}" for k, v in over.items()))
    return 0
