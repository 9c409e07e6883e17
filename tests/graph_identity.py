"""Export every artifact kind on the tiny tower and fingerprint the graphs.

A refactor of the exporter must not change a single node: `graph_fingerprints(folder)` exports every
head of the registry (window graph, baked vocabulary), one dynamic-vocabulary graph, one frame graph,
the text graph and the two refer graphs with random weights (seed 0) and returns
{artifact: {"structure": sha256 of nodes (op, domain, inputs, outputs, attributes), graph I/O,
initializer names/dtypes/shapes and opset imports, "tensors": {initializer: [sum, sum of |x|]}}}.
The structure must match exactly; the tensor sums within TENSOR_RTOL, since float summation order
may move a baked class embedding by an ulp (batched text embeddings: <= 1.6e-7). The contract in
metadata_props is left out on purpose: it records versions, which a release changes without
changing the graph.

tests/data/graph_fingerprints.json holds the numbers of the code before the head-family refactor
(`python tests/graph_identity.py --write` regenerates it; tests/test_graph_identity.py compares).
The manifests written alongside are the fixtures of tests/data/manifests/ (`--manifests DIR`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Dict

HERE = Path(__file__).resolve().parent
FINGERPRINTS = HERE / "data" / "graph_fingerprints.json"
TINY = "ViT-T-16-test"
VOCAB = [["background"], ["cat", "kitty"], ["dog"], ["grass"]]
SIZE = 112          # 7x7 patches: enough for SC-CLIP's LOF neighbourhoods, fast on a CPU
FRAME = (96, 128)   # (H, W) of the frame-graph fixture


TENSOR_RTOL = 1e-5


def graph_fingerprint(onnx_path: Path) -> dict:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    g = model.graph
    digest = hashlib.sha256()
    for node in g.node:
        digest.update(f"{node.op_type}|{node.domain}|{list(node.input)}|{list(node.output)}".encode())
        for attr in node.attribute:
            digest.update(attr.SerializeToString(deterministic=True))
    for value in (*g.input, *g.output):
        digest.update(value.SerializeToString(deterministic=True))
    tensors = {}
    for init in sorted(g.initializer, key=lambda t: t.name):
        digest.update(f"{init.name}|{init.data_type}|{list(init.dims)}".encode())
        x = numpy_helper.to_array(init).astype(np.float64)
        tensors[init.name] = [float(x.sum()), float(np.abs(x).sum())]
    for imp in model.opset_import:
        digest.update(f"{imp.domain}:{imp.version}".encode())
    return {"structure": digest.hexdigest(), "tensors": tensors}


def differences(before: dict, after: dict) -> list:
    """What changed between two fingerprints of one artifact ([] when the graph is the same)."""
    if before["structure"] != after["structure"]:
        return ["structure"]
    out = []
    for name, (s0, a0) in before["tensors"].items():
        s1, a1 = after["tensors"][name]
        if abs(s1 - s0) > TENSOR_RTOL * max(a0, 1e-12) or abs(a1 - a0) > TENSOR_RTOL * max(a0, 1e-12):
            out.append(name)
    return out


def export_all(folder: Path) -> Dict[str, Path]:
    """Every artifact kind on the tiny tower; {name: .onnx path}."""
    sys.path.insert(0, str(HERE))
    from conftest import TINY_HEAD_PARAMS

    from clipfuse.export.api import export_image_graph
    from clipfuse.export.refer_export import export_refer
    from clipfuse.export.spec import ImageExportSpec
    from clipfuse.export.weights import load_clip
    from clipfuse.runtime.methods import METHODS

    clip = load_clip(TINY, "none", seed=0)
    out: Dict[str, Path] = {}

    def spec(head: str, **fields) -> ImageExportSpec:
        if METHODS[head].takes_heads_checkpoint:
            fields.setdefault("heads_checkpoint", "none")
        return ImageExportSpec(head, model=TINY, pretrained="none", classes=VOCAB, size=SIZE,
                               templates="single", head_params=dict(TINY_HEAD_PARAMS.get(head, {})), **fields)

    for head in METHODS:
        out[head] = export_image_graph(spec(head), folder / head, clip=clip)
    out["sclip-dynamic"] = export_image_graph(spec("sclip", vocab_mode="dynamic"), folder / "sclip-dynamic", clip=clip)
    out["sclip-frame"] = export_image_graph(spec("sclip", frame=FRAME), folder / "sclip-frame", clip=clip)
    for part, path in export_refer(folder / "refer", model=TINY, pretrained="none", seed=0).items():
        out[f"refer-{part}"] = path
    return out


def fingerprints(folder: Path) -> Dict[str, dict]:
    return {name: graph_fingerprint(path) for name, path in sorted(export_all(folder).items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {FINGERPRINTS.relative_to(HERE.parent)}")
    parser.add_argument("--manifests", type=Path, default=None, help="copy the manifests into this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_all(Path(tmp))
        result = {name: graph_fingerprint(path) for name, path in sorted(paths.items())}
        if args.manifests is not None:
            args.manifests.mkdir(parents=True, exist_ok=True)
            for name, path in paths.items():
                text = path.with_suffix(".json").read_text()
                (args.manifests / f"{name}.json").write_text(text)
    print(json.dumps({name: fp["structure"] for name, fp in result.items()}, indent=1))
    if args.write:
        FINGERPRINTS.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
