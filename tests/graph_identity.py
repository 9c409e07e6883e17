"""Export every artifact kind on the tiny tower and fingerprint the graphs.

A refactor of the exporter must not change a single node: `graph_fingerprints(folder)` exports every
head of the registry (window graph, baked vocabulary), one dynamic-vocabulary graph, one frame graph,
the text graph and the two refer graphs with random weights (seed 0) and returns
{artifact: sha256 of the serialised GraphProto + opset imports}. The contract in metadata_props is
left out on purpose: it records versions, which a release changes without changing the graph.

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


def graph_hash(onnx_path: Path) -> str:
    import onnx

    model = onnx.load(str(onnx_path))
    digest = hashlib.sha256(model.graph.SerializeToString(deterministic=True))
    for imp in model.opset_import:
        digest.update(f"{imp.domain}:{imp.version}".encode())
    return digest.hexdigest()


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


def fingerprints(folder: Path) -> Dict[str, str]:
    return {name: graph_hash(path) for name, path in sorted(export_all(folder).items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {FINGERPRINTS.relative_to(HERE.parent)}")
    parser.add_argument("--manifests", type=Path, default=None, help="copy the manifests into this folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_all(Path(tmp))
        result = {name: graph_hash(path) for name, path in sorted(paths.items())}
        if args.manifests is not None:
            args.manifests.mkdir(parents=True, exist_ok=True)
            for name, path in paths.items():
                text = path.with_suffix(".json").read_text()
                (args.manifests / f"{name}.json").write_text(text)
    print(json.dumps(result, indent=1))
    if args.write:
        FINGERPRINTS.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
