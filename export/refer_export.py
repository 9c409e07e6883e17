"""Export the Global-Local CLIP graphs (refer-global, refer-local, + the text graph) with their
manifests: the library behind `clipfuse export-refer`. torch is imported inside the functions, so
the CLI can import PRECISIONS without it."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, Optional

from .spec import PRECISIONS, ReferExportSpec  # noqa: F401 (PRECISIONS: the CLI's choices)


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"clipfuse: {msg}", file=sys.stderr, flush=True)


def _manifest(kind: str, clip, module, pretrained_arg: str, normalization: str, opset: int,
              precision: str, onnx_name: str, refer: dict) -> dict:
    from clipfuse.runtime.manifest import io_spec, new_manifest

    from .refer_graphs import INPUT_SIZE, NORMALIZATIONS

    mean, std = NORMALIZATIONS[normalization]
    size = INPUT_SIZE
    g = module.grid
    embed_dim = int(module.proj.shape[1])
    if kind == "refer-global":
        inputs = [io_spec("image", "float32", [1, size, size, 3], "NHWC",
                          description="RGB on the 0..255 pixel scale: the 800-pixel short-side copy "
                                      "resized to 224x224 (bilinear, not rounded); normalised in the graph"),
                  io_spec("masks", "float32", ["masks", g[0], g[1]], "NHW",
                          description="soft mask per proposal at grid resolution (bilinear resize of 0/1 masks)")]
        outputs = [io_spec("features", "float32", ["masks", embed_dim], "NE",
                           description="f_G: ln_post(CLS) @ proj per mask, not normalised")]
    else:
        inputs = [io_spec("crops", "float32", ["crops", size, size, 3], "NHWC",
                          description="masked, box-cropped, resized crops on the 0..255 pixel scale; "
                                      "normalised in the graph")]
        outputs = [io_spec("features", "float32", ["crops", embed_dim], "NE",
                           description="f_L: ln_post(CLS) @ proj per crop, not normalised")]
    return new_manifest(
        kind,
        model=clip.model_name,
        pretrained=clip.pretrained_id,
        pretrained_source=pretrained_arg,
        seed=getattr(clip, "seed", 0),
        quick_gelu=clip.quick_gelu,
        embed_dim=embed_dim,
        input_size=[size, size],
        patch_size=size // g[0],
        grid=list(g),
        inputs=inputs,
        outputs=outputs,
        normalization={"name": normalization, "mean": list(mean), "std": list(std), "in_graph": True},
        refer=refer,
        opset=opset,
        precision=precision,
        onnx_file=onnx_name,
        onnx_sha256=None,
    )


def export_refer(out: "str | Path", model: str = "ViT-B-32", pretrained: str = "openai",
                 normalization: str = "imagenet", masked_blocks: int = 3, alpha: float = 0.95,
                 fill: str = "public", precision: str = "fp32", quick_gelu: Optional[bool] = None,
                 seed: int = 0, opset: int = 17, text: bool = True, quiet: bool = True) -> Dict[str, Path]:
    """export_refer_graphs with the spec's fields as keywords (the CLI's and the tests' form)."""
    spec = ReferExportSpec(model=model, pretrained=pretrained, normalization=normalization,
                           masked_blocks=masked_blocks, alpha=alpha, fill=fill, precision=precision,
                           quick_gelu=quick_gelu, seed=seed, opset=opset, text=text)
    return export_refer_graphs(spec, out, quiet=quiet)


def export_refer_graphs(spec: ReferExportSpec, out: "str | Path", quiet: bool = True) -> Dict[str, Path]:
    """Write OUT-global.onnx/.json and OUT-local.onnx/.json (+ OUT-text.onnx/.json, the text graph
    of clipfuse.export.text_graph, when `spec.text`); returns {"global": p, "local": p[, "text": p]}."""
    from .artifacts import graph_with_manifest
    from .refer_graphs import ReferGlobal, ReferLocal, export_onnx
    from .weights import load_clip

    spec.validate()
    model, pretrained, normalization, precision, opset = (spec.model, spec.pretrained, spec.normalization,
                                                          spec.precision, spec.opset)
    masked_blocks = spec.masked_blocks
    out = Path(out)
    if out.suffix == ".onnx":
        out = out.with_suffix("")
    t0 = time.time()
    _log(f"loading {model} ({pretrained})", quiet)
    clip = load_clip(model, pretrained, quick_gelu=spec.quick_gelu, seed=spec.seed)
    visual = clip.model.visual
    refer = spec.refer_section()
    modules = {"global": ReferGlobal(visual, normalization, masked_blocks).eval(),
               "local": ReferLocal(visual, normalization).eval()}
    written: Dict[str, Path] = {}
    for part, module in modules.items():
        path = out.with_name(f"{out.name}-{part}.onnx")
        kind = f"refer-{part}"
        manifest = _manifest(kind, clip, module, pretrained, normalization, opset, precision, path.name, refer)
        _log(f"exporting {path.name} ({kind}, grid {module.grid[0]}x{module.grid[1]}, {precision})", quiet)
        with graph_with_manifest(path, manifest) as tmp_onnx:
            export_onnx(module, str(tmp_onnx), opset)
            if precision == "fp16":
                from .fp16 import convert_file
                manifest.update(fp16=convert_file(tmp_onnx, tmp_onnx).to_dict())
        written[part] = path
    if spec.text:  # the same loaded weights, so the three graphs share one CLIP
        from .text_graph import export_text
        written["text"] = export_text(spec.text_spec(), out.with_name(f"{out.name}-text"), quiet=quiet, clip=clip)
    _log(f"wrote {', '.join(p.name for p in written.values())} in {time.time() - t0:.1f} s", quiet)
    return written
